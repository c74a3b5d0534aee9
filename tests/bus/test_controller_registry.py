"""The controller's stage registry: when a restarted stage's KV counts as kept."""

from __future__ import annotations

import asyncio

import zmq

from bus.codec import Codec, Received
from bus.controller_config import ControllerConfig, StageEntry
from bus.controller_proc import ControllerProcess
from bus.messages import Hello
from bus.sockets import make_socket


def hello_from(incarnation: int, kv_intact: bool) -> Received:
    codec = Codec("stage-0", incarnation)
    data = codec.encode(Hello("stage", 0, 100 + incarnation, "h", {"data": f"tcp://x:{incarnation}"}, [0, 2], 4,
                              kv_intact=kv_intact))
    return codec.decode(data, [])


def registered_intact(predecessor_intact: bool) -> bool:
    async def scenario() -> bool:
        ctl = ControllerProcess(ControllerConfig("unused", 10, (2,), 1, 4, 1, 16, "inproc://supervisor"))
        ctl.internal = make_socket(ctl.ctx, zmq.ROUTER, bind="inproc://internal")
        try:
            ctl.reg.stages[0] = StageEntry(1, 101, "h", "tcp://x:1", kv_intact=predecessor_intact)
            await ctl._on_internal(b"stage-0", hello_from(2, kv_intact=True))  # it took over incarnation 1's pool
            return ctl.reg.stages[0].incarnation == 2 and ctl.reg.stages[0].kv_intact
        finally:
            ctl.ctx.destroy(linger=0)

    return asyncio.run(scenario())


def test_a_pool_taken_over_counts_as_kept_only_if_the_predecessors_did() -> None:
    # incarnation 1 served with the KV this controller counts: its successor's takeover keeps it
    assert registered_intact(predecessor_intact=True)
    # incarnation 1 started with a fresh pool and died before it served: taking that pool over keeps nothing
    assert not registered_intact(predecessor_intact=False)


def test_a_sync_ack_answering_an_older_replica_sync_counts_nothing() -> None:
    """A whole-pool re-sync's acknowledgement names the ReplicaSync it answers (sync_epoch): one answering a sync
    sent before the replica moved again filled a replica since replaced, and must not count; the current one does;
    per-step deltas are not epoch-checked this way."""
    from bus.messages import ReplicaAck, StepRequest

    def ack(sync: bool, sync_epoch: int) -> Received:
        codec = Codec("stage-0", 1)
        return codec.decode(codec.encode(ReplicaAck([[7, 0, 3]], sync=sync, sync_epoch=sync_epoch)), [])

    async def scenario() -> list[int]:
        ctl = ControllerProcess(ControllerConfig("unused", 10, (2,), 1, 4, 1, 16, "inproc://supervisor",
                                                 replicate=True))
        ctl.internal = make_socket(ctl.ctx, zmq.ROUTER, bind="inproc://internal-sync")
        try:
            assert ctl.book is not None
            ctl.reg.stages[0] = StageEntry(1, 101, "h", "tcp://x:1", kv_intact=True)
            ctl.book.record(StepRequest(7, 0, 3, [], [], []), [])  # step 3 of microbatch 0, epoch 7
            ctl.sync_epochs[0] = 5  # the latest ReplicaSync went out in epoch 5
            seen = []
            await ctl._on_internal(b"stage-0", ack(True, 4))  # answers the sync of epoch 4: a replaced replica
            seen.append(ctl.book.acked[0].get(0, -1))
            await ctl._on_internal(b"stage-0", ack(True, 5))  # the current one
            seen.append(ctl.book.acked[0].get(0, -1))
            ctl.book.reset(0)
            await ctl._on_internal(b"stage-0", ack(False, 0))  # a per-step delta
            seen.append(ctl.book.acked[0].get(0, -1))
            return seen
        finally:
            ctl.ctx.destroy(linger=0)

    assert asyncio.run(scenario()) == [-1, 3, 3]
