"""The description of one step's work on a shard: which sequences, where their new tokens go, who attends to what.

A step is a list of `SeqChunk`s: sequence in KV slot `slot` already holds `start` tokens and adds `length`
new ones. A prompt pass is `start=0, length=len(prompt)`; a decode step is `length=1`; recomputation after a
failure or a resume from a replica watermark is any `start` with any `length` — one code path for all.
The new tokens of all chunks are flattened in chunk order into N rows ("the flat layout"): every linear
layer runs once over all of them, and only attention looks at sequences separately, in up to two groups:
multi-token chunks (padded to the longest, causal mask) and single-token chunks (decode).

All index tensors of a step are built once on the host, moved to the device in one copy, and shared by every
layer of the shard. Runs in the stage process (and in `bin/dejavu-generate`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from stages.errors import CapacityError, InvalidRequestError


@dataclass(frozen=True)
class SeqChunk:
    """Sequence in KV slot `slot`: `start` tokens already cached, `length` new tokens this step."""

    slot: int
    start: int
    length: int


@dataclass
class AttnGroup:
    """Sequences whose attention runs as one padded [B, T] batch.

    `view_shape` set: the group is the whole flat layout, already [B, T] in order (no gather, no scatter).
    Otherwise `rows` [B, T] gathers queries from the flat layout (pads repeat a real row) and
    `pad_index` / `out_rows` put the real rows of the result back.
    """

    batch: int
    width: int  # T: queries per sequence (padded)
    kv_slots: slice | torch.Tensor
    kv_len: int  # keys read per sequence from the cache
    causal: bool  # True: plain causal over [0, T) and no mask needed
    mask: torch.Tensor | None  # bool [B, 1, T, kv_len], True = may attend
    q_pos: torch.Tensor  # [B, T] absolute position of each (padded) query
    view_shape: tuple[int, int] | None = None
    rows: torch.Tensor | None = None
    pad_index: torch.Tensor | None = None
    out_rows: torch.Tensor | None = None
    _bias: dict[int, torch.Tensor] = field(default_factory=dict)

    def allowed(self) -> torch.Tensor:
        """bool [B, 1, T, kv_len] — the mask, materialised also for the causal fast path."""
        if self.mask is not None:
            return self.mask
        k = torch.arange(self.kv_len, device=self.q_pos.device)
        return (k[None, None, :] <= self.q_pos[:, :, None]).unsqueeze(1)

    def additive_bias(self, slopes: torch.Tensor) -> torch.Tensor:
        """ALiBi: float [B, H, T, kv_len] = slope_h * (key_pos - query_pos), -inf where not allowed.

        Hugging Face adds slope * key_pos; softmax is invariant to a per-row shift, so both are the same
        function, and the relative form keeps nearby keys exact in bf16/fp16. Cached per step.
        """
        key = id(slopes)
        bias = self._bias.get(key)
        if bias is None:
            k = torch.arange(self.kv_len, device=slopes.device, dtype=torch.float32)
            rel = k[None, None, :] - self.q_pos[:, :, None].float()  # [B, T, L]
            bias = slopes.float()[None, :, None, None] * rel[:, None, :, :]
            bias = bias.masked_fill(~self.allowed(), float("-inf")).to(slopes.dtype)
            self._bias[key] = bias
        return bias


@dataclass
class StepPlan:
    chunks: tuple[SeqChunk, ...]
    num_tokens: int
    positions: torch.Tensor  # [N] absolute position of each new token
    token_slots: torch.Tensor  # [N] KV slot of each new token
    last_rows: torch.Tensor  # [B] flat row of each chunk's last token
    groups: list[AttnGroup]

    @property
    def device(self) -> torch.device:
        return self.positions.device


def validate_chunks(chunks: Sequence[SeqChunk], num_slots: int, max_seq_len: int) -> None:
    if not chunks:
        raise InvalidRequestError("a step needs at least one sequence")
    seen: set[int] = set()
    for c in chunks:
        if not 0 <= c.slot < num_slots:
            raise InvalidRequestError(f"KV slot {c.slot} out of range [0, {num_slots})")
        if c.slot in seen:
            raise InvalidRequestError(f"KV slot {c.slot} appears twice in one step")
        seen.add(c.slot)
        if c.length < 1 or c.start < 0:
            raise InvalidRequestError(f"chunk {c}: needs start >= 0 and length >= 1")
        if c.start + c.length > max_seq_len:
            raise CapacityError(
                f"sequence in slot {c.slot} would reach {c.start + c.length} tokens; the KV pool holds at most "
                f"{max_seq_len} per sequence (raise --max-seq-len)"
            )


def build_plan(
    chunks: Sequence[SeqChunk],
    device: torch.device,
    *,
    num_slots: int,
    max_seq_len: int,
    sliding_window: int | None = None,
) -> StepPlan:
    chunks = tuple(chunks)
    validate_chunks(chunks, num_slots, max_seq_len)
    offsets = [0]
    for c in chunks:
        offsets.append(offsets[-1] + c.length)
    n = offsets[-1]
    multi = [i for i, c in enumerate(chunks) if c.length > 1]
    single = [i for i, c in enumerate(chunks) if c.length == 1]

    # Everything integer is packed into one host tensor and moved with one copy.
    host: list[torch.Tensor] = []
    host.append(torch.cat([torch.arange(c.start, c.start + c.length) for c in chunks]))  # positions
    host.append(torch.cat([torch.full((c.length,), c.slot) for c in chunks]))  # token slots
    host.append(torch.tensor([offsets[i + 1] - 1 for i in range(len(chunks))]))  # last rows
    specs = []
    for members in (multi, single):
        if members:
            specs.append(_group_host(chunks, offsets, members, n, host))
    flat = torch.cat([t.reshape(-1) for t in host]).to(device=device, dtype=torch.long, non_blocking=True)
    parts = list(torch.split(flat, [t.numel() for t in host]))
    views = [p.view(t.shape) for p, t in zip(parts, host)]
    positions, token_slots, last_rows = views[0], views[1], views[2]
    groups = [spec.finish(views, device, sliding_window) for spec in specs]
    return StepPlan(chunks, n, positions, token_slots, last_rows, groups)


@dataclass
class _GroupHost:
    members: list[int]
    batch: int
    width: int
    kv_len: int
    starts: list[int]
    lengths: list[int]
    slots: list[int]
    identity: bool
    idx: dict[str, int]  # name -> index into the host list

    def finish(self, views: list[torch.Tensor], device: torch.device, window: int | None) -> AttnGroup:
        q_pos = views[self.idx["q_pos"]]
        s0 = self.slots[0]
        contiguous = self.slots == list(range(s0, s0 + self.batch))
        kv_slots: slice | torch.Tensor = slice(s0, s0 + self.batch) if contiguous else views[self.idx["slots"]]
        all_fresh = all(s == 0 for s in self.starts)
        windowed = window is not None and self.kv_len > window
        causal = all_fresh and not windowed and self.width > 1
        mask = None
        uniform_decode = self.width == 1 and len(set(self.starts)) == 1 and not windowed
        if not causal and not uniform_decode:
            k = torch.arange(self.kv_len, device=device)
            allowed = k[None, None, :] <= q_pos[:, :, None]
            if windowed:
                allowed &= k[None, None, :] > (q_pos[:, :, None] - window)
            mask = allowed.unsqueeze(1)
        group = AttnGroup(self.batch, self.width, kv_slots, self.kv_len, causal, mask, q_pos)
        if self.identity:
            group.view_shape = (self.batch, self.width)
        else:
            group.rows = views[self.idx["rows"]]
            group.pad_index = views[self.idx["pad_index"]]
            group.out_rows = views[self.idx["out_rows"]]
        return group


def _group_host(
    chunks: tuple[SeqChunk, ...], offsets: list[int], members: list[int], n: int, host: list[torch.Tensor]
) -> _GroupHost:
    cs = [chunks[i] for i in members]
    width = max(c.length for c in cs)
    batch = len(cs)
    identity = batch * width == n and all(c.length == width for c in cs) and members == list(range(len(chunks)))
    idx: dict[str, int] = {}

    def add(name: str, t: torch.Tensor) -> None:
        idx[name] = len(host)
        host.append(t)

    t = torch.arange(width)
    starts = torch.tensor([c.start for c in cs])
    add("q_pos", starts[:, None] + t[None, :])
    add("slots", torch.tensor([c.slot for c in cs]))
    if not identity:
        first = torch.tensor([offsets[i] for i in members])
        lens = torch.tensor([c.length for c in cs])
        # pads repeat the sequence's last real row: finite inputs, results discarded
        add("rows", first[:, None] + torch.minimum(t[None, :], lens[:, None] - 1))
        real = t[None, :] < lens[:, None]
        add("pad_index", (torch.arange(batch)[:, None] * width + t[None, :])[real])
        add("out_rows", (first[:, None] + t[None, :])[real])
    return _GroupHost(
        members,
        batch,
        width,
        max(c.start + c.length for c in cs),
        [c.start for c in cs],
        [c.length for c in cs],
        [c.slot for c in cs],
        identity,
        idx,
    )
