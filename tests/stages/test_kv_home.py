"""Where a CPU stage's KV pool lives: with no streamer to keep it, the stage gets private memory (a restart
then recomputes) within its deadline and leaves nothing behind; through a real streamer, which incarnation
may take a kept pool over. Taking it over is also tested in tests/streamer/test_process.py and, end to end, in
tests/recovery."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

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


def test_a_kept_pool_is_taken_over_only_by_the_incarnation_after_its_owner() -> None:
    """Through a real streamer: the pool a killed stage left is its successor's, KV and all; a later incarnation
    gets a fresh pool instead (some incarnation in between computed elsewhere: the kept bytes are stale), and
    the stale file is released with the pool it replaces."""
    from streamer.memory import SharedPoolMemory
    from tests.streamer import fake_stage
    from tests.streamer.helpers import StreamerProc, fill_random
    from tests.streamer.test_process import _start_fake_stage

    h = StreamerProc.start("kvh", "--swap-gib", str(1 / 1024), "--receive-gib", str(1 / 1024))
    prefix = f"test{time.monotonic_ns()}"
    lay = fake_stage.LAYOUT
    stage, files = None, []  # what a failure midway must not leave in /dev/shm
    try:
        # the dead owner was incarnation 0 (a stage name each: the streamer remembers a client's transfer ids)
        for name, incarnation, seed, intact in (("kv-stage-0", 2, 91, False), ("kv-stage-1", 1, 92, True)):
            stage, path = _start_fake_stage(h.control, name, seed)
            files.append(path)
            stage.kill()
            stage.wait(10)

            async def go(name: str = name, incarnation: int = incarnation, seed: int = seed, intact: bool = intact,
                         path: Path = path) -> None:
                home = await open_home(name, lay, h.control, incarnation, prefix, timeout=10)
                assert home.intact == intact and home.memory is not None
                if intact:
                    assert home.memory.path == path
                    expected = fill_random(torch.empty(lay.shape, dtype=lay.dtype), seed)
                    assert torch.equal(home.memory.tensor.view(torch.int16), expected.view(torch.int16))
                else:
                    assert home.memory.path != path and not path.exists()
                assert isinstance(home.memory, SharedPoolMemory)
                info = await home.client.pool_info(name)  # type: ignore[union-attr]
                assert (info.owner_incarnation, info.owner_alive) == (incarnation, True)
                for pool in (f"{name}-swap", f"{name}-recv"):  # what the fake stage allocated besides
                    await home.client.free_pool(pool)  # type: ignore[union-attr]
                await home.close(10)  # unregistered: the streamer unlinks it
                assert not home.memory.path.exists()

            asyncio.run(go())
        assert h.stop() == 0
        assert not list(SHM_DIR.glob(f"{SHM_PREFIX}-{prefix}-*"))
    finally:
        if stage is not None and stage.poll() is None:
            stage.kill()
            stage.wait(5)
        h.kill()
        for f in [*files, *SHM_DIR.glob(f"{SHM_PREFIX}-{prefix}-*")]:
            f.unlink(missing_ok=True)
