"""The colocated pipeline scheduler: microbatches, KV slots, and the steps that keep every stage busy.

`num_microbatches` microbatches (by default one per stage, so the pipeline is full) each own a fixed,
contiguous range of KV slots — contiguous so a stage reads a microbatch's keys as a view, with no gather.
A microbatch runs one step at a time: every member contributes a chunk — its not-yet-cached tokens (a new
prompt, or a recomputation after a failure: start 0, all tokens so far) or its last token (decode). New
requests join a microbatch at its next step, in any free slot (continuous batching at microbatch
granularity, stronger than the paper's replace-when-all-done baseline). With `prefill_chunk` > 0 a long
prompt is split across steps (chunked prefill) so it does not stall its microbatch's decodes.

Pure: no sockets, no clocks except the `now` passed in.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from bus.messages import Chunk, StepRequest
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

    @property
    def num_slots(self) -> int:
        return sum(len(mb.slots) for mb in self.mbs)

    def running(self) -> Iterable[Request]:
        for mb in self.mbs:
            yield from mb.members.values()

    def inflight_of(self, mb_index: int) -> InFlight | None:
        return self.mbs[mb_index].inflight

    def enqueue(self, req: Request) -> None:
        self.waiting.append(req)

    def release(self, req: Request) -> None:
        """Free the request's slot (only call when its microbatch has no step in flight holding it)."""
        if req.mb is not None and req.slot is not None:
            self.mbs[req.mb].members.pop(req.slot, None)
        req.mb = req.slot = None

    def reset_epoch(self, epoch: int, keep_cache: bool = False,
                    valid: Callable[[Request], int] | None = None) -> None:
        """The pipeline was rebuilt: in-flight steps are void (sent again: they rewrite the same positions).
        valid: how many positions of a request every stage holds now (some came back from replicas): each request
        goes back to there and the positions after it are fed again. Else, unless every stage kept its KV, every
        cache is gone too — recompute all."""
        self.epoch = epoch
        for mb in self.mbs:
            mb.inflight = None
            for req in mb.members.values():
                if valid is not None:
                    req.cached = max(0, min(req.cached, valid(req)))
                elif not keep_cache:
                    req.cached = 0

    def next_steps(self, now: float) -> list[StepRequest]:
        """Steps for every idle microbatch that has (or can admit) work."""
        out = []
        for mb in self.mbs:
            if mb.inflight is not None:
                continue
            self._admit(mb)
            if mb.members:
                out.append(self._step(mb, now))
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
            todo = len(tokens) - req.cached
            n = min(todo, self.prefill_chunk) if self.prefill_chunk and todo > 1 else todo
            chunks.append(Chunk(slot, req.cached, n))
            token_ids.extend(tokens[req.cached : req.cached + n])
            sampling.append(req.sampling)
            members.append((req, n, req.cached + n == len(tokens)))
        mb.steps += 1
        mb.inflight = InFlight(mb.steps, now, members)
        return StepRequest(self.epoch, mb.index, mb.steps, chunks, token_ids, sampling)

    def complete(self, mb_index: int, step: int) -> InFlight | None:
        """The in-flight step `step` of microbatch `mb_index` finished; None if it is stale or unknown."""
        if not 0 <= mb_index < len(self.mbs):
            return None
        mb = self.mbs[mb_index]
        if mb.inflight is None or mb.inflight.step != step:
            return None
        done, mb.inflight = mb.inflight, None
        for req, n, _ in done.members:
            req.cached += n
        return done

    def overdue(self, now: float, timeout: float) -> list[Microbatch]:
        return [mb for mb in self.mbs if mb.inflight is not None and now - mb.inflight.sent_at > timeout]
