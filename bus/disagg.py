"""The disaggregated scheduler (the paper's section 4, issue 19): a prompt pipeline and a token pipeline.

Prompt passes run on the prompt pipeline (its own stages, its own small KV pools: `prompt_microbatches` passes in
flight, and as many times `prompt_microbatch_size` prompt slots); decode steps run on the token pipeline, with the
microbatches and slots of the colocated scheduler it extends. A prompt stage's streamer moves the KV it computed
into the token stage that owns each layer (stages/kv_push.py), straight into the request's slot there (its
*receive slot*), so nothing is copied twice. Two ways:

- **Streamed as it is written.** When the token pipeline has a free slot as the pass starts, it is reserved for
  the request, and the pass's KV goes there layer by layer while the pass runs (StepRequest.kv_to).
- **Parked, then moved.** When the token pipeline is full, the prompt still runs (the prompt pipeline runs ahead,
  as the paper's does into its receive buffers): its KV stays in the prompt stages' slot (`receive_waiting`
  counts these requests) until a decode frees a token slot; then one transfer per prompt stage moves it there
  (KvMove). Prompt slots bound how far the prompt side runs ahead: a full prompt pool makes prompts wait in the
  queue (back-pressure, never an overrun of the token side's memory, never a deadlock: decodes free slots on
  their own).

A request joins its token microbatch once its first token came back (the last prompt stage samples it: the
client has it at once) and every prompt stage reported its KV landed (KvSent, for the pass or the move). Until
then its slot is *landing*: reserved, not stepped. A prompt stage reports every pass and move it ran, landed or
not; so the controller knows when no transfer can still write a receive slot or read a prompt slot. A slot whose
request ended while its KV was on the way stays *quarantined* until then, never handed to another request while a
late transfer could overwrite it; a prompt slot is free again only once nothing reads it. A new epoch ends every
transfer of the old one (the stages cancel theirs before acknowledging it; a dead stage's are aborted by its
streamer): prompts in flight or parked go back to the queue's front, quarantines are lifted.

Pure: no sockets, no clocks except the `now` passed in.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import msgspec

from bus.messages import Chunk, KvMove, StepRequest
from bus.requests import Request
from bus.scheduler import InFlight, Microbatch, Scheduler

MAX_PROMPT_TRIES = 3  # prompt passes of one epoch a request may have whose KV failed to land before it fails
RETRY_PAUSE_S = 1.0  # after KV that did not land, no new pass or move for this long (doubling, at most 8 s):
# a streamer that died fails every transfer at once, and the controller learns of it only a moment later
PARKED = -1  # a pass member's receive slot when the token pipeline had none free: its KV waits in the prompt slot


@dataclass
class Delivery:
    """KV on its way from the prompt stages' slots into receive slots: a pass's (streamed while it runs) or a
    move's (a parked request's, once a token slot freed). Over when every prompt stage that ran it reported."""

    key: int  # owner of the receive slots it may still write (quarantine): a pass's microbatch, or -1 - move id
    members: list[tuple[Request, int, int, int]]  # (request, positions [0, n), receive slot or PARKED, prompt slot)
    expected: int  # prompt stages that will report
    result: bool  # a pass: its first tokens came back (or it failed); a move: always
    acked: set[int] = field(default_factory=set)
    ok: bool = True
    failed: bool = False  # the pass itself failed (refused by a stage, overdue): its members were failed
    why: str = ""

    @property
    def over(self) -> bool:
        return self.result and len(self.acked) >= self.expected


@dataclass
class PromptBatch:
    """A prompt microbatch: one pass in flight at a time, over prompt slots taken from the free ones."""

    index: int  # its microbatch number on the wire (after the token microbatches')
    inflight: InFlight | None = None
    steps: int = 0
    delivery: Delivery | None = None


@dataclass
class Parked:
    req: Request
    n: int  # positions [0, n) in the prompt slot
    pslot: int


class DisaggScheduler(Scheduler):
    def __init__(self, num_microbatches: int, microbatch_size: int, prompt_stages: int, prompt_microbatches: int,
                 prompt_microbatch_size: int) -> None:
        super().__init__(num_microbatches, microbatch_size)
        if prompt_stages < 1 or prompt_microbatches < 1 or prompt_microbatch_size < 1:
            raise ValueError("need at least one prompt stage and one prompt microbatch of at least one slot")
        self.prompt_stages, self.prompt_size = prompt_stages, prompt_microbatch_size
        self.pmbs = [PromptBatch(num_microbatches + p) for p in range(prompt_microbatches)]
        self.pfree: list[int] = list(range(prompt_microbatches * prompt_microbatch_size))  # free prompt slots
        self.landing: set[int] = set()  # receive slots reserved whose KV has not landed yet
        self.quarantine: dict[int, int] = {}  # receive slot -> the delivery (key) that may still write it
        self.parked: deque[Parked] = deque()
        self.moves: dict[int, Delivery] = {}  # move id -> its delivery
        self.move_seq = 0
        self.move_out: list[KvMove] = []  # moves to send to every prompt stage (the controller drains it)
        self.receive_waits = 0  # requests whose prompt ran while no receive slot was free (they were parked)
        self.tries: dict[int, int] = {}  # id(request) -> passes whose KV failed to land (this epoch)
        self.paused_until = 0.0  # no new pass or move before (after KV that did not land)
        self.pause = 0.0
        self.landed_bytes = 0
        self.now = 0.0  # the latest time given (next_steps, kv_sent)

    # ------------------------------------------------------------------ which pipeline

    def is_prompt(self, mb_index: int) -> bool:
        return mb_index >= len(self.mbs)

    def _pmb(self, mb_index: int) -> PromptBatch | None:
        p = mb_index - len(self.mbs)
        return self.pmbs[p] if 0 <= p < len(self.pmbs) else None

    def inflight_of(self, mb_index: int) -> InFlight | None:
        p = self._pmb(mb_index)
        return p.inflight if p is not None else super().inflight_of(mb_index)

    def running(self) -> Iterable[Request]:
        yield from super().running()
        yield from (x.req for x in self.parked if not x.req.done)

    @property
    def receive_waiting(self) -> int:
        """Requests whose prompt ran and whose KV waits for a receive slot in the token pipeline."""
        return sum(1 for x in self.parked if not x.req.done)

    # ------------------------------------------------------------------ slots

    def _free_receive(self) -> tuple[Microbatch, int] | None:
        """A free token-pipeline slot, in the microbatch with the fewest members (balanced microbatches)."""
        best: tuple[Microbatch, int] | None = None
        for mb in self.mbs:
            free = next((s for s in mb.slots if s not in mb.members and s not in self.quarantine), None)
            if free is not None and (best is None or len(mb.members) < len(best[0].members)):
                best = (mb, free)
        return best

    def _reserve(self, req: Request) -> int:
        """A receive slot for `req`, or PARKED when none is free."""
        got = self._free_receive()
        if got is None:
            return PARKED
        mb, slot = got
        req.mb, req.slot, req.cached = mb.index, slot, 0
        mb.members[slot] = req
        self.landing.add(slot)
        return slot

    def _deliveries(self) -> Iterable[Delivery]:
        yield from (p.delivery for p in self.pmbs if p.delivery is not None)
        yield from self.moves.values()

    def release(self, req: Request) -> None:
        """Free the request's receive slot - unless its KV may still be on the way: then it is quarantined until the
        prompt stages reported (or a new epoch began). A parked request's prompt slot frees when nothing reads it."""
        if req.slot is not None and req.slot in self.landing:
            self.landing.discard(req.slot)
            owner = next((d for d in self._deliveries() if any(m[0] is req and m[2] == req.slot for m in d.members)),
                         None)
            if owner is not None:
                self.quarantine[req.slot] = owner.key
        self.tries.pop(id(req), None)
        super().release(req)

    # ------------------------------------------------------------------ epochs

    def reset_epoch(self, epoch: int, keep_cache: bool = False,
                    valid: Callable[[Request], int] | None = None) -> None:
        """Token microbatches as the colocated scheduler resets them; passes and moves in flight and parked prompts
        are void: their requests go back to the front of the queue (oldest first), every prompt slot frees."""
        again: list[Request] = []
        for d in list(self.moves.values()) + [p.delivery for p in self.pmbs if p.delivery is not None]:
            for req, _, slot, _ in d.members:
                if not req.done and (slot == PARKED or (req.slot == slot and slot in self.landing)):
                    again.append(req)
        again = [x.req for x in self.parked if not x.req.done] + again
        for req in again:
            if req.slot is not None:
                self.landing.discard(req.slot)
                super().release(req)
            req.cached = 0
        for p in self.pmbs:
            p.inflight, p.delivery = None, None
        self.moves.clear()
        self.parked.clear()
        self.move_out.clear()
        self.pfree = list(range(len(self.pmbs) * self.prompt_size))
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
            step = super()._step(mb, now)
        finally:
            mb.members.update(landing)
        assert mb.inflight is not None
        joined = [k for k, (req, _, _) in enumerate(mb.inflight.members) if req.join_pending]
        return msgspec.structs.replace(step, joined=joined) if joined else step

    def _step_ahead(self, mb: Microbatch, now: float) -> StepRequest | None:
        """The lookahead step of a token microbatch (one token stage: it takes token ids and samples), as the
        colocated scheduler builds it, of the members whose KV is in: a member that joined at the step in flight
        is fed back there; one that joins now (its KV landed since) comes with its first token, marked `joined`."""
        landing = {s: mb.members.pop(s) for s in list(mb.members) if s in self.landing}
        try:
            step = super()._step_ahead(mb, now)
        finally:
            mb.members.update(landing)
        if step is None:
            return None
        assert mb.ahead is not None and mb.inflight is not None
        before = {id(req) for req, _, _ in mb.inflight.members}
        joined = [k for k, (req, _, _) in enumerate(mb.ahead.members) if req.join_pending and id(req) not in before]
        return msgspec.structs.replace(step, joined=joined) if joined else step

    def next_steps(self, now: float) -> list[StepRequest]:
        self.now = now
        for p in self.pmbs:  # passes whose tokens came back (the controller committed them) and KV all reported
            if p.delivery is not None and p.delivery.over:
                self._settle(p.delivery)
        out = []
        for mb in self.mbs:
            if mb.inflight is None and any(s not in self.landing for s in mb.members):
                out.append(self._step(mb, now))
            if self.lookahead and mb.inflight is not None and mb.ahead is None:
                ahead = self._step_ahead(mb, now)
                if ahead is not None:
                    out.append(ahead)
        if now >= self.paused_until:
            self._move_parked()
            for p in self.pmbs:
                if p.inflight is None and p.delivery is None:
                    step = self._prompt_step(p, now)
                    if step is not None:
                        out.append(step)
        return out

    def _move_parked(self) -> None:
        """Parked prompts (oldest first) into the receive slots that are free now: one move for all of them."""
        while self.parked and self.parked[0].req.done:  # ended while parked (cancelled, stopped at its first token)
            self.pfree.append(self.parked.popleft().pslot)
        members = []
        while self.parked:
            x = self.parked[0]
            if x.req.done:
                self.pfree.append(self.parked.popleft().pslot)
                continue
            slot = self._reserve(x.req)
            if slot == PARKED:
                break
            self.parked.popleft()
            members.append((x.req, x.n, slot, x.pslot))
        if members:
            self.move_seq += 1
            self.moves[self.move_seq] = Delivery(-1 - self.move_seq, members, self.prompt_stages, True)
            self.move_out.append(KvMove(self.epoch, self.move_seq, [Chunk(ps, 0, n) for _, n, _, ps in members],
                                        [slot for _, _, slot, _ in members]))

    def _prompt_step(self, p: PromptBatch, now: float) -> StepRequest | None:
        """Fill the idle prompt microbatch with waiting requests, as many as free prompt slots allow; each gets a
        receive slot if one is free, else it will be parked."""
        chunks, token_ids, sampling, members, delivery = [], [], [], [], []
        while self.waiting and self.pfree and len(chunks) < self.prompt_size:
            req = self.waiting.popleft()
            if req.cancelled or req.done:
                continue
            slot = self._reserve(req)
            if slot == PARKED:
                self.receive_waits += 1
            pslot = self.pfree.pop(0)
            tokens = req.tokens
            chunks.append(Chunk(pslot, 0, len(tokens)))
            token_ids.extend(tokens)
            sampling.append(req.sampling)
            members.append((req, len(tokens), True))
            delivery.append((req, len(tokens), slot, pslot))
        if not chunks:
            return None
        p.steps += 1
        p.inflight = InFlight(p.steps, now, members)
        p.delivery = Delivery(p.index, delivery, self.prompt_stages, False)
        return StepRequest(self.epoch, p.index, p.steps, chunks, token_ids, sampling,
                           kv_to=[slot for _, _, slot, _ in delivery])

    # ------------------------------------------------------------------ results

    def complete(self, mb_index: int, step: int, now: float | None = None, ran: bool = True,
                 keep_ahead: bool = True) -> InFlight | None:
        if not self.is_prompt(mb_index):
            done = super().complete(mb_index, step, now, ran, keep_ahead)
            for req, _, _ in done.members if done is not None and ran else ():
                req.join_pending = False  # (the step that told the token stages it joined came back, having run)
            return done
        p = self._pmb(mb_index)
        if p is None or p.inflight is None or p.inflight.step != step or p.delivery is None or p.delivery.result:
            return None
        p.delivery.result = True  # settled by next_steps, once the controller committed (or failed) its members
        done, p.inflight = p.inflight, None
        return done

    def prompt_failed(self, mb_index: int, step: int, stage: int) -> None:
        """Prompt stage `stage` (0-based in the prompt pipeline) failed this pass: the stages after it never ran it,
        so only stages 0..stage report its KV."""
        p = self._pmb(mb_index)
        if p is not None and p.inflight is not None and p.inflight.step == step and p.delivery is not None:
            d = p.delivery
            d.expected = min(d.expected, stage + 1)
            d.ok, d.failed, d.why = False, True, d.why or f"prompt stage {stage} failed the pass"

    def kv_sent(self, stage: int, mb_index: int, step: int, ok: bool, nbytes: int = 0, why: str = "",
                now: float = 0.0) -> None:
        """Prompt stage `stage` reports its KV of pass (mb_index, step), or of move `step` (mb_index -1); its first
        report counts."""
        self.now = max(self.now, now)
        if mb_index == -1:
            d = self.moves.get(step)
        else:
            p = self._pmb(mb_index)
            d = p.delivery if p is not None and p.steps == step else None
        if d is None or stage in d.acked:
            return
        d.acked.add(stage)
        self.landed_bytes += nbytes if ok else 0
        if not ok:
            d.ok, d.why = False, d.why or why
        if d.over:
            self._settle(d)

    def _settle(self, d: Delivery) -> None:
        """Every transfer of a pass or move is over: members whose KV landed join their token microbatch, members
        of a pass without a receive slot are parked, those whose KV did not land go back to the queue's front;
        quarantined receive slots and the prompt slots nothing reads any more free up."""
        if d.key >= 0:
            p = self._pmb(d.key)
            assert p is not None
            p.delivery = None
        else:
            self.moves.pop(-1 - d.key, None)
        again = []
        for req, n, slot, pslot in d.members:
            keep_pslot = False
            if slot == PARKED:
                if d.ok and not req.done:
                    self.parked.append(Parked(req, n, pslot))
                    keep_pslot = True
                elif not d.failed and not req.done:
                    again.append(req)
            else:
                if self.quarantine.get(slot) == d.key:
                    del self.quarantine[slot]
                if req.slot == slot and slot in self.landing:
                    self.landing.discard(slot)
                    if d.ok:
                        req.cached, req.join_pending = n, True
                    elif not d.failed and not req.done:
                        again.append(req)
            if not keep_pslot:
                self.pfree.append(pslot)
        if again:  # the KV did not land: give whatever failed a moment before the next pass
            self.pause = min(8.0, self.pause * 2 or RETRY_PAUSE_S)
            self.paused_until = self.now + self.pause
        elif d.ok:
            self.pause = 0.0
        for req in reversed(again):
            tries = self.tries.get(id(req), 0) + 1
            super().release(req)
            if tries >= MAX_PROMPT_TRIES:
                self.failed.append((req, f"its prompt's KV did not reach the token pipeline in {tries} tries "
                                         f"({d.why})"))
            else:
                self.tries[id(req)] = tries
                req.cached = 0
                self.waiting.appendleft(req)

    def overdue(self, now: float, timeout: float) -> list[Microbatch]:  # type: ignore[override]
        late = super().overdue(now, timeout)
        for p in self.pmbs:
            if p.inflight is not None and now - p.inflight.sent_at > timeout and p.delivery is not None:
                p.delivery.ok, p.delivery.failed = False, True
                p.delivery.why = "the prompt pipeline did not answer in time"
                late.append(p)  # type: ignore[arg-type]
        return late
