"""Shared helpers of the streamer tests: random pools and regions, byte-exact comparison, streamer processes."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch

from stages.kv_cache import KVPool
from streamer.layout import PoolLayout, Region

ROOT = Path(__file__).resolve().parents[2]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
T = TypeVar("T")




def child_env() -> dict[str, str]:
    """Environment for a streamer subprocess: the checkout first, then whatever PYTHONPATH this process had
    (on the GPU machines pyzmq and msgspec come from a directory named there)."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}

def random_layout(rng: random.Random, dtype: torch.dtype, first_layer: int = 0, num_layers: int | None = None,
                  slots: int | None = None, max_seq: int | None = None, kv_heads: int | None = None,
                  head_dim: int | None = None) -> PoolLayout:
    return PoolLayout(first_layer, num_layers or rng.randint(1, 5), slots or rng.randint(1, 6),
                      max_seq or rng.randint(4, 40), kv_heads or rng.randint(1, 3), head_dim or rng.choice([2, 4, 8, 16]),
                      dtype)


def fill_random(t: torch.Tensor, seed: int) -> torch.Tensor:
    """Random bit patterns (every byte exercised, NaN payloads included: the copies must be byte-exact)."""
    g = torch.Generator().manual_seed(seed)
    flat = t.reshape(-1).view(torch.uint8)
    flat.copy_(torch.randint(0, 256, (flat.numel(),), dtype=torch.uint8, generator=g))
    return t


def random_region(rng: random.Random, layout: PoolLayout, lens: list[int] | None = None,
                  layers: tuple[int, int] | None = None, nslots: int | None = None) -> Region:
    """Random slots (random order), layers and per-slot token ranges; `lens` pins the per-slot token counts."""
    n = len(lens) if lens is not None else (nslots or rng.randint(1, layout.num_slots))
    slots = rng.sample(range(layout.num_slots), n)
    if layers is None:
        a = rng.randint(layout.first_layer, layout.first_layer + layout.num_layers - 1)
        layers = (a, rng.randint(a + 1, layout.first_layer + layout.num_layers))
    tokens = []
    for i in range(n):
        k = lens[i] if lens is not None else rng.randint(1, layout.max_seq_len)
        t0 = rng.randint(0, layout.max_seq_len - k)
        tokens.append((t0, t0 + k))
    return Region(tuple(slots), layers, tuple(tokens))


def packed(pool_tensor: torch.Tensor, layout: PoolLayout, region: Region) -> torch.Tensor:
    """The region's bytes in packed order (as raw bytes, so NaN patterns compare exactly)."""
    return KVPool(layout, pool_tensor).read(region).contiguous().view(torch.uint8)


def run(coro_fn: Callable[[], Awaitable[T]], timeout: float = 60.0) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(coro_fn(), timeout)

    return asyncio.run(bounded())


@dataclass
class StreamerProc:
    name: str
    control: str
    data: str
    proc: subprocess.Popen[bytes]
    log: Path

    @classmethod
    def start(cls, name: str, *args: str, directory: str | None = None) -> StreamerProc:
        d = directory or tempfile.mkdtemp(prefix="dv")  # ipc:// paths must stay short
        control, data = f"ipc://{d}/{name}.c", f"ipc://{d}/{name}.d"
        log = Path(d) / f"{name}.log"
        env = child_env()
        proc = subprocess.Popen([sys.executable, "-m", "streamer", "--name", name, "--control", control,
                                 "--data", data, *args], cwd=ROOT, env=env, stdout=log.open("wb"),
                                stderr=subprocess.STDOUT)
        return cls(name, control, data, proc, log)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self, timeout: float = 10.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
            raise AssertionError(f"streamer {self.name} ignored SIGTERM for {timeout}s:\n{self.tail()}") from None

    def tail(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-3000:]
        except OSError:
            return ""


async def connect(client: Any, timeout: float = 30.0) -> Any:
    """Handshake: the first status answer means the streamer is up (its start-up includes importing torch)."""
    return await client.status(timeout=timeout)
