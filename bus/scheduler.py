"""The colocated pipeline scheduler: microbatches, KV slots, and the steps that keep every stage busy.

`num_microbatches` microbatches (by default one per stage, so the pipeline is full) each own a fixed,
contiguous range of KV slots — contiguous so a stage reads a microbatch's keys as a view, with no gather.
A microbatch runs one step at a time: every member contributes a chunk — its not-yet-cached tokens (a new
prompt, or a recomputation after a failure: start 0, all tokens so far) or its last token (decode). New
requests join a microbatch at its next step, in any free slot (continuous batching at microbatch
granularity, stronger than the paper's replace-when-all-done baseline). With `prefill_chunk` > 0 a long
prompt is split across steps (chunked prefill) so it does not stall its microbatch's decodes.

Lookahead (a pipeline whose one stage both takes token ids and samples): while a microbatch's step n is in
flight, its step n + 1 is sent too, built before n's tokens are known. A member that samples at step n is fed
back, on the stage, the token it sampled there (`StepRequest.fed`), so the stage starts n + 1 as soon as n is
done instead of waiting for the controller's round trip (issue 20's lean step). A member known to stop at n (its
length) is left out of n + 1; one that stops on a sampled stop token computes one row too many, dropped here,
and its slot is freed once no step in flight holds it (`release` defers until then).

Pure: no sockets, no clocks except the `now` passed in.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import msgspec

from bus.messages import Chunk, Sampling, StepRequest
from bus.requests import Request


@dataclass
class InFlight:
    step: int
    sent_at: float
    members: list[tuple[Request, int, bool]]  # (request, tokens fed, samples a token) in chunk order


@dataclass
class Microbatch:
    index: int
    slots: list[int]
    members: dict[int, Request] = field(default_factory=dict)  # slot -> request
    inflight: InFlight | None = None
    ahead: InFlight | None = None  # lookahead: the step sent behind `inflight` (it becomes `inflight` after)
    releasing: list[Request] = field(default_factory=list)  # released while a step in flight still holds them
    steps: int = 0

    def free_slots(self) -> list[int]:
        return [s for s in self.slots if s not in self.members]


class Scheduler:
    def __init__(self, num_microbatches: int, microbatch_size: int, prefill_chunk: int = 0) -> None:
        if num_microbatches < 1 or microbatch_size < 1:
            raise ValueError("need at least one microbatch of at least one slot")
        self.mbs = [
            Microbatch(m, list(range(m * microbatch_size, (m + 1) * microbatch_size)))
            for m in range(num_microbatches)
        ]
        self.waiting: deque[Request] = deque()
        self.prefill_chunk = prefill_chunk
        self.epoch = 0
        self.failed: list[tuple[Request, str]] = []  # requests the scheduler gave up on (released): the controller fails them
        self.lookahead = False
        self.max_seq_len = 0  # lookahead: a member whose next token reaches it stops there (is not fed back)

    def enable_lookahead(self, max_seq_len: int) -> None:
        """Send each microbatch's next step while its current one runs (only where the pipeline's first stage
        samples: a one-stage pipeline, or a disaggregated deployment's one token stage)."""
        self.lookahead, self.max_seq_len = True, max_seq_len

    @property
    def num_slots(self) -> int:
        return sum(len(mb.slots) for mb in self.mbs)

    def running(self) -> Iterable[Request]:
        for mb in self.mbs:
            yield from mb.members.values()

    def inflight_of(self, mb_index: int) -> InFlight | None:
        return self.mbs[mb_index].inflight

    def sent(self, step: StepRequest) -> InFlight | None:
        """The record of a step just sent (the microbatch's in-flight step or its lookahead)."""
        ahead = self.mbs[step.mb].ahead if 0 <= step.mb < len(self.mbs) else None
        return next((f for f in (self.inflight_of(step.mb), ahead) if f is not None and f.step == step.step), None)

    def enqueue(self, req: Request) -> None:
        self.waiting.append(req)

    def release(self, req: Request) -> None:
        """Free the request's slot. With lookahead, a step in flight may still hold it (it stopped on a sampled
        token, and its next row was already sent): the slot is freed when the last such step returns."""
        if req.mb is not None and req.slot is not None:
            mb = self.mbs[req.mb]
            if self.lookahead and _holds(mb, req):
                if req not in mb.releasing:
                    mb.releasing.append(req)
                return
            if mb.members.get(req.slot) is req:
                del mb.members[req.slot]
        req.mb = req.slot = None

    def _free_released(self, mb: Microbatch) -> None:
        """Free the slots released while a step held them, once none does."""
        wait, mb.releasing = mb.releasing, []
        for req in wait:
            self.release(req)

    def reset_epoch(self, epoch: int, keep_cache: bool = False,
                    valid: Callable[[Request], int] | None = None) -> None:
        """The pipeline was rebuilt: in-flight steps are void (sent again: they rewrite the same positions).
        valid: how many positions of a request every stage holds now (some came back from replicas): each request
        goes back to there and the positions after it are fed again. Else, unless every stage kept its KV, every
        cache is gone too — recompute all."""
        self.epoch = epoch
        for mb in self.mbs:
            mb.inflight = mb.ahead = None
            self._free_released(mb)
            for req in mb.members.values():
                if valid is not None:
                    req.cached = max(0, min(req.cached, valid(req)))
                elif not keep_cache:
                    req.cached = 0

    def next_steps(self, now: float) -> list[StepRequest]:
        """Steps for every idle microbatch that has (or can admit) work."""
        out = []
        for mb in self.mbs:
            if mb.inflight is None:
                self._admit(mb)
                if mb.members:
                    out.append(self._step(mb, now))
            if self.lookahead and mb.inflight is not None and mb.ahead is None:
                self._admit(mb)
                ahead = self._step_ahead(mb, now)
                if ahead is not None:
                    out.append(ahead)
        return out

    def _admit(self, mb: Microbatch) -> None:
        for slot in mb.free_slots():
            while self.waiting and self.waiting[0].cancelled:
                self.waiting.popleft()
            if not self.waiting:
                return
            req = self.waiting.popleft()
            req.mb, req.slot, req.cached = mb.index, slot, 0
            mb.members[slot] = req

    def _step(self, mb: Microbatch, now: float) -> StepRequest:
        chunks, token_ids, sampling, members = [], [], [], []
        for slot in sorted(mb.members):
            req = mb.members[slot]
            tokens = req.tokens
            n = self._take(len(tokens) - req.cached)
            chunks.append(Chunk(slot, req.cached, n))
            token_ids.extend(tokens[req.cached : req.cached + n])
            sampling.append(self._sampling(req, req.cached))
            members.append((req, n, req.cached + n == len(tokens)))
        mb.steps += 1
        mb.inflight = InFlight(mb.steps, now, members)
        return StepRequest(self.epoch, mb.index, mb.steps, chunks, token_ids, sampling)

    def _step_ahead(self, mb: Microbatch, now: float) -> StepRequest | None:
        """Microbatch `mb`'s next step, sent while its step in flight runs (lookahead): a member that samples
        there is fed back its token on the stage (fed[k] = its row in the step in flight), the others' tokens are
        known (the rest of a chunked prompt, or a prompt admitted now)."""
        inflight = mb.inflight
        assert inflight is not None
        if any(req.penalized for req in mb.members.values()):
            return None  # penalties count the tokens the last stage saw fed as token ids: no fed-back rows
        before = {id(req): (k, n, samples) for k, (req, n, samples) in enumerate(inflight.members)}
        chunks, token_ids, sampling, members, fed = [], [], [], [], []
        for slot in sorted(mb.members):
            req = mb.members[slot]
            if req.done or req.cancelled:
                continue
            start, row = req.cached, -1
            if id(req) in before:
                k, n, samples = before[id(req)]
                start += n
                if samples:
                    if self._stops_after(req):
                        continue  # its token at the step in flight is its last
                    row = k
            if row >= 0:
                n = 1
                chunks.append(Chunk(slot, start, 1))
                token_ids.append(0)  # (the stage puts the fed-back token here)
            else:
                tokens = req.tokens
                if start >= len(tokens):
                    continue
                n = self._take(len(tokens) - start)
                chunks.append(Chunk(slot, start, n))
                token_ids.extend(tokens[start : start + n])
            sampling.append(req.sampling)
            fed.append(row)
            members.append((req, n, row >= 0 or start + n == req.seq_len))
        if not chunks:
            return None
        mb.steps += 1
        mb.ahead = InFlight(mb.steps, now, members)
        return StepRequest(self.epoch, mb.index, mb.steps, chunks, token_ids, sampling, fed=fed)

    def _sampling(self, req: Request, start: int) -> Sampling:
        """The request's Sampling for its chunk at `start`. With penalties, its first chunk of an epoch carries the
        tokens it generated before `start` (Sampling.history): the last stage may hold none (restarted) or stale ones
        (a rollback to the replicated watermark); it learns the rest from the chunks it computes."""
        if not req.penalized or req.history_epoch == self.epoch:
            return req.sampling
        req.history_epoch = self.epoch
        return msgspec.structs.replace(req.sampling,
                                       history=tuple(req.generated[: max(0, start - len(req.prompt))]))

    def _take(self, todo: int) -> int:
        """Of `todo` tokens not yet cached, how many one step feeds (chunked prefill splits a long prompt)."""
        return min(todo, self.prefill_chunk) if self.prefill_chunk and todo > 1 else todo

    def _stops_after(self, req: Request) -> bool:
        """`req` stops with the token it samples at its step in flight, whatever that token is (its length)."""
        generated, seq_len = len(req.generated) + 1, req.seq_len + 1
        return generated >= req.max_new_tokens or (self.max_seq_len > 0 and seq_len >= self.max_seq_len)

    def complete(self, mb_index: int, step: int, now: float | None = None, ran: bool = True,
                 keep_ahead: bool = True) -> InFlight | None:
        """The in-flight step `step` of microbatch `mb_index` finished; None if it is stale or unknown.
        ran: its rows are in the cache (False: the stage did not run it - its members are fed again).
        keep_ahead: its lookahead step, if any, becomes the step in flight (False: that step is void too - it was
        built on this one's tokens; whatever comes back for it is stale)."""
        if not 0 <= mb_index < len(self.mbs):
            return None
        mb = self.mbs[mb_index]
        if mb.inflight is None or mb.inflight.step != step:
            return None
        done, mb.inflight, mb.ahead = mb.inflight, mb.ahead if keep_ahead and ran else None, None
        if mb.inflight is not None and now is not None:
            mb.inflight.sent_at = now  # (it waited behind `done` on the stage)
        if ran:
            for req, n, _ in done.members:
                req.cached += n
        else:
            for req, _, _ in done.members:
                req.history_epoch = -1  # (the history it may have carried did not reach the last stage)
        self._free_released(mb)
        return done

    def void(self, mb_index: int) -> None:
        """Microbatch `mb_index`'s steps in flight are void (nothing they return counts)."""
        mb = self.mbs[mb_index]
        for f in (mb.inflight, mb.ahead):
            for req, _, _ in f.members if f is not None else ():
                req.history_epoch = -1
        mb.inflight = mb.ahead = None
        self._free_released(mb)

    def overdue(self, now: float, timeout: float) -> list[Microbatch]:
        return [mb for mb in self.mbs if mb.inflight is not None and now - mb.inflight.sent_at > timeout]


def _holds(mb: Microbatch, req: Request) -> bool:
    return any(m[0] is req for f in (mb.inflight, mb.ahead) if f is not None for m in f.members)
