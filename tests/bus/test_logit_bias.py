"""`logit_bias` (OpenAI's: token id -> a number in [-100, 100] added to its logit before sampling), through real
processes: greedy outputs equal Hugging Face's generate with the same bias (`sequence_bias`, float32, CPU) in a
two-stage pipeline, a banned token never comes, seeded sampling with a bias is reproducible, and log-probabilities
stay the model's own. The sampler adds the bias to a copy; a bad bias is refused at the client and at the
controller, which keeps serving."""

from __future__ import annotations

import asyncio

import pytest
import torch

from bus.client import AsyncClient
from bus.errors import BadRequestError, InvalidRequestError
from bus.messages import GenerateRequest
from bus.requests import MAX_LOGIT_BIAS, admit, check_logit_bias
from stages.layers.sampling import SamplingParams, sample, token_logprobs
from tests.bus.test_logprobs import hf_logprobs
from tests.conftest import start_deployment
from tests.tiny_models import load_hf

PROMPTS = [[5, 17, 42, 99, 3, 8, 150], [7, 11], [100, 1, 60, 61, 62, 63]]
NEW = 10


def test_the_sampler_adds_the_bias_to_a_copy_before_everything_else() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 50, generator=g)
    kept = logits.clone()
    bias = ((7, 30.0), (logits[0].argmax().item(), -100.0))
    for base in (SamplingParams(), SamplingParams(1.3, top_k=20, top_p=0.8, seed=9)):
        params = [SamplingParams(base.temperature, base.top_k, base.top_p, base.seed, logit_bias=bias)] * 3
        shifted = logits.clone()
        for t, v in bias:
            shifted[:, t] += v
        assert torch.equal(sample(logits, params, [4, 5, 6]), sample(shifted, [base] * 3, [4, 5, 6]))
    assert torch.equal(logits, kept), "the caller's logits (which logprobs read) are untouched"
    banned = sample(logits, [SamplingParams(logit_bias=((int(logits[1].argmax()), -100.0),))] * 3, [1, 1, 1])
    assert banned[1] != logits[1].argmax()
    assert token_logprobs(logits, banned, [0, 0, 0])[1][0] == pytest.approx(  # type: ignore[index]
        torch.log_softmax(logits[1], -1)[banned[1]].item())
    with pytest.raises(InvalidRequestError, match="outside the vocabulary"):
        sample(logits, [SamplingParams(logit_bias=((50, 1.0),))] * 3, [1, 1, 1])


@pytest.mark.parametrize("bias,error", [
    ({5: 101}, "must be a number in \\[-100, 100\\]"), ({5: float("nan")}, "must be a number"),
    ({-1: 1.0}, "outside"), ({True: 1.0}, "outside"), ({5: "1"}, "must be a number"),
    ({i: 1.0 for i in range(MAX_LOGIT_BIAS + 1)}, f"at most {MAX_LOGIT_BIAS}"), ({300: 1.0}, "outside \\[0, 256\\)"),
])
def test_a_bad_bias_is_refused_naming_it(bias, error: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(InvalidRequestError, match=error):
        admit(b"c", GenerateRequest("r", prompt_token_ids=[1, 2], logit_bias=bias), vocab_size=256, max_seq_len=64,
              eos_ids=(), tokenizer=None)
    assert check_logit_bias({9: 2, 3: -1.5}) == ((3, -1.5), (9, 2.0))


def test_served_greedy_with_a_bias_equals_hugging_face(model_factory) -> None:  # type: ignore[no-untyped-def]
    path = model_factory("llama")
    hf = load_hf(path)
    plain = [hf.generate(torch.tensor([p]), max_new_tokens=NEW, do_sample=False, pad_token_id=0)[0, len(p):].tolist()
             for p in PROMPTS]
    # per prompt: ban its unbiased greedy's first token, lift another a little (it wins where it was close)
    biases = [{out[0]: -100.0, (out[0] + 1) % 256: 2.5} for out in plain]
    refs = []
    for p, b in zip(PROMPTS, biases):
        with torch.no_grad():
            out = hf.generate(torch.tensor([p]), max_new_tokens=NEW, do_sample=False, pad_token_id=0,
                              sequence_bias=[[[t], v] for t, v in b.items()])
        refs.append(out[0, len(p):].tolist())
    dep = start_deployment(path, 2, "--microbatch-size", "4", "--max-seq-len", "64")

    async def scenario():  # type: ignore[no-untyped-def]
        async with AsyncClient(dep.address, timeout=60) as c:
            got = await asyncio.gather(*(c.generate(prompt_token_ids=p, max_new_tokens=NEW, ignore_eos=True,
                                                    logit_bias=b, logprobs=0) for p, b in zip(PROMPTS, biases)))
            seeded = [await c.generate(prompt_token_ids=PROMPTS[0], max_new_tokens=NEW, temperature=1.0, seed=4,
                                       ignore_eos=True, logit_bias={9: 5.0}) for _ in range(2)]
            with pytest.raises(BadRequestError, match="outside"):  # the controller's check: the vocabulary
                await c.generate(prompt_token_ids=[1], logit_bias={10**6: 1.0})
            with pytest.raises(BadRequestError, match="must be a number"):  # the client's own
                c.stream(prompt_token_ids=[1], logit_bias={3: 200})
            after = await c.generate(prompt_token_ids=PROMPTS[1], max_new_tokens=NEW, ignore_eos=True)
        return got, seeded, after

    try:
        got, seeded, after = asyncio.run(scenario())
    finally:
        assert dep.stop() == 0
    assert [list(r.token_ids) for r in got] == refs
    for p, b, r in zip(PROMPTS, biases, got):
        banned = [t for t, v in b.items() if v == -100.0]
        assert not set(banned) & set(r.token_ids)
        ref = hf_logprobs(hf, p, list(r.token_ids))  # the model's own distribution, not the biased one
        assert all(abs(lp.logprob - ref[i, t].item()) < 1e-4 for i, (t, lp) in enumerate(zip(r.token_ids, r.logprobs)))
    assert seeded[0].token_ids == seeded[1].token_ids
    assert list(after.token_ids) == plain[1], "it keeps serving after a refusal"
