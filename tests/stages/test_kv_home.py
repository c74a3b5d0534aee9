"""Where a CPU stage's KV pool lives: with no streamer to keep it, the stage gets private memory (a restart
then recomputes) within its deadline and leaves nothing behind. Taking a kept pool over through a real
streamer is tested in tests/streamer/test_process.py and, end to end, in tests/recovery."""

from __future__ import annotations

import asyncio
import time

import torch

from stages.kv_home import open_home
from streamer.config import SHM_DIR, SHM_PREFIX
from streamer.layout import PoolLayout


def test_without_a_streamer_the_pool_is_private_and_nothing_is_left_behind() -> None:
    layout = PoolLayout(0, 2, 2, 16, 2, 8, torch.float32)
    prefix = f"test{time.monotonic_ns()}"

    async def go():  # type: ignore[no-untyped-def]
        t0 = time.monotonic()
        home = await open_home("kv-stage-0", layout, f"ipc:///tmp/{prefix}.control", 0, prefix, timeout=0.5)
        assert time.monotonic() - t0 < 5.0
        assert home.memory is None and home.tensor is None and not home.intact
        await home.close(0.5)

    asyncio.run(go())
    assert not list(SHM_DIR.glob(f"{SHM_PREFIX}-{prefix}-*"))
