"""The disaggregated scheduler in the controller's core: prompt passes with receive slots, KV landing, joining the
token pipeline, back-pressure, quarantine of slots a late transfer could still write, failures, epochs."""

from __future__ import annotations

from bus.controller import Controller, ModelInfo
from bus.disagg import MAX_PROMPT_TRIES, DisaggScheduler
from bus.messages import (
    ERR_BAD_REQUEST,
    ERR_SERVER,
    GenerateRequest,
    KvSent,
    RequestDone,
    RequestFailed,
    StepRequest,
    StepResult,
    TokenChunk,
)

EOS = 2
DP = 2  # prompt stages


def make(mbs: int = 2, size: int = 2, pmbs: int = 2, psize: int = 2) -> Controller:
    core = Controller(ModelInfo(100, (EOS,), 64), DisaggScheduler(mbs, size, DP, pmbs, psize))
    core.pipeline_up(1, 0.0)
    return core


def req(rid: str, ids: list[int], n: int = 3) -> GenerateRequest:
    return GenerateRequest(rid, prompt_token_ids=ids, max_new_tokens=n)


def answer(core: Controller, step, tokens: list[int]) -> None:  # type: ignore[no-untyped-def]
    core.on_result(StepResult(step.epoch, step.mb, step.step, tokens), 1.0)


def landed(core: Controller, step, ok: bool = True, stages=range(DP)) -> None:  # type: ignore[no-untyped-def]
    """Every prompt stage reports the pass (a StepRequest) or the move (a KvMove: mb -1, step = move id)."""
    mb, number = (step.mb, step.step) if isinstance(step, StepRequest) else (-1, step.move)
    for x in stages:
        core.on_kv_sent(x, KvSent(step.epoch, mb, number, ok, 100, "" if ok else "lost"), 1.0)


def test_a_prompt_pass_reserves_receive_slots_and_the_request_joins_once_its_kv_landed() -> None:
    core = make()
    core.submit(b"c", req("a", [5, 6, 7]), 0.0)
    (p,), _ = core.outbox.drain()
    assert p.mb == 2 and [(c.slot, c.start, c.length) for c in p.chunks] == [(0, 0, 3)] and p.kv_to == [0]
    assert p.token_ids == [5, 6, 7]
    answer(core, p, [11])  # the first token reaches the client at once...
    steps, out = core.outbox.drain()
    assert out == [(b"c", TokenChunk("a", 0, [11], None))] and steps == []  # ...but the KV has not landed
    landed(core, p, stages=[0])
    assert core.outbox.drain() == ([], [])
    landed(core, p, stages=[1])
    (s,), _ = core.outbox.drain()  # joined: its first decode step feeds the sampled token at position 3
    assert s.mb == 0 and s.kv_to is None and [(c.slot, c.start, c.length) for c in s.chunks] == [(0, 3, 1)]
    assert s.token_ids == [11]
    assert core.sched.landed_bytes == 200  # type: ignore[attr-defined]
    # its first token step says it joined (a replicating token stage sends rows [0, 4) of it); once that step came
    # back, the next ones do not
    assert s.joined == [0]
    answer(core, s, [12])
    (s2,), _ = core.outbox.drain()
    assert [(c.slot, c.start, c.length) for c in s2.chunks] == [(0, 4, 1)] and s2.joined is None


def joined_first_step(core):  # type: ignore[no-untyped-def]
    """Request "a" (prompt [5, 6, 7], 4 tokens) through its prompt pass: first token 11, its KV landed; the token
    pipeline's first step of it (the one that marks it joined)."""
    core.submit(b"c", req("a", [5, 6, 7], n=4), 0.0)
    (p,), _ = core.outbox.drain()
    answer(core, p, [11])
    landed(core, p)
    (s,), _ = core.outbox.drain()
    return s


def test_the_replica_book_counts_a_joined_request_from_position_0() -> None:
    """The token stage replicates a joined chunk's prompt rows with its step's: an acknowledged step counts
    [0, end) of it, and the next deltas extend that prefix."""
    from bus.replication import ReplicaBook

    core = make()
    core.book = book = ReplicaBook(DP + 1)
    s = joined_first_step(core)
    answer(core, s, [12])
    (s2,), _ = core.outbox.drain()
    (request,) = core.sched.running()
    book.ack(DP, [[s.epoch, s.mb, s.step]], False)
    assert book.valid(DP, request) == 4
    book.ack(DP, [[s2.epoch, s2.mb, s2.step]], False)
    assert book.valid(DP, request) == 5


