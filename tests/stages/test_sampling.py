"""Sampling: reproducible per (seed, position) and independent of batch composition; temperature / top-k /
top-p semantics; bad parameters; stopping on EOS, stop ids and max_new_tokens.

The statistical checks draw over a fixed range of seeds: the noise is a pure function of (seed, position,
token), so they are deterministic (never flaky) and the bounds are ~4 standard deviations wide.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from bus.stopping import LENGTH, STOP
from stages.errors import InvalidRequestError
from stages.generate import GenerationRequest, LocalPipeline, generate
from stages.layers.sampling import SamplingParams, sample, token_logprobs, uniform_noise

PROMPTS = [[5, 17, 42, 99, 3, 8, 150], [7, 11], [100, 1, 60, 61, 62, 63, 64, 65, 66, 67, 68], [9]]
NEW = 12


@pytest.fixture(scope="module")
def pipe(model_factory) -> LocalPipeline:  # type: ignore[no-untyped-def]
    return LocalPipeline(model_factory("llama"), 2, num_slots=6, max_seq_len=64)


def _run(pipe: LocalPipeline, reqs: list[GenerationRequest]) -> list[list[int]]:
    return [r.token_ids for r in generate(pipe, reqs)]


# --- reproducibility ------------------------------------------------------------------------------------------


def test_seeded_sampling_is_reproducible_and_batch_independent(pipe: LocalPipeline) -> None:
    a = GenerationRequest(PROMPTS[0], NEW, SamplingParams(1.0, 0, 1.0, 7))
    b = GenerationRequest(PROMPTS[1], NEW, SamplingParams(0.7, 20, 0.9, 123))
    c = GenerationRequest(PROMPTS[2], NEW, SamplingParams(1.3, 0, 0.8, 2**64 - 1))  # top seed bit set
    g = GenerationRequest(PROMPTS[3], NEW)  # greedy
    alone = {name: _run(pipe, [r])[0] for name, r in zip("abcg", (a, b, c, g))}
    assert _run(pipe, [a])[0] == alone["a"], "same request twice: same tokens"
    assert len(set(alone["a"])) > 3, "sampled output should vary"

    # different batch partners, orders and slots, greedy rows mixed in
    for order in ("abcg", "gcab", "bga", "cag"):
        reqs = {"a": a, "b": b, "c": c, "g": g}
        got = _run(pipe, [reqs[n] for n in order])
        for name, tokens in zip(order, got):
            assert tokens == alone[name], f"{name} in batch {order}"

    # the noise depends on (seed, position) only: the same request twice in one batch draws the same tokens
    twin = _run(pipe, [a, g, a])
    assert twin[0] == twin[2] == alone["a"]

    # and a different seed gives a different stream
    other = GenerationRequest(PROMPTS[0], NEW, SamplingParams(1.0, 0, 1.0, 8))
    assert _run(pipe, [other])[0] != alone["a"]


def test_greedy_is_argmax_whatever_the_other_knobs() -> None:
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(0))
    params = [SamplingParams(0.0, k, p, s) for k, p, s in [(0, 1.0, 0), (3, 0.5, 1), (1, 0.1, 2)] * 2]
    assert torch.equal(sample(logits, params, [4] * 6), logits.argmax(-1))


def test_noise_is_a_function_of_seed_and_position() -> None:
    seeds = torch.tensor([1, 2, 1, 1, -5])
    pos = torch.tensor([10, 10, 10, 11, 10])
    u = uniform_noise(seeds, pos, 64)
    assert torch.equal(u[0], u[2])
    assert not torch.equal(u[0], u[1]) and not torch.equal(u[0], u[3]) and not torch.equal(u[0], u[4])
    assert torch.equal(uniform_noise(seeds[2:3], pos[2:3], 64)[0], u[0]), "row independent of its batch"
    assert ((u > 0) & (u < 1)).all()


# --- semantics ------------------------------------------------------------------------------------------------

N = 4000  # draws per statistical check (seeds 0..N-1)


def _draw(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
          position: int = 17) -> torch.Tensor:
    """Sample one row of logits N times, over seeds 0..N-1 at a fixed position."""
    params = [SamplingParams(temperature, top_k, top_p, s) for s in range(N)]
    return sample(logits.expand(N, -1).contiguous(), params, [position] * N)


def _freq(tokens: torch.Tensor, vocab: int) -> torch.Tensor:
    return torch.bincount(tokens, minlength=vocab).double() / tokens.numel()


def _bound(p: torch.Tensor) -> torch.Tensor:
    return 4 * torch.sqrt(p * (1 - p) / N) + 1e-3


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
def test_temperature_gives_the_softmax_distribution(temperature: float) -> None:
    probs = torch.tensor([0.05, 0.4, 0.1, 0.3, 0.15], dtype=torch.float64)
    logits = probs.log().float()[None, :]
    want = torch.softmax(probs.log() / temperature, dim=-1)
    got = _freq(_draw(logits, temperature), 5)
    assert ((got - want).abs() <= _bound(want)).all(), (got, want)


def test_positions_give_fresh_draws() -> None:
    """One seed over many positions is as well distributed as many seeds at one position."""
    probs = torch.tensor([0.6, 0.25, 0.15], dtype=torch.float64)
    logits = probs.log().float().expand(N, -1).contiguous()
    tokens = sample(logits, [SamplingParams(1.0, 0, 1.0, 42)] * N, list(range(N)))
    assert ((_freq(tokens, 3) - probs).abs() <= _bound(probs)).all()


def test_top_k_never_leaves_the_k_best() -> None:
    gen = torch.Generator().manual_seed(1)
    rows, vocab = 500, 40
    logits = torch.randn(rows, vocab, generator=gen)
    for k in (1, 3, 7):
        params = [SamplingParams(50.0, k, 1.0, s) for s in range(rows)]  # near-flat: noise dominates
        tokens = sample(logits, params, list(range(rows)))
        best = logits.topk(k, dim=-1).indices
        assert (best == tokens[:, None]).any(dim=-1).all()
        if k > 1:
            assert len(set(tokens.tolist())) > k, "should still sample, not collapse to argmax"
    assert torch.equal(sample(logits, [SamplingParams(5.0, 1, 1.0, s) for s in range(rows)], [0] * rows),
                       logits.argmax(-1))
    # k >= vocab is the same as off
    off = sample(logits, [SamplingParams(2.0, 0, 1.0, s) for s in range(rows)], [3] * rows)
    big = sample(logits, [SamplingParams(2.0, vocab + 5, 1.0, s) for s in range(rows)], [3] * rows)
    assert torch.equal(off, big)


def test_top_k_renormalises_over_the_kept_tokens() -> None:
    probs = torch.tensor([0.1, 0.4, 0.2, 0.3], dtype=torch.float64)
    got = _freq(_draw(probs.log().float()[None, :], top_k=2), 4)
    want = torch.tensor([0.0, 4 / 7, 0.0, 3 / 7], dtype=torch.float64)
    assert ((got - want).abs() <= _bound(want)).all(), got


@pytest.mark.parametrize(
    "top_p,kept",
    [(0.45, {1}), (0.52, {1, 3}), (0.79, {1, 3}), (0.81, {1, 3, 0}), (0.96, {0, 1, 2, 3}),
     (1e-6, {1})],
)
def test_top_p_keeps_the_smallest_nucleus(top_p: float, kept: set[int]) -> None:
    """probs 0.15 / 0.5 / 0.05 / 0.3: the kept set is the fewest most likely tokens holding >= top_p."""
    probs = torch.tensor([0.15, 0.5, 0.05, 0.3], dtype=torch.float64)
    got = _freq(_draw(probs.log().float()[None, :], top_p=top_p), 4)
    assert {i for i in range(4) if got[i] > 0} == kept
    mass = probs[sorted(kept)].sum()
    want = torch.zeros(4, dtype=torch.float64)
    want[sorted(kept)] = probs[sorted(kept)] / mass
    assert ((got - want).abs() <= _bound(want)).all(), (got, want)


def test_top_k_and_top_p_together() -> None:
    probs = torch.tensor([0.15, 0.5, 0.05, 0.3], dtype=torch.float64)
    # top-k 3 first (renormalised: 0.15/0.95, 0.5/0.95, 0.3/0.95), then top-p 0.8 of that keeps {1, 3}
    got = _freq(_draw(probs.log().float()[None, :], top_k=3, top_p=0.8), 4)
    assert got[0] == 0 and got[2] == 0
    assert abs(got[1] - 0.5 / 0.8) <= 0.04


# --- bad parameters -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"temperature": -0.1}, {"temperature": math.nan}, {"temperature": math.inf}, {"temperature": 101.0},
        {"temperature": "1"}, {"top_k": -1}, {"top_k": 2.5}, {"top_p": 0.0}, {"top_p": 1.5},
        {"top_p": math.nan}, {"top_p": -0.5}, {"seed": -1}, {"seed": 2**64}, {"seed": 1.5},
        {"logprobs": -1}, {"logprobs": 21}, {"logprobs": True},
    ],
)
def test_bad_sampling_parameters(kwargs: dict[str, object]) -> None:
    with pytest.raises(InvalidRequestError, match=next(iter(kwargs))):
        SamplingParams(**kwargs)  # type: ignore[arg-type]


def test_extreme_valid_parameters() -> None:
    logits = torch.randn(3, 30, generator=torch.Generator().manual_seed(2))
    params = [SamplingParams(100.0, 0, 1.0, 0), SamplingParams(1e-4, 0, 1.0, 2**64 - 1), SamplingParams(1.0, 0, 1.0, 0)]
    tokens = sample(logits, params, [0, 1, 2])
    assert tokens.dtype == torch.long and ((tokens >= 0) & (tokens < 30)).all()
    assert tokens[1] == logits[1].argmax()  # a tiny temperature is (almost surely) greedy


def test_logprobs_are_the_models_distribution_for_the_rows_that_ask_only() -> None:
    """log_softmax of the raw logits in float32 (not of logits / temperature), the sampled token's and the top N
    most likely first; rows that ask nothing get None, and a batch where none asks computes nothing."""
    logits = (torch.randn(4, 30, generator=torch.Generator().manual_seed(3)) * 4).to(torch.bfloat16)
    params = [SamplingParams(0.0, logprobs=2), SamplingParams(0.7, 5, 0.9, 3), SamplingParams(1.5, seed=4, logprobs=0),
              SamplingParams(1.0, seed=5, logprobs=20)]
    tokens = sample(logits, params, [1, 2, 3, 4])
    got = token_logprobs(logits, tokens, [p.logprobs for p in params])
    ref = torch.log_softmax(logits.float(), dim=-1)
    assert got[1] is None
    for row in (0, 2, 3):
        lp, ids, lps = got[row]  # type: ignore[misc]
        assert lp == pytest.approx(ref[row, tokens[row]].item(), abs=1e-6)
        n = params[row].logprobs
        assert len(ids) == len(lps) == n and lps == sorted(lps, reverse=True)
        assert lps == pytest.approx(ref[row].topk(n).values.tolist(), abs=1e-6) if n else ids == []
        assert all(ref[row, i].item() == pytest.approx(v, abs=1e-6) for i, v in zip(ids, lps))
    assert got[0][1][0] == tokens[0]  # type: ignore[index]  # greedy: the sampled token is the likeliest
    assert token_logprobs(logits, tokens, [None] * 4) == [None] * 4


# --- stopping -------------------------------------------------------------------------------------------------


def _greedy_and_stop_token(pipe: LocalPipeline) -> tuple[list[int], int, int]:
    """Greedy output of PROMPTS[0] and a token that first appears at index >= 2 of it."""
    out = _run(pipe, [GenerationRequest(PROMPTS[0], NEW)])[0]
    for i, t in enumerate(out):
        if i >= 2 and out.index(t) == i:
            return out, t, i
    raise AssertionError(f"greedy output too repetitive for a stop test: {out}")


def test_stop_on_max_new_tokens(pipe: LocalPipeline) -> None:
    for n in (1, 5):
        [res] = generate(pipe, [GenerationRequest(PROMPTS[1], n)])
        assert len(res.token_ids) == n and res.finish_reason == LENGTH


def test_stop_on_stop_ids(pipe: LocalPipeline) -> None:
    out, t, i = _greedy_and_stop_token(pipe)
    reqs = [GenerationRequest(PROMPTS[0], NEW, stop_token_ids=(t, 99999)), GenerationRequest(PROMPTS[2], NEW)]
    res = generate(pipe, reqs)
    assert res[0].token_ids == out[: i + 1] and res[0].finish_reason == STOP  # the stop token is included
    assert len(res[1].token_ids) == NEW and res[1].finish_reason == LENGTH  # its neighbour runs on
    # a stop token that is also the last allowed one counts as a stop
    [res0] = generate(pipe, [GenerationRequest(PROMPTS[0], i + 1, stop_token_ids=(t,))])
    assert res0.finish_reason == STOP


def test_stop_on_eos_from_the_model_directory(pipe: LocalPipeline, model_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    out, t, i = _greedy_and_stop_token(pipe)
    path = shutil.copytree(model_factory("llama"), tmp_path / "m")
    for name in ("config.json", "generation_config.json"):
        raw = json.loads((path / name).read_text())
        raw["eos_token_id"] = [12345, t] if name == "generation_config.json" else t
        (path / name).write_text(json.dumps(raw))
    eos_pipe = LocalPipeline(path, 1, num_slots=1, max_seq_len=64)
    assert t in eos_pipe.spec.eos_token_ids
    [res] = generate(eos_pipe, [GenerationRequest(PROMPTS[0], NEW)])
    assert res.token_ids == out[: i + 1] and res.finish_reason == STOP


def test_stop_when_the_slot_is_full(model_factory) -> None:  # type: ignore[no-untyped-def]
    """A sequence may grow to max_seq_len tokens; then it ends with reason 'length'."""
    prompt = PROMPTS[0]
    small = LocalPipeline(model_factory("llama"), 1, num_slots=1, max_seq_len=len(prompt) + 3)
    [res] = generate(small, [GenerationRequest(prompt, NEW)])
    assert len(res.token_ids) == 3 and res.finish_reason == LENGTH
