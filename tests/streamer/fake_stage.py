"""A stage process for the streamer tests: maps a KV pool in shared memory, fills it deterministically,
registers it, swaps it out, starts a layered transfer it never finishes, prints READY - and waits to be killed.

    python -m tests.streamer.fake_stage CONTROL_ADDRESS NAME SEED
"""

from __future__ import annotations

import asyncio
import sys

import torch

from streamer import wire
from streamer.client import StreamerClient
from streamer.layout import PoolLayout, Region
from streamer.memory import SharedPoolMemory
from tests.streamer.helpers import fill_random

LAYOUT = PoolLayout(0, 3, 4, 16, 2, 8, torch.bfloat16)
REGION = Region((3, 1, 0), (0, 3), ((0, 9), (2, 16), (5, 6)))


async def main(address: str, name: str, seed: int) -> None:
    mem = SharedPoolMemory.create(LAYOUT)
    fill_random(mem.tensor, seed)
    client = StreamerClient(address, name)
    await client.status(timeout=30)
    await client.register_pool(name, mem)
    await client.alloc_pool(f"{name}-swap", wire.POOL_SWAP, LAYOUT)
    await (await client.stream(name, REGION, dst=f"{name}-swap", dst_region=REGION)).wait(10)
    await client.alloc_pool(f"{name}-recv", wire.POOL_RECEIVE, LAYOUT)
    h = await client.stream(name, REGION, dst=f"{name}-recv", dst_region=REGION, layered=True, progress=True)
    await client.layer_ready([h.xfer], 0)
    await h.next_progress(10)
    print("READY", mem.path, flush=True)
    await asyncio.Event().wait()  # killed here, mid-transfer


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