def test_kv_reports_may_come_before_the_first_token() -> None:
    core = make()
    core.submit(b"c", req("a", [5, 6]), 0.0)
    (p,), _ = core.outbox.drain()
    landed(core, p)
    assert core.outbox.drain() == ([], [])
    answer(core, p, [11])
    (s,), _ = core.outbox.drain()
    assert [(c.slot, c.start, c.length) for c in s.chunks] == [(0, 2, 1)]


def test_a_full_token_pipeline_parks_prompts_and_moves_their_kv_when_a_slot_frees() -> None:
    """2 receive slots, 4 requests: the first two stream as their passes run, the others' passes still run (the
    prompt side runs ahead) and their KV waits in the prompt slots (parked) until decodes free receive slots; then
    one KvMove per batch of parked prompts. Prompt slots bound how far it runs ahead."""
    core = make(mbs=2, size=1, pmbs=2, psize=2)  # 2 receive slots, 4 prompt slots
    for i in range(5):
        core.submit(b"c", req(f"r{i}", [5 + i], n=2), 0.0)
    steps, _ = core.outbox.drain()
    assert [(s.mb, s.kv_to) for s in steps] == [(2, [0]), (3, [1])]  # each pass took one request as it came
    sched = core.sched
    p0, p1 = steps
    answer(core, p0, [20])
    landed(core, p0)
    steps, _ = core.outbox.drain()  # r0 decodes; the free prompt microbatch runs r2 and r3 without receive slots
    assert sorted((s.mb, tuple(s.kv_to or ())) for s in steps) == [(0, ()), (2, (-1, -1))]
    p2 = next(s for s in steps if s.mb == 2)
    assert [c.slot for c in p2.chunks] == [2, 3] and sched.receive_waits == 2  # type: ignore[attr-defined]
    answer(core, p2, [21, 22])  # their first tokens reach the clients at once
    landed(core, p2)  # (nothing moved: the prompt stages report at once)
    assert sched.receive_waiting == 2 and [m.move for m in core.outbox.moves] == []  # type: ignore[attr-defined]
    s0 = next(s for s in steps if s.mb == 0)
    answer(core, s0, [EOS])  # r0 ends: its receive slot frees, r2's parked KV moves there
    steps, out = core.outbox.drain()
    (mv,) = core.outbox.moves
    core.outbox.moves.clear()
    assert (mv.move, [(c.slot, c.start, c.length) for c in mv.chunks], mv.kv_to) == (1, [(2, 0, 1)], [0])
    assert sched.receive_waiting == 1  # type: ignore[attr-defined]
    # r4 found the prompt pool with 1 free slot (r3 holds one, r2 one until its move is reported): the pass runs
    assert [(s.mb, s.kv_to) for s in steps] == [(2, [-1])] and steps[0].token_ids == [9]
    landed(core, mv)  # the move is reported (KvSent mb=-1, step=move id): r2 joins and decodes its first token
    steps, _ = core.outbox.drain()
    assert [(s.mb, [(c.slot, c.start, c.length) for c in s.chunks], s.token_ids) for s in steps] == \
        [(0, [(0, 1, 1)], [21])]


def test_kv_that_did_not_land_runs_the_prompt_again_after_a_pause_then_fails_the_request() -> None:
    core = make(mbs=1, size=1, pmbs=1, psize=1)
    core.submit(b"c", req("a", [5, 6], n=9), 0.0)
    (p,), _ = core.outbox.drain()
    answer(core, p, [11])
    landed(core, p, ok=False)  # at t=1
    assert core.outbox.drain()[0] == []  # a pause first: what failed (a streamer) may be on its way down
    core.schedule(1.5)
    assert core.outbox.drain()[0] == []
    core.schedule(2.0)
    (p2,), out = core.outbox.drain()  # the first token is committed; the pass runs again over prompt + it
    assert p2.token_ids == [5, 6, 11] and p2.kv_to == [0]
    now = 2.0
    for _ in range(MAX_PROMPT_TRIES - 1):
        answer(core, p2, [12])
        landed(core, p2, ok=False)
        now += 10.0
        core.schedule(now)
        steps, out = core.outbox.drain()
        if steps:
            p2 = steps[0]
    assert any(isinstance(m, RequestFailed) and m.code == ERR_SERVER and "did not reach" in m.message
               for _, m in out)
    assert core.requests == {}


