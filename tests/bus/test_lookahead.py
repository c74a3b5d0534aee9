"""Lookahead (issue 20's lean step): a one-stage pipeline (or a disaggregated deployment's one token stage) gets each
microbatch's next step while its current one runs, and the stage feeds back the tokens it sampled. The controller's side (pure), the stage's (a real shard),
and the running system (outputs equal Hugging Face greedy, stop tokens and cancellations included)."""

from __future__ import annotations

import asyncio

import pytest
import torch

from bus.client import AsyncClient
from bus.controller import Controller, ModelInfo
from bus.messages import (
    ERR_BAD_REQUEST,
    Chunk,
    GenerateRequest,
    RequestDone,
    RequestFailed,
    Sampling,
    StepRequest,
    StepResult,
    TokenChunk,
)
from bus.replication import ReplicaBook
from bus.scheduler import Scheduler
from stages.errors import StepVoid
from stages.runtime import ShardConfig
from stages.stage import StageCore
from tests.bus.test_serving import hf_greedy, workload
from tests.conftest import start_deployment

EOS = 2


def make(mbs: int = 1, size: int = 2) -> Controller:
    sched = Scheduler(mbs, size)
    sched.enable_lookahead(64)
    core = Controller(ModelInfo(100, (EOS,), 64), sched)
    core.pipeline_up(1, 0.0)
    return core


def req(rid: str, ids: list[int], n: int = 3) -> GenerateRequest:
    return GenerateRequest(rid, prompt_token_ids=ids, max_new_tokens=n)


def answer(core: Controller, step: StepRequest, tokens: list[int]) -> None:
    core.on_result(StepResult(step.epoch, step.mb, step.step, tokens), 1.0)


def chunks(step: StepRequest) -> list[tuple[int, int, int]]:
    return [(c.slot, c.start, c.length) for c in step.chunks]


def ended(out) -> dict[str, str]:  # type: ignore[no-untyped-def]
    return {m.request_id: m.finish_reason for _, m in out if isinstance(m, RequestDone)}


def test_the_next_step_leaves_with_the_current_one_and_is_fed_its_tokens() -> None:
    core = make()
    core.submit(b"c", req("a", [5, 6, 7], n=4), 0.0)
    s1, s2 = core.outbox.drain()[0]
    assert chunks(s1) == [(0, 0, 3)] and s1.token_ids == [5, 6, 7] and not s1.fed
    assert (s2.step, chunks(s2), s2.fed) == (s1.step + 1, [(0, 3, 1)], [0])  # a's token of s1, fed back on the stage
    answer(core, s1, [11])
    (s3,), out = core.outbox.drain()  # s2 is in flight now; s3 goes behind it
    assert out == [(b"c", TokenChunk("a", 0, [11], None))]
    assert (chunks(s3), s3.fed) == ([(0, 4, 1)], [0])
    answer(core, s2, [12])
    (s4,), _ = core.outbox.drain()
    assert chunks(s4) == [(0, 5, 1)]
    answer(core, s3, [13])  # a's 4th token comes from s4: no step after it is sent
    assert core.outbox.drain()[0] == []
    answer(core, s4, [14])
    steps, out = core.outbox.drain()
    assert steps == [] and ended(out) == {"a": "length"} and core.dropped_rows == 0
    assert [m.token_ids for _, m in out if isinstance(m, TokenChunk)] == [[14]]


def test_a_stop_token_costs_one_dropped_row_and_the_slot_frees_after_it() -> None:
    core = make(size=1)
    core.submit(b"c", req("a", [5], n=9), 0.0)
    core.submit(b"c", req("b", [6, 7], n=2), 0.0)
    s1, s2 = core.outbox.drain()[0]
    answer(core, s1, [EOS])  # a stops; s2 (already sent) holds its slot
    steps, out = core.outbox.drain()
    assert steps == [] and ended(out) == {"a": "stop"}
    answer(core, s2, [33])  # a's extra row: dropped, never sent to the client
    (s3, s4), out = core.outbox.drain()
    assert out == [] and core.dropped_rows == 1
    assert (chunks(s3), s3.token_ids, s3.fed) == ([(0, 0, 2)], [6, 7], None) and s4.fed == [0]


