"""The controller's pure core: admission, steps, commits, cancellation, recovery recomputation."""

from __future__ import annotations

from bus.controller import Controller, ModelInfo
from bus.messages import (
    ERR_BAD_REQUEST,
    ERR_CANCELLED,
    ERR_OVERLOADED,
    ERR_SERVER,
    ERR_TIMEOUT,
    GenerateRequest,
    RequestDone,
    RequestFailed,
    StepResult,
    TokenChunk,
)
from bus.scheduler import Scheduler

EOS = 2


def make(mbs: int = 2, size: int = 2, chunk: int = 0, **kw) -> Controller:  # type: ignore[no-untyped-def]
    core = Controller(ModelInfo(100, (EOS,), 64), Scheduler(mbs, size, chunk), **kw)
    core.pipeline_up(1, 0.0)
    return core


def req(rid: str, ids: list[int], n: int = 3, **kw) -> GenerateRequest:  # type: ignore[no-untyped-def]
    return GenerateRequest(rid, prompt_token_ids=ids, max_new_tokens=n, **kw)


def answer(core: Controller, step, tokens: list[int], now: float = 1.0) -> None:  # type: ignore[no-untyped-def]
    core.on_result(StepResult(step.epoch, step.mb, step.step, tokens), now)


def test_requests_fill_microbatch_slots_and_steps_carry_their_tokens() -> None:
    core = make()
    core.submit(b"c", req("a", [5, 6, 7]), 0.0)
    steps, _ = core.outbox.drain()
    assert len(steps) == 1
    s = steps[0]
    assert [(c.slot, c.start, c.length) for c in s.chunks] == [(0, 0, 3)] and s.token_ids == [5, 6, 7]
    core.submit(b"c", req("b", [8, 9]), 0.0)  # mb 0 is busy: b goes to mb 1
    steps, _ = core.outbox.drain()
    assert [(c.slot, c.start, c.length) for c in steps[0].chunks] == [(2, 0, 2)] and steps[0].mb == 1
    answer(core, s, [11])
    steps, out = core.outbox.drain()
    assert out == [(b"c", TokenChunk("a", 0, [11], None))]
    assert [(c.slot, c.start, c.length) for c in steps[0].chunks] == [(0, 3, 1)] and steps[0].token_ids == [11]


def test_finishes_on_max_new_tokens_and_on_eos() -> None:
    core = make(mbs=1, size=2)
    core.submit(b"c", req("a", [5], n=2), 0.0)
    core.submit(b"c", req("b", [6], n=9), 0.0)
    (s,), _ = core.outbox.drain()
    answer(core, s, [10])  # only a was admitted before the step left; b waits
    (s,), out = core.outbox.drain()
    assert [c.slot for c in s.chunks] == [0, 1]
    answer(core, s, [11, EOS])
    _, out = core.outbox.drain()
    done = {m.request_id: m.finish_reason for _, m in out if isinstance(m, RequestDone)}
    assert done == {"a": "length", "b": "stop"}
    assert not core.requests


def test_stale_results_are_ignored() -> None:
    core = make()
    core.submit(b"c", req("a", [5]), 0.0)
    (s,), _ = core.outbox.drain()
    core.on_result(StepResult(s.epoch + 1, s.mb, s.step, [1]), 1.0)
    core.on_result(StepResult(s.epoch, s.mb, s.step + 1, [1]), 1.0)
    assert core.outbox.drain() == ([], [])
    answer(core, s, [1])
    assert len(core.outbox.drain()[1]) == 1


def test_recovery_recomputes_prompt_plus_committed_tokens_without_repeating_them() -> None:
    core = make(mbs=1, size=1)
    core.submit(b"c", req("a", [5, 6], n=4), 0.0)
    (s,), _ = core.outbox.drain()
    answer(core, s, [20])
    (s,), _ = core.outbox.drain()
    answer(core, s, [21])
    (lost,), _ = core.outbox.drain()  # in flight when the stage dies
    core.pipeline_down()
    core.pipeline_up(2, 2.0)
    (s,), out = core.outbox.drain()
    assert out == []
    assert s.epoch == 2 and [(c.start, c.length) for c in s.chunks] == [(0, 4)] and s.token_ids == [5, 6, 20, 21]
    answer(core, lost, [99])  # the old epoch's answer arrives late: dropped
    assert core.outbox.drain() == ([], [])
    answer(core, s, [22])
    _, out = core.outbox.drain()
    assert out == [(b"c", TokenChunk("a", 2, [22], None))]


def test_chunked_prefill_commits_only_after_the_last_chunk() -> None:
    core = make(mbs=1, size=1, chunk=4)
    core.submit(b"c", req("a", list(range(3, 13))), 0.0)
    lengths = []
    for _ in range(3):
        (s,), out = core.outbox.drain()
        assert out == []
        lengths.append((s.chunks[0].start, s.chunks[0].length))
        answer(core, s, [50])
    assert lengths == [(0, 4), (4, 4), (8, 2)]
    _, out = core.outbox.drain()
    assert out == [(b"c", TokenChunk("a", 0, [50], None))]


