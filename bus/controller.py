"""The controller's core: requests in, steps out, tokens back to clients. No sockets, no event loop.

The shell (bus/controller_proc.py) feeds it events — a client message, a step result, a failure, the
pipeline coming up or going down, the clock — and sends what it leaves in `outbox`. Tokens are committed
exactly once, in order, the moment a step result arrives, and streamed at once. After a pipeline failure,
running requests go on from the positions already cached when every stage kept its KV (a restarted CPU stage
takes its pool over from the streamer); otherwise they are recomputed from prompt + committed tokens. Either
way what a client has seen is never repeated, changed or lost (seeded sampling depends only on (seed,
position), so recomputation draws the same tokens).
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from bus.disagg import DisaggScheduler
from bus.errors import InvalidRequestError
from bus.messages import (
    ERR_BAD_REQUEST,
    ERR_CANCELLED,
    ERR_OVERLOADED,
    ERR_SERVER,
    ERR_TIMEOUT,
    GenerateRequest,
    KvMove,
    KvSent,
    Msg,
    RequestDone,
    RequestFailed,
    StepRequest,
    StepResult,
    TokenChunk,
    TokenLogprob,
)
from bus.replication import ReplicaBook
from bus.requests import Request, admit
from bus.scheduler import Scheduler
from bus.stopping import CANCELLED, finish_reason

log = logging.getLogger(__name__)
MAX_KEEPALIVE_IDS = 4096  # request ids of one KeepAlive that are looked at (bounds what a client can make us hold)


def _who(client: bytes) -> str:
    """A client's routing identity for logs: our clients name themselves; others get ZeroMQ's random bytes."""
    return client.decode() if client.isascii() and client.decode().isprintable() else client.hex()[:8]


@dataclass(frozen=True)
class ModelInfo:
    vocab_size: int
    eos_ids: tuple[int, ...]
    max_seq_len: int
    tokenizer: Any | None = None


@dataclass
class Outbox:
    steps: list[StepRequest] = field(default_factory=list)
    clients: list[tuple[bytes, Msg]] = field(default_factory=list)
    moves: list[KvMove] = field(default_factory=list)  # disaggregated: to every prompt stage

    def drain(self) -> tuple[list[StepRequest], list[tuple[bytes, Msg]]]:
        steps, clients = self.steps, self.clients
        self.steps, self.clients = [], []
        return steps, clients


class Controller:
    """queue_timeout: a request that waits this long without a slot, or holds a slot in a pipeline that stays
    down this long, fails with ERR_TIMEOUT. unknown_grace: a KeepAlive naming a request this controller does not know is answered with
    RequestFailed unless the request arrives (as a resume) within this many seconds."""

    def __init__(self, model: ModelInfo, scheduler: Scheduler, *, max_waiting: int = 4096,
                 client_timeout: float = 10.0, step_timeout: float = 600.0, queue_timeout: float = 300.0,
                 unknown_grace: float = 3.0) -> None:
        self.model, self.sched = model, scheduler
        self.max_waiting, self.client_timeout, self.step_timeout = max_waiting, client_timeout, step_timeout
        self.queue_timeout, self.unknown_grace = queue_timeout, unknown_grace
        self.requests: dict[tuple[bytes, str], Request] = {}
        self.client_seen: dict[bytes, float] = {}
        self.outbox = Outbox()
        self.ready = False
        self.down_since: float | None = None  # since when the pipeline is down (or not up yet), seen by sweep
        self.clock = 0.0  # the latest `now` given: when a request ended (for `ended`)
        self.dropped_rows = 0  # rows a step returned for requests already ended (lookahead: sent before they stopped)
        self.unknown: dict[tuple[bytes, str], float] = {}  # named by a KeepAlive but not known here: since
        self.ended: dict[tuple[bytes, str], float] = {}  # requests that ended lately: a KeepAlive may still name
        self.book: ReplicaBook | None = None  # with replication: which positions each stage's replica holds
        self.swap_book: ReplicaBook | None = None  # with swapping: which positions each stage's swap pool holds

    # ------------------------------------------------------------------ clients

    def submit(self, client: bytes, msg: GenerateRequest, now: float) -> None:
        """A new request, or a resume (msg.resume_token_ids set: the client reconnected and holds those output
        tokens). A resume replaces the request of the same id if it still runs here (its stream may have lost
        messages while the client was away) and is never refused for a full queue: it was admitted before."""
        self.clock = now
        self.client_seen[client] = now
        self.unknown.pop((client, msg.request_id), None)
        resume = msg.resume_token_ids is not None
        old = self.requests.get((client, msg.request_id))
        if old is not None:
            if not resume:
                self._fail_raw(client, msg.request_id, ERR_BAD_REQUEST,
                               f"request_id {msg.request_id!r} is already running")
                return
            self._supersede(old)
        if not resume and len(self.sched.waiting) >= self.max_waiting:
            self._fail_raw(client, msg.request_id, ERR_OVERLOADED,
                           f"{len(self.sched.waiting)} requests already waiting (max_waiting); retry later")
            return
        try:
            req = admit(client, msg, vocab_size=self.model.vocab_size, max_seq_len=self.model.max_seq_len,
                        eos_ids=self.model.eos_ids, tokenizer=self.model.tokenizer)
        except InvalidRequestError as e:
            self._fail_raw(client, msg.request_id, ERR_BAD_REQUEST, str(e))
            return
        req.submitted = now
        self.requests[req.key] = req
        if req.generated:
            log.info("[client] %s resumes %s after %d token(s)", _who(client), req.request_id,
                     len(req.generated))
            reason = finish_reason(req.generated[-1], len(req.generated), req.max_new_tokens, req.seq_len,
                                   self.model.max_seq_len, req.stop_ids)
            if reason is not None:  # it had ended; only the end's message was lost
                self._finish(req, reason)
                return
        self.sched.enqueue(req)
        self.schedule(now)

    def _supersede(self, req: Request) -> None:
        """Drop `req` without a word to its client (a resume of it takes over); its slot is freed now, or when
        its step in flight returns (on_result releases cancelled members)."""
        req.done = req.cancelled = True
        self.requests.pop(req.key, None)
        if req.mb is not None and self.sched.mbs[req.mb].inflight is None:
            self.sched.release(req)

    def cancel(self, client: bytes, request_id: str, now: float) -> None:
        self.clock = now
        self.client_seen[client] = now
        req = self.requests.get((client, request_id))
        if req is not None:
            self._cancel(req)
            self.schedule(now)

    def touch(self, client: bytes, now: float, request_ids: list[str] | tuple[str, ...] = ()) -> None:
        """A KeepAlive: the client is there, awaiting `request_ids`."""
        self.clock = now
        self.client_seen[client] = now
        for rid in request_ids[:MAX_KEEPALIVE_IDS]:
            key = (client, rid)
            if key not in self.requests and key not in self.ended:
                self.unknown.setdefault(key, now)

    def sweep(self, now: float) -> None:
        """Cancel requests of clients silent past client_timeout; time out steps past step_timeout, requests
        past queue_timeout; answer requests named in KeepAlives but unknown here past unknown_grace."""
        self.clock = now
        gone = {c for c, t in self.client_seen.items() if now - t > self.client_timeout}
        for req in list(self.requests.values()):
            if req.client in gone:
                log.info("[client] %s silent for %.0fs: cancelling %s", _who(req.client), self.client_timeout,
                         req.request_id)
                self._cancel(req, f"cancelled by the server: no message from this client for {self.client_timeout:.0f}s "
                                  "(server setting --client-timeout; the client sends KeepAlive while it waits)")
        self._time_out(now)
        for key, since in list(self.unknown.items()):
            if now - since > self.unknown_grace:
                del self.unknown[key]
                self._fail_raw(key[0], key[1], ERR_SERVER,
                               f"request {key[1]} is unknown to this controller: it was restarted and the request "
                               "was not resumed (send it again with resume_token_ids, as AsyncClient does)")
        for key, t in list(self.ended.items()):
            if now - t > self.unknown_grace:
                del self.ended[key]
        for c in gone:
            if not any(r.client == c for r in self.requests.values()):
                del self.client_seen[c]
        for mb in self.sched.overdue(now, self.step_timeout):
            assert mb.inflight is not None
            log.error("[step] microbatch %d step %d overdue (> step_timeout %.0fs)", mb.index, mb.inflight.step,
                      self.step_timeout)
            self.fail_microbatch(mb.index, mb.inflight.step, ERR_TIMEOUT, "the pipeline did not answer in time")
        self.schedule(now)

    def _time_out(self, now: float) -> None:
        """queue_timeout: waiting requests that found no slot in time, and the requests holding slots once the
        pipeline has been down that long (a waiting request keeps its own deadline: the pipeline may be back)."""
        if self.ready:
            self.down_since = None
        elif self.down_since is None:
            self.down_since = now
        stale = [r for r in self.sched.waiting if not r.done and now - r.submitted > self.queue_timeout]
        if stale:
            self.sched.waiting = deque(r for r in self.sched.waiting if r not in stale)
            for req in stale:
                self._fail(req, ERR_TIMEOUT, f"no slot within {self.queue_timeout:.0f}s in the queue (server setting "
                                            "--queue-timeout)")
        if self.down_since is not None and now - self.down_since > self.queue_timeout:
            for req in [r for r in self.requests.values() if r.mb is not None]:
                self.sched.release(req)
                self._fail(req, ERR_TIMEOUT, f"the pipeline has been down for {now - self.down_since:.0f}s "
                                            "(server setting --queue-timeout)")

    def _cancel(self, req: Request, why: str = "") -> None:
        """Stop `req`: asked by its client (no answer needed) or by the server (`why`: the client gets
        RequestFailed ERR_CANCELLED saying why)."""
        req.cancelled, req.cancel_reason = True, why
        if req.mb is None:  # still waiting: nothing holds it
            self._end_cancelled(req)
        elif self.sched.mbs[req.mb].inflight is None:
            self.sched.release(req)
            self._end_cancelled(req)
        # else: ended when its step returns

    def _end_cancelled(self, req: Request) -> None:
        if req.cancel_reason:
            self._fail(req, ERR_CANCELLED, req.cancel_reason)
        else:
            self._finish(req, CANCELLED)

    # ------------------------------------------------------------------ pipeline

    def pipeline_down(self) -> None:
        self.ready = False

    def pipeline_up(self, epoch: int, now: float, keep_cache: bool = False,
                    valid: Callable[[Request], int] | None = None) -> None:
        """A new epoch serves. keep_cache: every stage still holds the KV of every position counted as cached
        (a restarted stage took its pool over), so requests go on from there; else they are recomputed.
        valid: per request, the positions every stage holds (replicas restored): replay from there."""
        self.clock = now
        self.sched.reset_epoch(epoch, keep_cache, valid)
        self.ready = True
        self.schedule(now)

    def schedule(self, now: float) -> None:
        self.clock = now
        if self.ready:
            steps = self.sched.next_steps(now)
            self._give_up()
            moves: list[KvMove] = []
            if isinstance(self.sched, DisaggScheduler):
                moves, self.sched.move_out = self.sched.move_out, []
            for book in (self.book, self.swap_book):
                if book is None:
                    continue
                for step in steps:
                    sent = self.sched.sent(step)
                    assert sent is not None
                    book.record(step, sent.members)
            self.outbox.steps.extend(steps)
            self.outbox.moves.extend(moves)

    def on_result(self, result: StepResult, now: float) -> None:
        self.clock = now
        if result.epoch != self.sched.epoch:
            return
        done = self.sched.complete(result.mb, result.step, now)
        if done is None:
            return
        if self.book is not None:
            self.book.complete(result.mb, result.step)
        if self.swap_book is not None:
            self.swap_book.complete(result.mb, result.step)
        logprobs = result.logprobs or [None] * len(result.tokens)
        if len(result.tokens) != len(done.members) or len(logprobs) != len(done.members):
            self.fail_members(done.members, ERR_SERVER, "stage returned a wrong number of tokens")
        else:
            for (req, _, samples), token, lp in zip(done.members, result.tokens, logprobs):
                if req.done:  # superseded, or ended at an earlier step (lookahead: this row was sent before that)
                    self.dropped_rows += self.sched.lookahead
                if not self._let_go(req) and samples:
                    self._commit(req, token, lp)
        self.schedule(now)

    def void_step(self, mb_index: int, step: int, now: float) -> None:
        """The stage did not run microbatch `mb_index`'s step `step` (ERR_STEP_VOID: a lookahead step whose previous
        step did not sample there): its members are fed again in a step built anew; nothing it wrote counts."""
        self.clock = now
        done = self.sched.complete(mb_index, step, now, ran=False)
        for req, _, _ in done.members if done is not None else ():
            self._let_go(req)
        self.schedule(now)

    def _let_go(self, req: Request) -> bool:
        """A member of a step that came back: if it ended (done) or was cancelled meanwhile, its slot is released
        (and a cancel ended) - True; else False (it goes on)."""
        if not (req.done or req.cancelled):
            return False
        self.sched.release(req)
        if not req.done:
            self._end_cancelled(req)
        return True

    def on_kv_sent(self, stage: int, sent: KvSent, now: float) -> None:
        """Prompt stage `stage` (0-based in the prompt pipeline) says where its KV of a prompt pass is."""
        self.clock = now
        if sent.epoch != self.sched.epoch or not isinstance(self.sched, DisaggScheduler):
            return
        self.sched.kv_sent(stage, sent.mb, sent.step, sent.ok, sent.nbytes, sent.message, now)
        if not sent.ok:
            log.warning("[prompt] prompt stage %d: pass %d/%d's KV did not land: %s", stage, sent.mb, sent.step,
                        sent.message)
        self.schedule(now)

    def recompute_microbatch(self, mb_index: int, step: int, now: float) -> None:
        """A stage could not bring microbatch `mb_index`'s KV back for its step `step` (swapping: the swap-in failed
        or the swap copy lacks rows) and did not run it: the step is void, and its members are recomputed from
        their prompt + committed tokens, as after a lost stage's KV (exact: sampling depends on positions only)."""
        if not 0 <= mb_index < len(self.sched.mbs):
            return
        mb = self.sched.mbs[mb_index]
        if mb.inflight is None or mb.inflight.step != step:
            return
        self.sched.void(mb_index)
        for req in list(mb.members.values()):
            req.cached = 0
            if req.cancelled:
                self.sched.release(req)
                self._end_cancelled(req)
        log.warning("[swap] microbatch %d is recomputed (step %d could not swap its KV in)", mb_index, step)
        self.schedule(now)

    def _give_up(self) -> None:
        failed, self.sched.failed = self.sched.failed, []
        for req, why in failed:
            self._fail(req, ERR_SERVER, why)


    def fail_microbatch(self, mb_index: int, step: int, code: int, message: str) -> None:
        # (its lookahead step, built on this one's tokens, is void: its other members are fed again)
        done = self.sched.complete(mb_index, step, self.clock, keep_ahead=False)
        if done is not None:
            self.fail_members(done.members, code, message)

    def fail_members(self, members: list[tuple[Request, int, bool]], code: int, message: str) -> None:
        for req, _, _ in members:
            self.sched.release(req)
            self._fail(req, code, message)

    def fail_all(self, code: int, message: str) -> None:
        for req in list(self.requests.values()):
            self.sched.release(req)
            self._fail(req, code, message)
        self.sched.waiting.clear()

    # ------------------------------------------------------------------ commit

    def _commit(self, req: Request, token: int, logprob: TokenLogprob | None = None) -> None:
        req.generated.append(token)
        text = req.detok.push([token]) if req.detok is not None else None
        lps = [logprob] if logprob is not None and req.sampling.logprobs is not None else None
        self.outbox.clients.append((req.client, TokenChunk(req.request_id, len(req.generated) - 1, [token], text,
                                                           lps)))
        reason = finish_reason(token, len(req.generated), req.max_new_tokens, req.seq_len, self.model.max_seq_len,
                               req.stop_ids)
        if reason is not None:
            self.sched.release(req)
            self._finish(req, reason)

    def _finish(self, req: Request, reason: str) -> None:
        if req.done:
            return
        req.done = True
        self.requests.pop(req.key, None)
        self.ended[req.key] = self.clock
        if req.detok is not None and reason != CANCELLED:
            tail = req.detok.flush()
            if tail:
                self.outbox.clients.append((req.client, TokenChunk(req.request_id, len(req.generated), [], tail)))
        self.outbox.clients.append(
            (req.client, RequestDone(req.request_id, reason, len(req.prompt), len(req.generated)))
        )

    def _fail(self, req: Request, code: int, message: str) -> None:
        if req.done:
            return
        req.done = True
        self.requests.pop(req.key, None)
        self.ended[req.key] = self.clock
        self._fail_raw(req.client, req.request_id, code, message)

    def refuse(self, client: bytes, request_id: str, code: int, message: str) -> None:
        """Refuse a request before it is submitted (the shell's checks)."""
        self._fail_raw(client, request_id, code, message)

    def _fail_raw(self, client: bytes, request_id: str, code: int, message: str) -> None:
        self.outbox.clients.append((client, RequestFailed(request_id, code, message)))

    # ------------------------------------------------------------------ status

    def counts(self) -> tuple[int, int]:
        running = sum(1 for _ in self.sched.running())
        return len(self.sched.waiting), running