def test_a_cancel_in_flight_ends_the_request_once() -> None:
    core = make(size=1)
    core.submit(b"c", req("a", [5], n=9), 0.0)
    s1, s2 = core.outbox.drain()[0]
    core.cancel(b"c", "a", 0.5)
    answer(core, s1, [10])
    _, out = core.outbox.drain()
    assert ended(out) == {"a": "cancelled"} and not any(isinstance(m, TokenChunk) for _, m in out)
    answer(core, s2, [11])
    assert core.outbox.drain() == ([], []) and all(not mb.members for mb in core.sched.mbs)


def test_a_failed_step_voids_its_lookahead_and_a_void_step_is_fed_again() -> None:
    core = make(size=2)
    core.submit(b"c", req("a", [5], n=9), 0.0)
    s1, s2 = core.outbox.drain()[0]
    core.submit(b"c", req("b", [6, 7], n=9), 0.0)  # admitted into the next lookahead step
    answer(core, s1, [10])
    (s3,), _ = core.outbox.drain()
    assert chunks(s3) == [(0, 2, 1), (1, 0, 2)] and s3.fed == [0, -1]
    core.fail_microbatch(s2.mb, s2.step, ERR_BAD_REQUEST, "bad")  # a fails; s3 was built on s2's tokens: void
    core.schedule(1.5)  # (as the controller's shell does after a StepFailed)
    (s4, s5), out = core.outbox.drain()
    assert [m.request_id for _, m in out if isinstance(m, RequestFailed)] == ["a"]
    assert (chunks(s4), s4.token_ids, s4.fed) == ([(1, 0, 2)], [6, 7], None)  # b from its prompt, not fed
    answer(core, s3, [1, 2])  # (the stage ran the void step anyway: stale)
    assert core.outbox.drain() == ([], [])
    core.void_step(s4.mb, s4.step, 2.0)  # the stage did not run s4 (ERR_STEP_VOID): b is fed again, s5 is void too
    (s6, s7), _ = core.outbox.drain()
    assert (chunks(s6), s6.token_ids, s6.fed) == ([(1, 0, 2)], [6, 7], None) and s7.fed == [0]
    answer(core, s5, [3])
    answer(core, s6, [20])
    _, out = core.outbox.drain()
    assert out == [(b"c", TokenChunk("b", 0, [20], None))]


def test_a_new_epoch_voids_both_steps_and_starts_unfed() -> None:
    core = make(size=1)
    core.submit(b"c", req("a", [5, 6], n=9), 0.0)
    s1, s2 = core.outbox.drain()[0]
    answer(core, s1, [10])
    core.outbox.drain()
    core.pipeline_down()
    core.pipeline_up(2, 1.0, keep_cache=True)  # a holds 3 positions: prompt + its first token, fed from position 2
    s, ahead = core.outbox.drain()[0]
    assert (s.epoch, chunks(s), s.token_ids, s.fed) == (2, [(0, 2, 1)], [10], None) and ahead.fed == [0]


def test_the_replica_book_records_the_lookahead_rows() -> None:
    sched = Scheduler(1, 1)
    sched.enable_lookahead(64)
    core = Controller(ModelInfo(100, (EOS,), 64), sched)
    core.book = ReplicaBook(1)
    core.pipeline_up(1, 0.0)
    core.submit(b"c", req("a", [5, 6, 7], n=9), 0.0)
    s1, s2 = core.outbox.drain()[0]
    spans = {step: [(start, end) for _, start, end in members] for step, (_, members) in core.book.history[0].items()}
    assert spans == {s1.step: [(0, 3)], s2.step: [(3, 4)]}


# ---------------------------------------------------------------- the stage


def test_the_stage_feeds_back_its_samples_and_refuses_a_step_it_cannot_feed(model_factory) -> None:  # type: ignore[no-untyped-def]
    path = model_factory("llama")
    core = StageCore(ShardConfig(path, num_slots=2, max_seq_len=32))
    ref = StageCore(ShardConfig(path, num_slots=2, max_seq_len=32))
    greedy = [Sampling(), Sampling()]
    first = StepRequest(1, 0, 1, [Chunk(0, 0, 3), Chunk(1, 0, 2)], [5, 6, 7, 8, 9], greedy)
    t1 = core.run(first, None).tokens
    assert t1 == ref.run(first, None).tokens and t1 is not None
    fed = StepRequest(1, 0, 2, [Chunk(1, 2, 1), Chunk(0, 3, 1)], [0, 0], greedy, fed=[1, 0])
    given = StepRequest(1, 0, 2, [Chunk(1, 2, 1), Chunk(0, 3, 1)], [t1[1], t1[0]], greedy)
    assert core.run(fed, None).tokens == ref.run(given, None).tokens
    with pytest.raises(StepVoid):  # step 3's predecessor (step 2) sampled, but a step 4 has none
        core.run(StepRequest(1, 0, 4, [Chunk(0, 4, 1)], [0], greedy[:1], fed=[0]), None)
    with pytest.raises(StepVoid):  # another epoch's samples never feed a step
        core.run(StepRequest(2, 0, 3, [Chunk(0, 4, 1)], [0], greedy[:1], fed=[0]), None)
    assert torch.equal(core.runtime.pool.data, ref.runtime.pool.data)


