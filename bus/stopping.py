"""When a sequence stops, and why — shared by the offline generator and the controller (pure, no torch)."""

from __future__ import annotations

from collections.abc import Collection

STOP = "stop"  # an EOS or stop token was generated (and is part of the output, as in HF generate)
LENGTH = "length"  # max_new_tokens reached, or the sequence filled its KV slot
CANCELLED = "cancelled"
ERROR = "error"


def finish_reason(
    token: int,
    generated: int,
    max_new_tokens: int,
    seq_len: int,
    max_seq_len: int,
    stop_ids: Collection[int],
) -> str | None:
    """After committing `token` (the `generated`-th new token; sequence now `seq_len` long): stop or go on.

    The next decode step would write position seq_len - 1 ... so a sequence may grow to max_seq_len tokens,
    the last of which is never fed back.
    """
    if token in stop_ids:
        return STOP
    if generated >= max_new_tokens or seq_len >= max_seq_len:
        return LENGTH
    return None
