"""A last stage's record of what its slots generated, for OpenAI's presence and frequency penalties (vLLM's: over
the generated tokens, not the prompt's).

Per logical slot: the generated tokens the stage saw fed (every step's token ids travel to the last stage), from
the request's output start up to the chunk it computes now, and their counts on the device, one row per slot in
one [rows, vocab] tensor that grows as more slots are penalized at once. A chunk first cuts the slot's tokens at
its start (a rollback to a replicated watermark replays the positions after it), or replaces them with the
history it carries (a request's first step in an epoch: the controller's copy, bus/scheduler.py); its own
generated tokens are then added. Counts change by the step's new tokens (one transfer to the device for the whole
step); a slot whose tokens were replaced or cut is counted anew. Compute thread of a stage.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from bus.messages import Chunk, Sampling
from stages.errors import StepVoid


class OutputCounts:
    def __init__(self, vocab: int, device: torch.device) -> None:
        self.vocab = vocab
        self.device = device
        self.tokens: dict[int, list[int]] = {}  # slot -> its generated tokens, from its output's start
        self.row: dict[int, int] = {}  # slot -> its row in `counts`
        self.counts = torch.zeros(0, vocab, device=device)

    def update(self, slots: Sequence[int], chunks: Sequence[Chunk], sampling: Sequence[Sampling],
               ids: Sequence[Sequence[int]]) -> torch.Tensor:
        """Bring each penalized slot up to its chunk (ids: the chunk's token ids) and return their counts
        [len(slots), vocab]. StepVoid: a slot's tokens before its chunk are not known here (a restarted stage and
        no history): the controller sends the step again with them."""
        fresh, adds = [], []
        for slot, c, s, chunk_ids in zip(slots, chunks, sampling, ids):
            need = max(0, c.start - s.output_start)
            known = list(s.history) if s.history is not None else self.tokens.get(slot, [] if need == 0 else None)
            if known is None or len(known) < need:
                self.drop(slot)
                raise StepVoid(f"slot {slot}'s generated tokens before position {c.start} are not known here "
                               "(penalties)")
            new = list(chunk_ids[max(0, s.output_start - c.start):])
            anew = s.history is not None or slot not in self.row or len(known) > need
            del known[need:]
            known.extend(new)
            self.tokens[slot] = known
            row = self._row(slot)
            if anew:
                fresh.append(row)
            adds.extend((row, t) for t in (known if anew else new))
        if fresh:
            self.counts.index_fill_(0, torch.tensor(fresh, device=self.device), 0.0)
        if adds:
            pairs = torch.tensor(adds, dtype=torch.long)
            if self.device.type == "cuda":  # pinned: one copy for the step, behind the stream's work
                pairs = pairs.pin_memory().to(self.device, non_blocking=True)
            self.counts.index_put_((pairs[:, 0], pairs[:, 1]), torch.ones(len(adds), device=self.device),
                                   accumulate=True)
        return self.counts.index_select(0, torch.tensor([self.row[s] for s in slots], device=self.device))

    def drop(self, slot: int) -> None:
        """The slot holds no penalized request (any more): its row is free for another."""
        self.tokens.pop(slot, None)
        self.row.pop(slot, None)

    def _row(self, slot: int) -> int:
        row = self.row.get(slot)
        if row is not None:
            return row
        used = set(self.row.values())
        row = next((r for r in range(self.counts.shape[0]) if r not in used), self.counts.shape[0])
        if row == self.counts.shape[0]:  # grow (doubling): one row per slot penalized at once
            grown = torch.zeros(max(4, 2 * row), self.vocab, device=self.device)
            grown[:row] = self.counts
            self.counts = grown
        self.row[slot] = row
        self.counts[row].zero_()
        return row
