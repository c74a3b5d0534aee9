"""The order of a stage's writes to its replica (stages/replica.py): transfers run concurrently (a prompt pass's
layered one, a batch of deltas, a whole-pool sync) and a slot changes hands, so a transfer starts only when nothing
sent before it writes any of its rows - else the last rows of a request that ended could land over the next
occupant's. Driven with a streamer client whose transfers finish when the test says."""

from __future__ import annotations

import asyncio
from typing import Any

import torch

from bus.messages import Chunk, ReplicaTarget, Sampling, StepRequest
from stages.replica import Replicator
from streamer.layout import PoolLayout, Region


class Handle:
    def __init__(self, xfer: int, region: Region, kw: dict[str, Any]) -> None:
        self.xfer, self.region, self.kw = xfer, region, kw
        self.done: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

    async def wait(self) -> Any:
        return await self.done

    async def cancel(self, why: str) -> None:
        if not self.done.done():
            self.done.set_exception(RuntimeError(why))

    def finish(self) -> None:
        self.done.set_result(type("Done", (), {"nbytes": 8})())


class Client:
    def __init__(self) -> None:
        self.handles: list[Handle] = []
        self.on_reconnect: list[Any] = []

    async def stream(self, src: Any, region: Region, **kw: Any) -> Handle:
        h = Handle(len(self.handles), region, kw)
        self.handles.append(h)
        return h

    def layer_ready_threadsafe(self, xfers: Any, layer: int) -> None:
        pass

    def rows(self) -> list[dict[int, tuple[int, int]]]:
        return [dict(zip(h.region.slots, h.region.tokens)) for h in self.handles]


def step(n: int, chunks: list[tuple[int, int, int]], joined: list[int] | None = None) -> StepRequest:
    return StepRequest(1, 0, n, [Chunk(*c) for c in chunks], [1] * sum(c[2] for c in chunks),
                       [Sampling()] * len(chunks), joined=joined)


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def replicator() -> tuple[Replicator, Client, list[Any]]:
    client, acks = Client(), []

    async def send(msg: Any) -> None:
        acks.append(msg)

    layout = PoolLayout(0, 2, 4, 32, 1, 4, torch.float32)
    r = Replicator(client, "pool", None, layout, "h0", 2, send)  # type: ignore[arg-type]
    r.target = ReplicaTarget(0, "replica-stage-0", "h1", "", "host-1", [0, 2])
    return r, client, acks


def test_a_slots_next_occupant_waits_for_the_last_rows_of_the_one_before() -> None:
    async def scenario() -> None:
        r, client, _ = replicator()
        r.after_step(step(1, [(0, 5, 1), (1, 2, 1)]), None, True)  # the old occupant of slot 0 writes row 5
        r.after_step(step(2, [(0, 6, 1), (1, 3, 1)]), None, True)  # queued behind it (one batch at a time)
        await settle()
        assert client.rows() == [{0: (5, 6), 1: (2, 3)}]
        # a new request's prompt pass in slot 0 (rows 0-8): waits until row 5 of the old one and the queued
        # step are in
        opening = asyncio.ensure_future(r.open_layered(step(3, [(0, 0, 8)])))
        await settle()
        assert not opening.done()
        client.handles[0].finish()
        await settle()
        assert len(client.handles) == 2 and not opening.done()  # the queued delta went; the pass still waits
        client.handles[1].finish()
        await settle()
        assert opening.done() and client.rows()[2] == {0: (0, 8)} and client.handles[2].kw["layered"]
        assert r.stalls == 1
        # a decode step of slot 1 meanwhile does not touch those rows: it goes at once
        r.after_step(step(4, [(1, 4, 1)]), None, True)
        await settle()
        assert client.rows()[3] == {1: (4, 5)}

    asyncio.run(scenario())


def test_a_joined_chunk_sends_its_prompt_rows_and_waits_for_a_sync_writing_them() -> None:
    async def scenario() -> None:
        r, client, acks = replicator()
        r.after_step(step(1, [(0, 0, 6)]), None, True)  # (a delta of rows 0-6: slot 0 holds 6 rows)
        await settle()
        client.handles[0].finish()
        await settle()
        r.start_sync(1)  # the whole pool: slot 0's rows 0-6
        await settle()
        assert client.rows()[1] == {0: (0, 6)} and client.handles[1].kw["tag"] == "sync"
        # slot 0 changes hands: the new request joined with a 4-token prompt (its KV came from the prompt stages);
        # its first token step sends rows [0, 5) - not before the sync, which read slot 0 earlier, has landed
        r.after_step(step(2, [(0, 4, 1), (2, 7, 1)], joined=[0]), None, True)
        await settle()
        assert len(client.handles) == 2
        client.handles[1].finish()
        await settle()
        assert client.rows()[2] == {0: (0, 5), 2: (7, 8)}
        assert [m.sync for m in acks] == [False, True]
        assert acks[1].sync_epoch == 1

    asyncio.run(scenario())


def test_a_replica_that_moves_gets_none_of_the_steps_dropped_for_it() -> None:
    """A new epoch moves the replica: transfers to the old one are dropped, and so are the steps still queued -
    none of them may go to the new replica (its host may not have allocated its pool yet: the whole-pool sync of
    the new epoch brings it everything)."""
    async def scenario() -> None:
        r, client, _ = replicator()
        r.after_step(step(1, [(0, 5, 1)]), None, True)
        r.after_step(step(2, [(0, 6, 1)]), None, True)  # queued behind the first
        await settle()
        assert len(client.handles) == 1
        r.target = ReplicaTarget(0, "replica-stage-0", "h2", "", "host-2", [0, 2])
        r._drop_pending("the replica moved")
        await settle()
        assert len(client.handles) == 1 and not r.queue and r.unacked[0] == 0

    asyncio.run(scenario())
