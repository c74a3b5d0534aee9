"""OpenAI's presence and frequency penalties (vLLM's semantics: over the generated tokens, not the prompt) through
real processes: greedy outputs equal Hugging Face's generate with a logits processor that applies them (float32,
CPU), in a two-stage pipeline, with microbatch swapping (the last stage keeps each logical slot's generated tokens)
and with lookahead on (a penalized microbatch is not sent ahead); a kill -9 of the last stage mid-run, whose
successor learns each request's generated tokens from the first step of the new epoch, changes nothing."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList

from bus.client import AsyncClient
from bus.errors import BadRequestError
from stages.layers.sampling import penalize, token_counts
from tests.conftest import start_deployment
from tests.tiny_models import load_hf

NEW = 24
# (prompt, presence, frequency): the tiny model repeats itself, so penalties change its greedy output
WORK = [([5, 17, 42, 99, 3, 8, 150], 1.5, 0.0), ([7, 11], 0.0, 0.9), ([100, 1, 60, 61], 0.7, 0.4),
        ([9, 9, 9], -0.5, 0.3), ([30, 31, 32, 33, 34, 35], 0.0, 0.0), ([12], 2.0, 2.0)]


class Penalties(LogitsProcessor):
    """The oracle: vLLM's presence/frequency penalties over the tokens after the prompt."""

    def __init__(self, start: int, presence: float, frequency: float) -> None:
        self.start, self.presence, self.frequency = start, presence, frequency

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        counts = torch.bincount(input_ids[0, self.start:], minlength=scores.shape[-1])[: scores.shape[-1]].float()
        return scores - self.frequency * counts - self.presence * (counts > 0).float()


def references(path, work=WORK) -> list[list[int]]:  # type: ignore[no-untyped-def]
    hf = load_hf(path)
    out = []
    for prompt, presence, frequency in work:
        with torch.no_grad():
            ids = hf.generate(torch.tensor([prompt]), max_new_tokens=NEW, do_sample=False, pad_token_id=0,
                              logits_processor=LogitsProcessorList([Penalties(len(prompt), presence, frequency)]))
        out.append(ids[0, len(prompt):].tolist())
    return out


def test_penalize_takes_counts_and_presence_off_a_copy() -> None:
    logits = torch.randn(3, 10)
    kept = logits.clone()
    got = penalize(logits, [0, 2], token_counts([[1, 1, 4], []], 10, logits.device), [0.5, 2.0], [0.25, 1.0])
    want = kept.clone()
    want[0, 1] -= 0.25 * 2 + 0.5
    want[0, 4] -= 0.25 + 0.5
    assert torch.allclose(got, want) and torch.equal(logits, kept)


async def serve(address: str, work=WORK, kill=None):  # type: ignore[no-untyped-def]
    """Every request streamed at once; kill = (tokens received, stage index): SIGKILL that stage then."""
    async with AsyncClient(address, timeout=120) as c:
        received = 0
        reached = asyncio.Event()

        async def one(prompt, presence, frequency):  # type: ignore[no-untyped-def]
            nonlocal received
            out = []
            async with c.stream(prompt_token_ids=prompt, max_new_tokens=NEW,
                                presence_penalty=presence, frequency_penalty=frequency) as s:
                async for ev in s:
                    out.extend(ev.token_ids)
                    received += len(ev.token_ids)
                    if kill is not None and received >= kill[0]:
                        reached.set()
            return out

        async def killer() -> None:
            await reached.wait()
            st = await c.status()
            os.kill(next(p["pid"] for p in st["processes"] if p["role"] == "stage" and p["index"] == kill[1]),
                    signal.SIGKILL)

        task = asyncio.create_task(killer()) if kill is not None else None
        outs = await asyncio.gather(*(one(*w) for w in work))
        if task is not None:
            await asyncio.wait_for(task, 30)
        with pytest.raises(BadRequestError, match="presence_penalty must be a number in \\[-2, 2\\]"):
            c.stream(prompt_token_ids=[1], presence_penalty=3)
        return outs, await c.status()


@pytest.mark.parametrize("args", [
    ("--microbatch-size", "4"),
    ("--microbatch-size", "2", "--swap", "on", "--microbatches", "6"),
], ids=["pipeline", "swapping"])
def test_penalized_greedy_equals_hugging_face(args, model_factory) -> None:  # type: ignore[no-untyped-def]
    path = model_factory("llama")
    refs = references(path)
    assert refs[0] != references(path, [(WORK[0][0], 0.0, 0.0)])[0], "the penalties must change the output"
    dep = start_deployment(path, 2, "--max-seq-len", "64", *args)
    try:
        outs, _ = asyncio.run(serve(dep.address))
    finally:
        assert dep.stop() == 0
    assert outs == refs


def test_penalties_survive_a_killed_last_stage_and_skip_lookahead(model_factory) -> None:  # type: ignore[no-untyped-def]
    path = model_factory("llama")
    refs = references(path)
    dep = start_deployment(path, 2, "--max-seq-len", "64", "--microbatch-size", "4")
    try:
        outs, st = asyncio.run(serve(dep.address, kill=(40, 1)))
    finally:
        assert dep.stop() == 0
    assert outs == refs
    assert [r["stage"] for r in st["recoveries"]] == [1], st["recoveries"]
    one = start_deployment(path, 1, "--max-seq-len", "64", "--microbatch-size", "4", "--lookahead", "on")
    try:
        outs, st = asyncio.run(serve(one.address))
    finally:
        assert one.stop() == 0
    assert outs == refs