def test_a_pass_a_stage_refused_frees_its_slots_once_the_stages_before_it_reported() -> None:
    core = make(mbs=1, size=1, pmbs=1, psize=1)
    core.submit(b"c", req("a", [5]), 0.0)
    core.submit(b"c", req("b", [6]), 0.0)
    (p,), _ = core.outbox.drain()
    core.sched.prompt_failed(p.mb, p.step, 0)  # type: ignore[attr-defined]
    core.fail_microbatch(p.mb, p.step, ERR_BAD_REQUEST, "stage 0: bad")
    core.schedule(1.0)
    steps, out = core.outbox.drain()
    assert steps == [] and [type(m) for _, m in out] == [RequestFailed]
    landed(core, p, ok=False, stages=[0])  # stage 0 ran it (and cancelled its transfer); stage 1 never got it
    (p2,), _ = core.outbox.drain()
    assert p2.token_ids == [6] and p2.kv_to == [0]


def test_a_new_epoch_sends_prompts_in_flight_again_and_keeps_the_token_pipeline() -> None:
    core = make(mbs=1, size=2, pmbs=1, psize=1)
    core.submit(b"c", req("a", [5, 6], n=9), 0.0)
    (p,), _ = core.outbox.drain()
    answer(core, p, [11])
    landed(core, p)
    (s,), _ = core.outbox.drain()
    core.submit(b"c", req("b", [7]), 0.0)
    (pb,), _ = core.outbox.drain()
    core.pipeline_down()
    core.pipeline_up(2, 2.0, keep_cache=True)
    steps, _ = core.outbox.drain()
    by_mb = {st.mb: st for st in steps}
    assert [(c.slot, c.start, c.length) for c in by_mb[0].chunks] == [(0, 2, 1)]  # a goes on where it was
    assert by_mb[1].token_ids == [7] and by_mb[1].epoch == 2  # b's prompt runs again
    core.pipeline_down()
    core.pipeline_up(3, 3.0, keep_cache=False)  # the token pipeline lost its KV: recomputed there
    steps, _ = core.outbox.drain()
    by_mb = {st.mb: st for st in steps}
    assert [(c.slot, c.start, c.length) for c in by_mb[0].chunks] == [(0, 0, 3)] and by_mb[0].token_ids == [5, 6, 11]


def test_a_cancelled_landing_request_keeps_its_slot_quarantined_until_its_kv_is_reported() -> None:
    core = make(mbs=1, size=1, pmbs=2, psize=1)
    core.submit(b"c", req("a", [5]), 0.0)
    (p,), _ = core.outbox.drain()
    core.cancel(b"c", "a", 0.5)
    _, out = core.outbox.drain()
    assert out == [(b"c", RequestDone("a", "cancelled", 1, 0))]
    core.submit(b"c", req("b", [6]), 0.6)
    (pb,), _ = core.outbox.drain()
    assert pb.kv_to == [-1]  # the only receive slot is quarantined: b's pass runs, its KV parked
    answer(core, p, [11])  # a's token is not committed: it was cancelled
    answer(core, pb, [12])
    landed(core, pb)
    assert core.outbox.moves == []
    landed(core, p)  # a's transfer is over: the slot is free, b's KV moves there
    core.outbox.drain()
    (mv,) = core.outbox.moves
    assert mv.kv_to == [0] and [c.slot for c in mv.chunks] == [1]


def test_a_new_epoch_after_a_failed_report_queues_the_prompt_once() -> None:
    core = make(mbs=1, size=2, pmbs=1, psize=1)
    core.submit(b"c", req("a", [5, 6], n=9), 0.0)
    (p,), _ = core.outbox.drain()
    answer(core, p, [11])
    landed(core, p, ok=False, stages=[0])  # stage 1 has not reported when the epoch ends
    core.pipeline_down()
    core.pipeline_up(2, 5.0, keep_cache=True)
    (p2,), _ = core.outbox.drain()
    assert p2.token_ids == [5, 6, 11] and list(core.sched.waiting) == []


