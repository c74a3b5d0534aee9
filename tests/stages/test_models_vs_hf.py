"""Every family, 1-4 chained shards, against Hugging Face transformers on the same weights (CPU, float32)."""

from __future__ import annotations

import pytest
import torch

from stages.batch import SeqChunk
from stages.generate import GenerationRequest, LocalPipeline, generate
from tests.tiny_models import CONFIGS, load_hf

FAMILIES = list(CONFIGS)
# Post-norm OPT at random init stays near-constant whatever the scaling (its LayerNorms wash the token
# signal out); its prefill logits at every position are still checked exactly, and its decode path is the
# pre-norm OPT's.
CONSTANT_OUTPUT_OK = {"opt_postnorm"}
LENGTHS = [1, 2, 7, 13, 24, 40, 33, 5]  # mixed prompt lengths, 1 to 40 tokens


def _prompts(vocab: int, lengths: list[int], seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


@pytest.fixture(scope="module")
def hf_models(model_factory):  # type: ignore[no-untyped-def]
    return {name: load_hf(model_factory(name)) for name in FAMILIES}


@pytest.mark.parametrize("stages", [1, 2, 3, 4])
@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_hf(family: str, stages: int, model_factory, hf_models) -> None:  # type: ignore[no-untyped-def]
    path, hf = model_factory(family), hf_models[family]
    prompts = _prompts(hf.config.vocab_size, LENGTHS, seed=1)
    pipe = LocalPipeline(path, stages, num_slots=len(prompts), max_seq_len=64)
    chunks = [SeqChunk(i, 0, len(p)) for i, p in enumerate(prompts)]
    ours = pipe.step(chunks, [t for p in prompts for t in p], all_logits=True)
    row = 0
    for p in prompts:
        with torch.no_grad():
            ref = hf(torch.tensor([p])).logits[0]
        got = ours[row : row + len(p)]
        row += len(p)
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("stages", [1, 2, 3, 4])
@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generation_matches_hf(family: str, stages: int, model_factory, hf_models) -> None:  # type: ignore[no-untyped-def]
    path, hf = model_factory(family), hf_models[family]
    prompts = _prompts(hf.config.vocab_size, LENGTHS, seed=2)
    new = 20
    pipe = LocalPipeline(path, stages, num_slots=len(prompts), max_seq_len=64)
    results = generate(pipe, [GenerationRequest(p, new) for p in prompts])
    varied = 0
    for p, res in zip(prompts, results):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([p]), max_new_tokens=new, do_sample=False, pad_token_id=0)[0, len(p) :]
        assert res.token_ids == ref.tolist(), f"prompt of {len(p)} tokens"
        varied += len(set(res.token_ids)) > 3
    if family not in CONSTANT_OUTPUT_OK:
        assert varied >= len(prompts) // 2, "outputs should vary; a constant output would hide cache bugs"


def test_mixed_prompt_and_decode_step_matches_hf(model_factory, hf_models) -> None:  # type: ignore[no-untyped-def]
    """One step holding new prompts, decode tokens and a resumed chunk (start > 0, several tokens)."""
    family = "llama"
    path, hf = model_factory(family), hf_models[family]
    seqs = _prompts(hf.config.vocab_size, [20, 11, 30, 9], seed=3)
    pipe = LocalPipeline(path, 2, num_slots=4, max_seq_len=64)
    # warm the cache: seq0 first 19 tokens, seq1 first 10, seq2 first 12
    pipe.step([SeqChunk(0, 0, 19), SeqChunk(1, 0, 10), SeqChunk(2, 0, 12)], seqs[0][:19] + seqs[1][:10] + seqs[2][:12])
    chunks = [SeqChunk(3, 0, 9), SeqChunk(0, 19, 1), SeqChunk(2, 12, 18), SeqChunk(1, 10, 1)]
    inputs = seqs[3] + seqs[0][19:] + seqs[2][12:] + seqs[1][10:]
    logits = pipe.step(chunks, inputs)  # last token of each chunk
    for row, i in enumerate([3, 0, 2, 1]):
        with torch.no_grad():
            ref = hf(torch.tensor([seqs[i]])).logits[0, -1]
        torch.testing.assert_close(logits[row], ref, rtol=1e-4, atol=1e-4)


def test_sliding_window_is_applied(model_factory, hf_models) -> None:  # type: ignore[no-untyped-def]
    """Mistral's window (12) is shorter than the prompt: the result must differ from full attention."""
    path = model_factory("mistral")
    prompt = _prompts(200, [40], seed=4)[0]
    pipe = LocalPipeline(path, 1, num_slots=1, max_seq_len=64)
    windowed = pipe.step([SeqChunk(0, 0, 40)], prompt)
    for shard in pipe.shards:
        object.__setattr__(shard.spec, "sliding_window", None)
    full = pipe.step([SeqChunk(0, 0, 40)], prompt)
    assert not torch.allclose(windowed, full, atol=1e-3)
