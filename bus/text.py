"""Text in, text out: the model directory's own tokenizer (local files only), and incremental decoding for
streams (a byte-level token can end in the middle of a UTF-8 character; such text is held back until the
character completes)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


def byte_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (what byte-level BPE vocabularies spell bytes with)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def has_tokenizer(model_dir: Path) -> bool:
    return any((Path(model_dir) / f).is_file() for f in TOKENIZER_FILES)


def load_tokenizer(model_dir: Path) -> Any | None:
    """A transformers tokenizer from the directory, or None where the directory has none.

    Where tokenizer_config.json names PreTrainedTokenizerFast (Llama 3, our default model, ...), that class is
    what AutoTokenizer would build, and loading it directly skips AutoTokenizer's import of torch and the model
    registry: ~1.4 s instead of ~5.8 s on the CI box, on the controller's path to its first request."""
    if not has_tokenizer(model_dir):
        return None
    try:
        if _configured_class(model_dir) == "PreTrainedTokenizerFast" and (Path(model_dir) / "tokenizer.json").is_file():
            from transformers import PreTrainedTokenizerFast as Tokenizer
        else:
            from transformers import AutoTokenizer as Tokenizer
        return Tokenizer.from_pretrained(str(model_dir), local_files_only=True)
    except Exception as e:  # a broken tokenizer must not stop token-id serving
        log.warning("[text] %s: tokenizer present but unloadable (%s); serving token ids only", model_dir, e)
        return None


def _configured_class(model_dir: Path) -> str:
    try:
        cfg = json.loads((Path(model_dir) / "tokenizer_config.json").read_text())
    except (OSError, ValueError):
        return ""
    return cfg.get("tokenizer_class", "") if isinstance(cfg, dict) else ""


def longest_token_bytes(tokenizer: Any) -> int:
    """UTF-8 bytes of the vocabulary's longest token string: a text has at least len(bytes) / this many tokens."""
    return max((len(t.encode("utf-8", "surrogatepass")) for t in tokenizer.get_vocab()), default=1) or 1


class IncrementalDetokenizer:
    """Feed token ids one step at a time; get back only the newly completed text, in amortized constant time per
    token (the controller runs one per request, on its loop).

    A window of ids [prefix, len) is decoded at each push, never the whole output: `prefix .. read` is context
    already handed out (so tokenizers that space or merge by their neighbours decode the new tokens as a full
    decode would), `read .. len` the tokens not yet handed out. Text that ends in U+FFFD (an incomplete UTF-8
    character: a byte-level token can end in the middle of one) is held back until the character completes;
    then the window moves on (vLLM's and TGI's prefix/read offsets). A held tail that keeps ending in U+FFFD
    (invalid bytes, which only random models emit) is split once a split point is final - at most 3 bytes, so 3
    tokens, can complete a character - so the window stays bounded there too. What it hands out, joined, equals
    the full decode of the output in the context of the prompt's last tokens (tests/bus/test_text.py)."""

    CONTEXT = 4  # prompt tokens decoded with the first output tokens
    HOLD = 4  # held tokens past which a split is tried

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # window start: context for the tokens after `read`
        self.read = 0  # tokens before this have been handed out (or are the prompt's context)

    def prime(self, prompt_ids: list[int]) -> None:
        """Decode outputs in the context of the prompt's last tokens (so word-joining tokenizers space
        correctly); only text after the prompt is ever returned."""
        self.ids = list(prompt_ids[-self.CONTEXT:])
        self.prefix, self.read = 0, len(self.ids)

    def push(self, token_ids: list[int]) -> str:
        self.ids.extend(token_ids)
        return self._advance(final=False)

    def flush(self) -> str:
        """Whatever is held (an incomplete character decodes as U+FFFD, as a full decode would have it)."""
        return self._advance(final=True)

    def _decode(self, a: int, b: int) -> str:
        return self.tokenizer.decode(self.ids[a:b], skip_special_tokens=True)

    def _advance(self, final: bool) -> str:
        n = len(self.ids)
        if n == self.read:
            return ""
        seen = self._decode(self.prefix, self.read)
        text = self._decode(self.prefix, n)
        if final or (len(text) > len(seen) and not text.endswith("\ufffd")):
            self.prefix, self.read = self.read, n
            return text[len(seen):]
        if n - self.read > self.HOLD:
            return self._split(seen, text, n - 3)
        return ""

    def _split(self, seen: str, text: str, j: int) -> str:
        """Hand out the text of the tokens before `j` if decoding them apart from the rest gives the window's text:
        with 3 tokens after `j`, no character spanning `j` can still change."""
        head = self._decode(self.prefix, j)
        tail = self._decode(j - 1, len(self.ids))[len(self._decode(j - 1, j)):]
        if head + tail != text or not head.startswith(seen):
            return ""
        self.prefix, self.read = j - 1, j
        return head[len(seen):]