def test_a_swapping_token_stage_restarted_before_a_joined_requests_first_step_recomputes_that_request() -> None:
    """Swapping token stages (stages/swap.py): a joined request's prompt is in the stage's receive pool until its first
    step writes [0, end) back to the swap pool, and the swap book counts only acknowledged write-backs - from 0 for a
    joined chunk. So a token stage restarted before that acknowledgement (its swap pool kept) resumes the request
    from 0, a recompute with no `joined` rows to copy; after it, from the whole prefix."""
    from bus.swap_book import SwapBook
    from stages.swap import Swapper

    core = make()
    core.swap_book = book = SwapBook(DP + 1)
    s = joined_first_step(core)
    assert s.joined == [0] and Swapper.joined(s) == {0: 3}  # rows [0, 3) come from the receive pool
    (r,) = core.sched.running()
    assert book.valid(DP, r) == 0  # killed now: the restarted stage's swap pool holds nothing of it
    core.pipeline_up(2, 2.0, keep_cache=False, valid=lambda q: book.valid(DP, q))
    (again,), _ = core.outbox.drain()
    assert [(c.start, c.length) for c in again.chunks] == [(0, 4)] and again.token_ids == [5, 6, 7, 11]
    assert again.joined == [0] and Swapper.joined(again) == {}  # still "joined", but nothing to copy: start 0
    book.ack(DP, [[again.epoch, again.mb, again.step]], False)
    assert book.valid(DP, r) == 4
    answer(core, again, [12])
    (s2,), _ = core.outbox.drain()
    assert s2.joined is None and [(c.start, c.length) for c in s2.chunks] == [(4, 1)]


def test_lookahead_on_one_token_stage_joins_requests_whose_kv_landed_and_feeds_back_the_others() -> None:
    """With lookahead (one token stage takes token ids and samples): the token microbatch's next step leaves with
    its current one. A request that joined at the step in flight is fed back its token there, not marked joined
    again; one whose KV landed since joins in the lookahead step with its first token, marked joined; a slot whose
    KV is still landing is never stepped; a lookahead step the stage did not run keeps its join for the step
    built anew."""
    core = Controller(ModelInfo(100, (EOS,), 64), DisaggScheduler(1, 4, DP, 2, 2))
    core.sched.enable_lookahead(64)
    core.pipeline_up(1, 0.0)
    core.submit(b"c", req("a", [5, 6, 7], n=6), 0.0)
    (pa,), _ = core.outbox.drain()
    answer(core, pa, [11])
    landed(core, pa)
    s1, s2 = core.outbox.drain()[0]  # a's join step and its lookahead step (fed back from s1)
    assert (s1.joined, [(c.slot, c.start, c.length) for c in s1.chunks]) == ([0], [(0, 3, 1)])
    assert (s2.joined, s2.fed, [(c.slot, c.start, c.length) for c in s2.chunks]) == (None, [0], [(0, 4, 1)])
    core.submit(b"c", req("b", [8, 9], n=5), 0.0)
    core.submit(b"c", req("d", [4, 4, 4, 4], n=5), 0.0)
    pb, pd = core.outbox.drain()[0]  # a prompt pass each; b's KV lands, d's is still landing
    assert (pb.kv_to, pd.kv_to) == ([1], [2])
    answer(core, pb, [21])
    answer(core, pd, [31])
    landed(core, pb)
    landed(core, pd, stages=[0])
    assert core.outbox.drain()[0] == []  # a's two steps are in flight
    answer(core, s1, [12])  # s2 runs now; the step behind it takes b with its first token, joined (not d)
    (s3,), _ = core.outbox.drain()
    assert [(c.slot, c.start, c.length) for c in s3.chunks] == [(0, 5, 1), (1, 2, 1)]
    assert s3.fed == [0, -1] and s3.token_ids[1:] == [21] and s3.joined == [1]
    core.void_step(s2.mb, s2.step, 1.0)  # the stage did not run s2 (so s3, fed from it, is void too)
    core.void_step(s3.mb, s3.step, 1.0)
    s4, s5 = core.outbox.drain()[0]  # built anew: a fed its known token again, b still joining
    assert [(c.slot, c.start, c.length) for c in s4.chunks] == [(0, 4, 1), (1, 2, 1)]
    assert s4.token_ids == [12, 21] and s4.joined == [1] and s4.fed is None
    assert s5.joined is None and s5.fed == [0, 1]
    landed(core, pd, stages=[1])  # d's KV is in: it joins in the step behind s5
    assert core.outbox.drain()[0] == []
    answer(core, s4, [13, 22])
    (s6,), _ = core.outbox.drain()
    assert [(c.slot, c.start, c.length) for c in s6.chunks] == [(0, 6, 1), (1, 4, 1), (2, 4, 1)]
    assert s6.fed == [0, 1, -1] and s6.token_ids[2] == 31 and s6.joined == [2]
