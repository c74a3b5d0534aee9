"""The streaming detokenizer: what it hands out, joined, equals a full decode (exactly, over long outputs, for a
byte-level tokenizer fed valid and invalid UTF-8 and for a SentencePiece-style one that spaces by its
neighbours), and its cost per token stays constant (it decodes a bounded window, never the whole output)."""

from __future__ import annotations

import random
from typing import Any

import pytest

from bus.text import IncrementalDetokenizer, load_tokenizer


class Counting:
    """A tokenizer that counts the ids it is asked to decode."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer, self.decoded = tokenizer, 0

    def decode(self, ids: list[int], **kw: Any) -> str:
        self.decoded += len(ids)
        return self.tokenizer.decode(ids, **kw)


def stream(tokenizer: Any, prompt: list[int], out: list[int], step: int = 1) -> tuple[str, int]:
    counting = Counting(tokenizer)
    d = IncrementalDetokenizer(counting)
    d.prime(prompt)
    pieces = [d.push(out[i:i + step]) for i in range(0, len(out), step)]
    pieces.append(d.flush())
    return "".join(pieces), counting.decoded


def full(tokenizer: Any, prompt: list[int], out: list[int]) -> str:
    ctx = prompt[-IncrementalDetokenizer.CONTEXT:]
    return tokenizer.decode(ctx + out, skip_special_tokens=True)[len(tokenizer.decode(ctx, skip_special_tokens=True)):]


@pytest.fixture(scope="module")
def byte_level(default_model):  # type: ignore[no-untyped-def]
    return load_tokenizer(default_model)


@pytest.fixture(scope="module")
def sentencepiece_like():  # type: ignore[no-untyped-def]
    """A Metaspace BPE (the SentencePiece convention: "▁" marks a word's start, decoding turns it into a space and
    drops the first one), trained here on a small text: no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    words = "the quick brown fox jumps over lazy dogs while pipelines stream caches between stages".split()
    rng = random.Random(3)
    corpus = [" ".join(rng.choice(words) for _ in range(12)) for _ in range(300)]
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>", "</s>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>")


def test_byte_level_valid_and_invalid_utf8_equals_the_full_decode(byte_level) -> None:  # type: ignore[no-untyped-def]
    rng = random.Random(0)
    text = "pipelines stream KV: héllo wörld, 日本語の文章, emoji 🎉🚀 and ASCII. " * 40
    valid = byte_level.encode(text)
    garbage = [rng.randrange(3, 259) for _ in range(3000)]  # random bytes: runs of invalid UTF-8
    mixed = [t for i in range(0, 3000, 50) for t in (valid[i:i + 50] + garbage[i:i + 7])]
    prompt = byte_level.encode("a prompt ending in é")
    for out in (valid, garbage, mixed, valid[1:] + [2] + valid[:20]):  # [2]: </s>, a special token, skipped
        for step in (1, 3):
            got, decoded = stream(byte_level, prompt, out, step)
            assert got == full(byte_level, prompt, out)
            assert decoded <= 40 * len(out), "the cost per token must not grow with the output"


def test_word_joining_tokenizer_equals_the_full_decode(sentencepiece_like) -> None:  # type: ignore[no-untyped-def]
    tok = sentencepiece_like
    rng = random.Random(1)
    words = "the quick brown fox jumps over lazy dogs while pipelines stream caches between stages".split()
    out = tok.encode(" ".join(rng.choice(words) for _ in range(1500)))
    prompt = tok.encode("the fox")
    got, decoded = stream(tok, prompt, out)
    assert got == full(tok, prompt, out) and got.startswith(" ")  # the first word keeps its space after a prompt
    assert decoded <= 40 * len(out)


def test_cost_is_linear_in_the_output(byte_level) -> None:  # type: ignore[no-untyped-def]
    """Twice the output, twice the work (the old detokenizer decoded everything at each token: 4x)."""
    out = byte_level.encode("streaming text, token by token. " * 200)
    _, short = stream(byte_level, [], out[: len(out) // 2])
    _, long = stream(byte_level, [], out)
    assert long <= 2.2 * short