def test_cancel_waiting_and_in_flight() -> None:
    core = make(mbs=1, size=1)
    core.submit(b"c", req("a", [5]), 0.0)
    core.submit(b"c", req("b", [6]), 0.0)
    (s,), _ = core.outbox.drain()
    core.cancel(b"c", "b", 0.5)  # waiting: ends at once
    core.cancel(b"c", "a", 0.5)  # in flight: ends when its step returns, its token never sent
    _, out = core.outbox.drain()
    assert out == [(b"c", RequestDone("b", "cancelled", 1, 0))]
    answer(core, s, [7])
    steps, out = core.outbox.drain()
    assert steps == [] and out == [(b"c", RequestDone("a", "cancelled", 1, 0))]


def test_silent_clients_are_cancelled() -> None:
    core = make(client_timeout=5.0)
    core.submit(b"gone", req("a", [5]), 0.0)
    core.submit(b"here", req("b", [6]), 0.0)
    steps, _ = core.outbox.drain()
    core.touch(b"here", 5.5)
    core.sweep(6.0)
    for s in steps:
        answer(core, s, [9])
    _, out = core.outbox.drain()
    # the server stopped it: a typed error that says why, not a result (issue: a cancel looked like a result)
    (failed,) = [m for c, m in out if c == b"gone"]
    assert isinstance(failed, RequestFailed) and failed.code == ERR_CANCELLED and "--client-timeout" in failed.message
    assert set(k[0] for k in core.requests) == {b"here"}


def test_bad_and_excess_requests_get_typed_errors_others_unaffected() -> None:
    core = make(mbs=1, size=1, max_waiting=1)
    core.submit(b"c", req("ok", [5]), 0.0)
    core.submit(b"c", req("ok", [5]), 0.0)  # duplicate id
    core.submit(b"c", req("big", [500]), 0.0)
    core.submit(b"c", req("empty", []), 0.0)
    core.submit(b"c", req("long", [5] * 64), 0.0)
    core.submit(b"c", req("temp", [5], temperature=-1.0), 0.0)
    core.submit(b"c", req("w1", [5]), 0.0)
    core.submit(b"c", req("w2", [5]), 0.0)  # queue full
    _, out = core.outbox.drain()
    codes = {m.request_id + ("#" if m.request_id == "ok" else ""): m.code for _, m in out if isinstance(m, RequestFailed)}
    assert codes == {"ok#": ERR_BAD_REQUEST, "big": ERR_BAD_REQUEST, "empty": ERR_BAD_REQUEST,
                     "long": ERR_BAD_REQUEST, "temp": ERR_BAD_REQUEST, "w2": ERR_OVERLOADED}
    assert set(k[1] for k in core.requests) == {"ok", "w1"}


def test_max_new_tokens_past_the_sequence_limit_is_refused_not_cut() -> None:
    """prompt + max_new_tokens may fill a slot (64 here) exactly; one token more is refused, saying the limit."""
    core = make(mbs=1, size=2)
    core.submit(b"c", req("fits", [5] * 4, n=60), 0.0)
    core.submit(b"c", req("over", [5] * 4, n=61), 0.0)
    _, out = core.outbox.drain()
    (failed,) = [m for _, m in out if isinstance(m, RequestFailed)]
    assert failed.request_id == "over" and failed.code == ERR_BAD_REQUEST
    assert "at most 60 new tokens" in failed.message and "maximum sequence length 64" in failed.message
    assert set(k[1] for k in core.requests) == {"fits"}


def test_resume_continues_after_the_tokens_the_client_holds() -> None:
    """A restarted controller gets a resume: prompt + held tokens are recomputed, the output goes on at the
    next index, and RequestDone counts every token of the output."""
    core = make(mbs=1, size=1)
    core.submit(b"c", req("a", [5, 6], n=4, resume_token_ids=[11, 12]), 0.0)
    (s,), out = core.outbox.drain()
    assert out == [] and s.token_ids == [5, 6, 11, 12] and s.chunks[0].length == 4
    answer(core, s, [13])
    (s,), out = core.outbox.drain()
    assert out == [(b"c", TokenChunk("a", 2, [13], None))] and s.token_ids == [13]
    answer(core, s, [14])
    _, out = core.outbox.drain()
    assert out == [(b"c", TokenChunk("a", 3, [14], None)), (b"c", RequestDone("a", "length", 2, 4))]


