"""The disaggregated scheduler (the paper's section 4, issue 19): a prompt pipeline and a token pipeline.

Prompt passes run on the prompt pipeline (its own stages, its own small KV pools: `prompt_microbatches`
microbatches of `prompt_microbatch_size` slots); decode steps run on the token pipeline, with the microbatches
and slots of the colocated scheduler it extends. As a prompt stage writes a layer's KV, its streamer pushes it
into the token stage that owns that layer (stages/kv_push.py): straight into the request's slot in the token
pipeline, so nothing is copied twice.

Receive slots: a request enters the prompt pipeline only with a token-pipeline slot reserved for it - its
receive slot - so the prompt pipeline never overruns the token side's memory, and never deadlocks when that is
full: the prompt simply waits (back-pressure, counted in `receive_waits`) until a decode frees a slot. The
request joins its token microbatch when its first token came back (the last prompt stage samples it: the
client has it at once) and every prompt stage reported its KV landed (KvSent). Until then the slot is
*landing*: reserved, not stepped.

A prompt stage reports KvSent for every prompt pass it ran, landed or not; so the controller knows when no
transfer of a pass can still write into its receive slots. A slot whose request ended while its KV was on the
way (cancelled, finished at its first token, failed) stays *quarantined* until then: never handed to another
request while a late transfer could overwrite its KV. A new epoch ends every transfer of the old one (the stages
cancel theirs before acknowledging it; a dead stage's are aborted by its streamer): prompts in flight go back
to the queue's front, quarantines are lifted.

Pure: no sockets, no clocks except the `now` passed in.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from bus.messages import Chunk, StepRequest
from bus.requests import Request
from bus.scheduler import InFlight, Microbatch, Scheduler

MAX_PROMPT_TRIES = 3  # prompt passes of one epoch a request may have whose KV failed to land before it fails
RETRY_PAUSE_S = 1.0  # after a pass whose KV did not land, no new pass for this long (doubling, at most 8 s):
# a streamer that died fails every transfer at once, and the controller learns of it only a moment later


@dataclass
class PromptBatch:
    """A prompt microbatch: its own slots in the prompt stages' pools; busy from its pass being sent until its
    first tokens came back and every prompt stage that ran it reported its KV (KvSent)."""

    index: int  # its microbatch number on the wire (after the token microbatches')
    slots: list[int]  # prompt-pool slots
    inflight: InFlight | None = None
    steps: int = 0
    dest: list[int] = field(default_factory=list)  # per member: its receive slot in the token pipeline
    result: bool = False  # the last prompt stage's tokens came back (or the pass failed)
    acked: set[int] = field(default_factory=set)  # prompt stages (0-based in the prompt pipeline) that reported
    expected: int = 0  # how many prompt stages will report (all, or up to the one where the pass failed)
    ok: bool = True  # every report said landed
    why: str = ""
    failed: bool = False  # the pass itself failed (a stage refused it, or it was overdue): its members were failed


class DisaggScheduler(Scheduler):
    def __init__(self, num_microbatches: int, microbatch_size: int, prompt_stages: int, prompt_microbatches: int,
                 prompt_microbatch_size: int) -> None:
        super().__init__(num_microbatches, microbatch_size)
        if prompt_stages < 1 or prompt_microbatches < 1 or prompt_microbatch_size < 1:
            raise ValueError("need at least one prompt stage and one prompt microbatch of at least one slot")
        self.prompt_stages = prompt_stages
        n = num_microbatches
        self.pmbs = [PromptBatch(n + p, list(range(p * prompt_microbatch_size, (p + 1) * prompt_microbatch_size)))
                     for p in range(prompt_microbatches)]
        self.landing: set[int] = set()  # receive slots reserved whose KV has not landed yet
        self.quarantine: dict[int, int] = {}  # receive slot -> prompt microbatch whose transfers may still write it
        self.receive_waits = 0  # requests that found no receive slot free when their prompt could have run
        self._held: set[int] = set()  # ids of the requests counted there (once each)
        self.tries: dict[int, int] = {}  # id(request) -> prompt passes whose KV failed to land (this epoch)
        self.paused_until = 0.0  # no new prompt pass before (after a pass whose KV did not land)
        self.pause = 0.0
        self.landed_bytes = 0
        self.now = 0.0  # the latest time given (next_steps, kv_sent)

    # ------------------------------------------------------------------ which pipeline

    def is_prompt(self, mb_index: int) -> bool:
        return mb_index >= len(self.mbs)

    def inflight_of(self, mb_index: int) -> InFlight | None:
        p = self._pmb(mb_index)
        return p.inflight if p is not None else super().inflight_of(mb_index)

    def _pmb(self, mb_index: int) -> PromptBatch | None:
        p = mb_index - len(self.mbs)
        return self.pmbs[p] if 0 <= p < len(self.pmbs) else None

    @property
    def receive_waiting(self) -> int:
        """Requests waiting now only because the token pipeline has no free slot."""
        return len(self.waiting) if self.waiting and self._free_receive() is None else 0

    # ------------------------------------------------------------------ slots

    def _free(self, mb: Microbatch) -> list[int]:
        return [s for s in mb.slots if s not in mb.members and s not in self.quarantine]

    def _free_receive(self) -> tuple[Microbatch, int] | None:
        """A free token-pipeline slot, in the microbatch with the fewest members (balanced microbatches)."""
        best: tuple[Microbatch, list[int]] | None = None
        for mb in self.mbs:
            free = self._free(mb)
            if free and (best is None or len(mb.members) < len(best[0].members)):
                best = (mb, free)
        return (best[0], best[1][0]) if best is not None else None

    def release(self, req: Request) -> None:
        """Free the request's receive slot - unless its KV may still be on the way: then it is quarantined until the
        prompt stages reported (or a new epoch began)."""
        if req.slot is not None and req.slot in self.landing:
            self.landing.discard(req.slot)
            owner = next((p for p in self.pmbs if p.inflight is not None and req.slot in p.dest), None)
            if owner is not None:
                self.quarantine[req.slot] = owner.index
        self._held.discard(id(req))
        self.tries.pop(id(req), None)
        super().release(req)

    # ------------------------------------------------------------------ epochs

    def reset_epoch(self, epoch: int, keep_cache: bool = False,
                    valid: Callable[[Request], int] | None = None) -> None:
        """Token microbatches as the colocated scheduler resets them; prompts in flight are void: their requests go
        back to the front of the queue (in order), their receive slots free again."""
        again: list[Request] = []
        for p in self.pmbs:
            if p.inflight is not None:
                for (req, _, _), slot in zip(p.inflight.members, p.dest):
                    if req.slot == slot and slot in self.landing and not req.done:
                        again.append(req)
            p.inflight, p.result, p.failed = None, False, False
        for req in again:
            self.landing.discard(req.slot)  # type: ignore[arg-type]
            super().release(req)
            req.cached = 0
        self.landing.clear()
        self.quarantine.clear()
        self.tries.clear()  # a new epoch: what failed (a streamer, a stage) was rebuilt
        self.paused_until = self.pause = 0.0
        super().reset_epoch(epoch, keep_cache, valid)
        self.waiting.extendleft(reversed(again))

    # ------------------------------------------------------------------ steps

    def _admit(self, mb: Microbatch) -> None:
        """Token microbatches take members only from the prompt pipeline (as their KV lands)."""

    def _step(self, mb: Microbatch, now: float) -> StepRequest:
        landing = {s: mb.members.pop(s) for s in list(mb.members) if s in self.landing}
        try:
            return super()._step(mb, now)
        finally:
            mb.members.update(landing)

    def next_steps(self, now: float) -> list[StepRequest]:
        self.now = now
        for p in self.pmbs:  # passes whose tokens came back (the controller committed them) and KV all reported
            self._maybe_settle(p)
        out = []
        for mb in self.mbs:
            if mb.inflight is None and any(s not in self.landing for s in mb.members):
                out.append(self._step(mb, now))
        for p in self.pmbs:
            if p.inflight is None and now >= self.paused_until:
                step = self._prompt_step(p, now)
                if step is not None:
                    out.append(step)
        if self.waiting and self._free_receive() is None:  # back-pressure: these wait for a receive slot
            for req in self.waiting:
                if id(req) not in self._held:
                    self._held.add(id(req))
                    self.receive_waits += 1
        return out

    def _prompt_step(self, p: PromptBatch, now: float) -> StepRequest | None:
        """Fill the idle prompt microbatch with waiting requests, each with a receive slot reserved."""
        chunks, token_ids, sampling, members, dest = [], [], [], [], []
        for pslot in p.slots:
            while self.waiting and self.waiting[0].cancelled:
                self.waiting.popleft()
            if not self.waiting:
                break
            got = self._free_receive()
            if got is None:
                break
            mb, slot = got
            req = self.waiting.popleft()
            req.mb, req.slot, req.cached = mb.index, slot, 0
            mb.members[slot] = req
            self.landing.add(slot)
            tokens = req.tokens
            chunks.append(Chunk(pslot, 0, len(tokens)))
            token_ids.extend(tokens)
            sampling.append(req.sampling)
            members.append((req, len(tokens), True))
            dest.append(slot)
        if not chunks:
            return None
        p.steps += 1
        p.inflight = InFlight(p.steps, now, members)
        p.dest, p.result, p.acked, p.expected, p.ok, p.why = dest, False, set(), self.prompt_stages, True, ""
        p.failed = False
        return StepRequest(self.epoch, p.index, p.steps, chunks, token_ids, sampling, kv_to=dest)

    # ------------------------------------------------------------------ results

    def complete(self, mb_index: int, step: int) -> InFlight | None:
        if not self.is_prompt(mb_index):
            return super().complete(mb_index, step)
        p = self._pmb(mb_index)
        if p is None or p.inflight is None or p.inflight.step != step or p.result:
            return None
        p.result = True  # settled by next_steps, once the controller committed (or failed) its members
        return p.inflight

    def prompt_failed(self, mb_index: int, step: int, stage: int) -> None:
        """Prompt stage `stage` (0-based in the prompt pipeline) failed this pass: the stages after it never ran it,
        so only stages 0..stage report its KV."""
        p = self._pmb(mb_index)
        if p is not None and p.inflight is not None and p.inflight.step == step:
            p.expected = min(p.expected, stage + 1)
            p.ok, p.failed, p.why = False, True, p.why or f"prompt stage {stage} failed the pass"

    def kv_sent(self, stage: int, mb_index: int, step: int, ok: bool, nbytes: int = 0, why: str = "",
                now: float = 0.0) -> None:
        """Prompt stage `stage` reports its KV of pass (mb_index, step) (its first report counts)."""
        self.now = max(self.now, now)
        p = self._pmb(mb_index)
        if p is None or p.inflight is None or p.inflight.step != step or stage in p.acked:
            return
        p.acked.add(stage)
        self.landed_bytes += nbytes if ok else 0
        if not ok:
            p.ok, p.why = False, p.why or why
        self._maybe_settle(p)

    def _maybe_settle(self, p: PromptBatch) -> None:
        if p.result and len(p.acked) >= p.expected:
            self._settle(p)

    def _settle(self, p: PromptBatch) -> None:
        """Every transfer of the pass is over: its members join their token microbatch (KV landed), or go back to
        the queue's front to run their prompt again (it did not land); quarantined slots free up."""
        if p.inflight is None:
            return
        again = []
        for (req, n, _), slot in zip(p.inflight.members, p.dest):
            if self.quarantine.get(slot) == p.index:
                del self.quarantine[slot]
            if req.slot != slot or slot not in self.landing:
                continue  # released meanwhile (its slot was quarantined, and is free now)
            self.landing.discard(slot)
            if p.ok and p.result:
                req.cached = n
                self._held.discard(id(req))
            elif p.result and not p.failed and not req.done:
                again.append(req)
        p.inflight = None
        p.result = p.failed = False
        if again:  # the KV did not land: give whatever failed a moment before the next pass
            self.pause = min(8.0, self.pause * 2 or RETRY_PAUSE_S)
            self.paused_until = self.now + self.pause
        elif p.ok:
            self.pause = 0.0
        for req in again:
            tries = self.tries.get(id(req), 0) + 1
            super().release(req)
            if tries >= MAX_PROMPT_TRIES:
                self.failed.append((req, f"its prompt's KV did not reach the token pipeline in {tries} tries "
                                         f"({p.why})"))
            else:
                self.tries[id(req)] = tries
                req.cached = 0
                self.waiting.appendleft(req)

    def overdue(self, now: float, timeout: float) -> list[Microbatch]:  # type: ignore[override]
        late = super().overdue(now, timeout)
        for p in self.pmbs:
            if p.inflight is not None and not p.result and now - p.inflight.sent_at > timeout:
                p.ok, p.failed, p.why = False, True, "the prompt pipeline did not answer in time"
                late.append(p)  # type: ignore[arg-type]
        return late
