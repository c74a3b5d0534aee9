"""Log-probabilities through real processes and the ZeroMQ client: a disaggregated deployment (one prompt stage, one
token stage), so the first token's logprob comes from the prompt stage that sampled it and the rest from the token
stage. Each equals log_softmax of Hugging Face's logits on the same weights (float32, CPU) for the same sequence,
greedy and sampled (the model's own distribution: before temperature and top-p); the top alternatives too. A
request that asks for none gets none."""

from __future__ import annotations

import asyncio

import torch

from bus.client import AsyncClient
from tests.conftest import start_deployment
from tests.tiny_models import load_hf

TOL = 1e-4
PROMPTS = [[5, 17, 42, 99, 3, 8, 150], [7, 11], [100, 1, 60, 61, 62, 63, 64, 65, 66, 67, 68], [9]]
NEW, TOP = 8, 3


def hf_logprobs(hf, prompt: list[int], output: list[int]) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """[len(output), vocab]: log_softmax of HF's logits at each position that drew an output token."""
    with torch.no_grad():
        logits = hf(torch.tensor([prompt + output[:-1]])).logits[0, len(prompt) - 1:]
    return torch.log_softmax(logits.float(), dim=-1)


def check(ref: torch.Tensor, output: tuple[int, ...], logprobs) -> None:  # type: ignore[no-untyped-def]
    assert logprobs is not None and len(logprobs) == len(output)
    for i, (token, lp) in enumerate(zip(output, logprobs)):
        assert abs(lp.logprob - ref[i, token].item()) < TOL, (i, lp.logprob, ref[i, token].item())
        assert len(lp.top_ids) == len(lp.top_logprobs) == TOP
        assert torch.allclose(torch.tensor(lp.top_logprobs), ref[i].topk(TOP).values, atol=TOL)
        assert all(abs(ref[i, t].item() - v) < TOL for t, v in zip(lp.top_ids, lp.top_logprobs))  # (ties may swap)


def test_disaggregated_logprobs_equal_hugging_face(model_factory) -> None:  # type: ignore[no-untyped-def]
    path = model_factory("llama")
    dep = start_deployment(path, 2, "--prompt-stages", "1", "--token-stages", "1", "--microbatch-size", "4",
                           "--max-seq-len", "64")

    async def scenario():  # type: ignore[no-untyped-def]
        async with AsyncClient(dep.address, timeout=60) as c:
            greedy = await asyncio.gather(*(c.generate(prompt_token_ids=p, max_new_tokens=NEW, logprobs=TOP,
                                                       ignore_eos=True) for p in PROMPTS))
            sampled = await c.generate(prompt_token_ids=PROMPTS[0], max_new_tokens=NEW, temperature=1.5, top_p=0.9,
                                       seed=3, logprobs=TOP, ignore_eos=True)
            events = [ev async for ev in c.stream(prompt_token_ids=PROMPTS[1], max_new_tokens=3, logprobs=0,
                                                  ignore_eos=True)]
            plain = await c.generate(prompt_token_ids=PROMPTS[1], max_new_tokens=NEW, ignore_eos=True)
        return greedy, sampled, events, plain

    try:
        greedy, sampled, events, plain = asyncio.run(scenario())
    finally:
        assert dep.stop() == 0
    hf = load_hf(path)
    for prompt, res in zip(PROMPTS, greedy):
        ref = hf_logprobs(hf, prompt, list(res.token_ids))
        assert list(res.token_ids) == ref.argmax(-1).tolist()  # greedy: each token is HF's likeliest
        check(ref, res.token_ids, res.logprobs)
    check(hf_logprobs(hf, PROMPTS[0], list(sampled.token_ids)), sampled.token_ids, sampled.logprobs)
    assert sampled.token_ids != greedy[0].token_ids  # it did sample (and its logprobs are still the model's)
    assert all(ev.logprobs is not None and len(ev.logprobs) == len(ev.token_ids) for ev in events)
    assert [lp.top_ids for ev in events for lp in ev.logprobs] == [[]] * 3  # type: ignore[union-attr]
    assert plain.logprobs is None and plain.token_ids == greedy[1].token_ids