def test_resume_of_a_running_request_replaces_it_silently() -> None:
    """The client came back to the same controller: the running request (whose messages may have been lost)
    is dropped without a word, its slot freed when its step returns, and the resume takes over."""
    core = make(mbs=1, size=1)
    core.submit(b"c", req("a", [5], n=5), 0.0)
    (s,), _ = core.outbox.drain()
    answer(core, s, [11])
    (s,), _ = core.outbox.drain()  # step 2 of "a" in flight
    core.submit(b"c", req("a", [5], n=5, resume_token_ids=[11]), 1.0)
    assert core.outbox.drain() == ([], [])  # the slot is busy until the old step returns
    answer(core, s, [12])  # the superseded request's token is never sent
    (s,), out = core.outbox.drain()
    assert out == [] and s.token_ids == [5, 11] and s.chunks[0].start == 0
    answer(core, s, [12])
    _, out = core.outbox.drain()
    assert out == [(b"c", TokenChunk("a", 1, [12], None))]


def test_resume_of_an_ended_output_only_ends_it_and_bad_resumes_are_refused() -> None:
    core = make(mbs=1, size=1)
    core.submit(b"c", req("a", [5], n=3, resume_token_ids=[7, EOS]), 0.0)
    steps, out = core.outbox.drain()
    assert steps == [] and out == [(b"c", RequestDone("a", "stop", 1, 2))]
    core.submit(b"c", req("b", [5], n=1, resume_token_ids=[7, 8]), 0.0)  # more than max_new_tokens
    core.submit(b"c", req("d", [5], n=3, resume_token_ids=[100]), 0.0)  # outside the vocabulary
    core.submit(b"c", req("e", [5], n=3), 0.0)
    core.submit(b"c", req("e", [5], n=3), 0.0)  # a plain duplicate is still an error
    _, out = core.outbox.drain()
    failed = [(m.request_id, m.code) for _, m in out if isinstance(m, RequestFailed)]
    assert failed == [("b", ERR_BAD_REQUEST), ("d", ERR_BAD_REQUEST), ("e", ERR_BAD_REQUEST)]


def test_a_request_without_a_slot_past_queue_timeout_fails_with_a_typed_timeout() -> None:
    core = make(mbs=1, size=1, queue_timeout=5.0)
    core.submit(b"c", req("runs", [5], n=50), 0.0)
    core.submit(b"c", req("waits", [6]), 1.0)
    core.outbox.drain()
    core.sweep(5.5)
    assert not core.outbox.drain()[1]  # 4.5 s waited: not yet
    core.sweep(6.5)
    _, out = core.outbox.drain()
    (failed,) = [m for _, m in out if isinstance(m, RequestFailed)]
    assert failed.request_id == "waits" and failed.code == ERR_TIMEOUT and "--queue-timeout" in failed.message
    assert set(k[1] for k in core.requests) == {"runs"} and not core.sched.waiting


def test_running_requests_fail_when_the_pipeline_stays_down_past_queue_timeout() -> None:
    """(A waiting request keeps its own queue deadline: the pipeline may be back before it passes.)"""
    core = make(mbs=1, size=1, queue_timeout=5.0)
    core.submit(b"c", req("runs", [5], n=50), 0.0)
    core.submit(b"c", req("waits", [6]), 1.5)
    core.outbox.drain()
    core.pipeline_down()
    core.sweep(1.0)  # down since 1.0
    core.sweep(5.9)
    assert not core.outbox.drain()[1]
    core.sweep(6.1)
    _, out = core.outbox.drain()
    failed = {m.request_id: m for _, m in out if isinstance(m, RequestFailed)}
    assert set(failed) == {"runs"} and failed["runs"].code == ERR_TIMEOUT
    assert "pipeline has been down" in failed["runs"].message
    core.sweep(6.6)
    _, out = core.outbox.drain()
    assert [m.request_id for _, m in out if isinstance(m, RequestFailed)] == ["waits"]
    assert not core.requests


def test_a_keepalive_naming_an_unknown_request_is_answered_after_the_grace() -> None:
    """A restarted controller does not know the requests of its predecessor: a client that does not resend them
    learns their fate from its own KeepAlive; one that resends (AsyncClient resumes at once) is served."""
    core = make(mbs=1, size=2, unknown_grace=3.0)
    core.submit(b"c", req("done", [5], n=1), 0.0)
    (s,), _ = core.outbox.drain()
    answer(core, s, [9])  # "done" ends: a KeepAlive sent before its end may still name it
    core.outbox.drain()
    core.touch(b"c", 1.0, ["lost", "resumed", "done"])
    core.submit(b"c", req("resumed", [5], n=4, resume_token_ids=[7]), 1.5)
    core.sweep(3.9)
    assert not [m for _, m in core.outbox.drain()[1] if isinstance(m, RequestFailed)]
    core.sweep(4.1)
    _, out = core.outbox.drain()
    (failed,) = [m for _, m in out if isinstance(m, RequestFailed)]
    assert failed.request_id == "lost" and failed.code == ERR_SERVER and "unknown to this controller" in failed.message
    assert (b"c", "resumed") in core.requests