def test_lookahead_applies_where_one_stage_takes_token_ids_and_samples() -> None:
    """`auto` turns it on for GPUs where one stage both takes token ids and samples: a one-stage pipeline, or a
    disaggregated deployment's one token stage; never across a pipeline of several (token) stages."""
    from recovery.specs import DeploymentConfig

    def on(**kw) -> bool:  # type: ignore[no-untyped-def]
        return DeploymentConfig("model", **kw).lookahead_on

    assert on(device="cuda") and not on() and on(lookahead="on")
    assert on(device="cuda", num_stages=3, prompt_stages=2, token_stages=1)
    assert not on(device="cuda", num_stages=2) and not on(device="cuda", num_stages=3, prompt_stages=1, token_stages=2)
    assert not on(device="cuda", lookahead="off")


# ---------------------------------------------------------------- the running system


@pytest.mark.parametrize("stages,defer", [(1, "on"), (2, "on"), ("1/1", "on")])
def test_served_outputs_equal_hf_with_stop_tokens_and_cancels(stages: int | str, defer: str, model_factory) -> None:  # type: ignore[no-untyped-def]
    """36 requests on 4-slot microbatches: each one's own stop token (its 3rd greedy token, so it stops early and
    a lookahead row sent behind that token is dropped) for a third of them; 4 more cancelled mid-run. One stage
    with lookahead (the path GPU deployments take; `auto` keeps it off on CPU), two stages (no lookahead there),
    one prompt stage and one token stage (lookahead on the token stage: requests join it as their KV lands), the
    last stage's tokens deferred in all (it launches the next step first, as GPU stages do)."""
    path = model_factory("llama")
    from stages.models import load_spec

    work = workload(load_spec(path)[1].vocab_size)
    refs = hf_greedy(path, work)
    stops = {i: refs[i][2] for i in range(0, len(work), 3) if len(refs[i]) > 3}
    disagg = ["--prompt-stages", "1", "--token-stages", "1"] if stages == "1/1" else []
    dep = start_deployment(path, 2 if disagg else int(stages), *disagg, "--microbatch-size", "4", "--max-seq-len", "96",
                           "--defer-tokens", defer, "--lookahead", "on")  # (auto: GPUs only)

    async def go():  # type: ignore[no-untyped-def]
        async with AsyncClient(dep.address, timeout=120) as c:
            runs = [asyncio.ensure_future(c.generate(prompt_token_ids=p, max_new_tokens=n,
                                                     stop_token_ids=[stops[i]] if i in stops else []))
                    for i, (p, n) in enumerate(work)]
            async def cancelled_after_its_first_token() -> None:
                stream = c.stream(prompt_token_ids=[5, 6, 7], max_new_tokens=60, ignore_eos=True)
                await anext(stream)
                await stream.aclose()  # (sends CancelRequest while its next rows are in flight)

            extra = [asyncio.ensure_future(cancelled_after_its_first_token()) for _ in range(4)]
            results = await asyncio.gather(*runs)
            await asyncio.gather(*extra)
            return results, await c.status()

    try:
        results, st = asyncio.run(go())
    finally:
        assert dep.stop() == 0
    for i, (res, ref) in enumerate(zip(results, refs)):
        want = ref[: ref.index(stops[i]) + 1] if i in stops else ref
        assert list(res.token_ids) == want, f"request {i}"
    # a stop that is not also the request's last allowed token had its next row sent already
    early = sum(1 for i in stops if refs[i].index(stops[i]) + 1 < work[i][1])
    ahead = stages != 2
    assert early > 0 and st["lookahead"] == ahead
    assert st["lookahead_dropped_rows"] >= early if ahead else st["lookahead_dropped_rows"] == 0
