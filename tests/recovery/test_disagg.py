"""Prompt-token disaggregation (issue 19) through real processes: a prompt pipeline streams each prompt pass's KV,
layer by layer, into receive slots of a token pipeline (same host: shared memory; another host: TCP between the
streamers). Outputs equal Hugging Face greedy for DP/DT = 1/1, 1/2, 2/1 under 24 concurrent requests; receive
slots exhausted make prompts wait, and nothing is lost; kill -9 of a prompt stage and of a token stage mid-run
leave every output exact. Below the deployment, the KV a token stage receives equals what a colocated stage
computes for the same prompt, byte for byte."""

from __future__ import annotations

import asyncio
import os
import signal
import tempfile
from pathlib import Path

import pytest
import torch

from bus.client import AsyncClient
from bus.messages import Chunk, Sampling, StepRequest
from stages.kv_home import open_home
from stages.kv_push import KvPusher
from stages.runtime import ShardConfig, pool_layout
from stages.stage import StageCore
from streamer.client import LayerSignal, attach_kv_hooks
from tests.bus.test_serving import hf_greedy, run_all, workload
from tests.conftest import start_deployment
from tests.recovery.test_hosts import until
from tests.recovery.test_replication import check_replica, kill_hosts, kill_stage, pid_of, serve_through
from tests.streamer.helpers import StreamerProc, connect, run

N = 24


@pytest.fixture(scope="module")
def served(model_factory):  # type: ignore[no-untyped-def]
    """The llama tiny model, 24 requests of 1-40 prompt tokens, and their Hugging Face greedy outputs."""
    from stages.models import load_spec

    path = model_factory("llama")
    work = workload(load_spec(path)[1].vocab_size)[:N]
    return path, work, hf_greedy(path, work)


@pytest.mark.parametrize("dp,dt,extra", [
    (1, 1, ()),
    # 2 receive slots for 24 requests: prompts wait for decodes to free them (back-pressure), nothing is lost
    (1, 2, ("--microbatch-size", "2", "--microbatches", "1")),
    # the prompt stages on one simulated host, the token stage on another: KV crosses hosts over TCP
    (2, 1, ("--hosts", "2")),
])
def test_disaggregated_outputs_equal_hf_greedy(served, dp: int, dt: int, extra: tuple[str, ...]) -> None:  # type: ignore[no-untyped-def]
    path, work, refs = served
    dep = start_deployment(path, dp + dt, "--prompt-stages", str(dp), "--token-stages", str(dt), "--microbatch-size",
                           "4", "--max-seq-len", "96", *extra)

    async def scenario():  # type: ignore[no-untyped-def]
        results = await run_all(dep.address, work)
        async with AsyncClient(dep.address) as c:  # prompt stages report their bytes with their next heartbeat
            st = await until(c, lambda s: s["kv_streamed_bytes"] == sum(
                p.get("kv_bytes", 0) for p in s["processes"] if p.get("pipeline") == "prompt") and all(
                "idle_fraction" in p for p in s["processes"] if p["role"] == "stage"), 10,
                "every stage's statistics reported")
        return results, st

    try:
        results, st = asyncio.run(scenario())
    finally:
        assert dep.stop() == 0
    assert [list(r.token_ids) for r in results] == refs
    stages = [p for p in st["processes"] if p["role"] == "stage"]
    assert [p["pipeline"] for p in stages] == ["prompt"] * dp + ["token"] * dt
    assert all(0.0 <= p["idle_fraction"] <= 1.0 for p in stages)
    assert st["prompt_stages"] == dp and st["kv_streamed_bytes"] > 0 and st["receive_waiting"] == 0
    assert all(p["kv_bytes"] > 0 for p in stages if p["pipeline"] == "prompt")
    if "--microbatches" in extra:  # prompts ran ahead of the 2 receive slots: parked, then moved (KvMove)
        assert st["receive_waits"] > 0
    if "--hosts" in extra:
        assert {p["host"] for p in stages if p["pipeline"] == "prompt"} != {p["host"] for p in stages
                                                                              if p["pipeline"] == "token"}


def test_killed_prompt_and_token_stages_leave_every_output_exact(model_factory) -> None:  # type: ignore[no-untyped-def]
    """kill -9 of the prompt stage while prompts still wait for receive slots (its passes in flight run again),
    then of a token stage whose KV dies with it (--kv-takeover off, a GPU stage's case: recomputed on the token
    pipeline), then of the streamer that moves the prompts' KV (serving pauses until it is back). Greedy and
    seeded sampling; every token arrives once."""
    outs, refs, st, done, logs = serve_through(
        model_factory("llama"), ("--prompt-stages", "1", "--token-stages", "2", "--kv-takeover", "off"),
        [(40, kill_stage(0)), (300, kill_stage(2)), (600, kill_process("streamer", 0))], n=16, stages=3,
        recoveries=2)
    assert done == ["stage-0", "stage-2", "streamer-0"]
    assert outs == refs
    assert [r["stage"] for r in st["recoveries"]] == [0, 2]
    assert st["recoveries"][1]["source"] == "recompute"
    assert "the streamer of host-0 is down: serving pauses until it is back" in logs


def kill_process(role: str, index: int):  # type: ignore[no-untyped-def]
    async def act(c: AsyncClient) -> str:
        os.kill(pid_of(await c.status(), role, index), signal.SIGKILL)
        return f"{role}-{index}"
    return act


def test_token_stages_receive_the_kv_a_colocated_stage_computes(model_factory) -> None:
    """Two prompt stages (layers 0-2 and 2-4) run a pass of two prompts; their KvPushers stream it, layer by layer
    through KV hooks, into other slots of a token stage's pool holding all 4 layers: those rows equal, bit for bit,
    what one colocated stage of 4 layers writes for the same prompts."""
    path = model_factory("llama")
    d = tempfile.mkdtemp(prefix="dv")
    streamer = StreamerProc.start("h0", directory=d)
    prompts = [[5, 9, 17, 3, 8], [11, 12]]

    def config(layers: tuple[int, int], slots: int) -> ShardConfig:
        return ShardConfig(Path(path), layers, slots, 32, "float32", "cpu")

    async def scenario() -> None:
        homes = []
        for name, layers, slots in (("p0", (0, 2), 2), ("p1", (2, 4), 2), ("t", (0, 4), 4)):
            homes.append(await open_home(name, pool_layout(config(layers, slots)), streamer.control, 0,
                                         f"{Path(d).name}-{name}", 30.0, client_name=name, streamer="h0"))
        await connect(homes[0].client)
        reports = []

        async def report(msg) -> None:  # type: ignore[no-untyped-def]
            reports.append(msg)

        from bus.messages import ReplicaTarget, Topology

        dest = [ReplicaTarget(9, "t", "h0", "", "h0", [0, 4])]
        step = StepRequest(1, 0, 1, [Chunk(0, 0, 5), Chunk(1, 0, 2)], sum(prompts, []), [Sampling()] * 2,
                           kv_to=[3, 1])
        hidden = None
        for home, layers in zip(homes[:2], ((0, 2), (2, 4))):
            core = StageCore(config(layers, 2), home.tensor)
            push = KvPusher(home.client, home.name, home.memory, pool_layout(config(layers, 2)), "h0", report)
            await push.configure(Topology(1, "", kv_dest=dest))
            handle, signal, why = await push.open(step)
            assert handle is not None and isinstance(signal, LayerSignal), why
            hooks = attach_kv_hooks(core.runtime.shard, signal)
            out = core.run(step, hidden)
            for h in hooks:
                h.remove()
            hidden = out.hidden
            push.after(step, handle, True)
            await asyncio.wait_for(asyncio.gather(*push.running), 30)
        assert [(r.ok, r.mb, r.step) for r in reports] == [(True, 0, 1), (True, 0, 1)] and reports[0].nbytes > 0
        ref = StageCore(config((0, 4), 2), None)
        ref.run(step, None)
        got, want = homes[2].tensor, ref.runtime.pool.data  # [layers, 2, slots, seq, kv_heads, head_dim]
        for (src, dst), n in zip(((0, 3), (1, 1)), (5, 2)):
            assert torch.equal(got[:, :, dst, :n], want[:, :, src, :n])
        assert not got[:, :, 0].any() and not got[:, :, 2].any()  # nothing else was written
        for home in homes:
            await home.close(5.0)

    try:
        run(scenario)
    finally:
        streamer.stop()


def test_the_controller_killed_then_a_token_stage_on_two_hosts_leave_every_output_exact(model_factory) -> None:  # type: ignore[no-untyped-def]
    """Disaggregated on two simulated hosts, where the token stages replicate by default: kill -9 of the controller
    (clients resume; the restarted controller learns every streamer again and, knowing no watermark, re-syncs the
    replicas), then of a token stage whose KV dies with it: restored from its replica, not recomputed."""
    outs, refs, st, done, logs = serve_through(
        model_factory("llama"), ("--prompt-stages", "1", "--token-stages", "2", "--hosts", "2", "--kv-takeover", "off"),
        [(80, kill_process("controller", 0)), (250, kill_stage(2, caught_up=True))], n=16, stages=3, recoveries=0)
    assert done == ["controller-0", "stage-2"]
    assert outs == refs
    (rec,) = st["recoveries"]  # (the restarted controller's: the stage's)
    assert rec["stage"] == 2
    check_replica(rec, logs)
    assert [r["stage"] for r in st["replicas"]] == [1, 2] and st["prompt_stages"] == 1


def test_token_stages_restore_from_replicas_the_prompt_stages_never_write(model_factory) -> None:  # type: ignore[no-untyped-def]
    """Replication with disaggregation: a prompt's KV reaches a token stage from the prompt stages, and the token
    stage, its replica's one writer, sends rows [0, end) of it in its first step after joining. On two hosts
    (host-0: the prompt stage and token stage 1; host-1: token stage 2), kill -9 of token stage 1 (restored from
    its replica on host-1); then of every process of host-1: stage 2 restores on the spare host from its replica
    on host-0, and stage 1's replica (it lived on host-1) is re-synced to the spare; then of stage 1 again,
    restored from that new replica. Greedy and seeded sampling; every token arrives once."""
    outs, refs, st, done, logs = serve_through(
        model_factory("llama"), ("--prompt-stages", "1", "--token-stages", "2", "--hosts", "2", "--spare-hosts", "1",
                                 "--kv-takeover", "off"),
        [(100, kill_stage(1, caught_up=True)), (220, kill_hosts("host-1")), (340, kill_stage(1, caught_up=True))],
        n=16, stages=3)
    assert done == ["stage-1", "host-1", "stage-1"]
    assert outs == refs
    recs = st["recoveries"]
    assert [(r["stage"], r["host"]) for r in recs] == [(1, "host-0"), (2, "host-2"), (1, "host-0")], recs
    check_replica(recs[0], logs)
    check_replica(recs[2], logs)
    assert recs[1]["source"] == "replica" and recs[1]["tokens_replayed"] < recs[1]["tokens_recompute"], recs[1]
    reps = {r["stage"]: r for r in st["replicas"]}
    assert (reps[1]["host"], reps[2]["host"]) == ("host-2", "host-0")
    assert all(r["survives_host_loss"] and r["bytes"] > 0 for r in reps.values())


def test_a_lookahead_token_stage_restores_from_its_replica_exactly(model_factory) -> None:  # type: ignore[no-untyped-def]
    """Lookahead on the one token stage (its next step sent while the current one runs, joins included) with
    replication: the prompt stage on host-0, the token stage on host-1 replicating to host-0. kill -9 of the
    token stage: restored from its replica (the rows of joins sent in lookahead steps included), every output
    exact, greedy and seeded."""
    outs, refs, st, done, logs = serve_through(
        model_factory("llama"), ("--prompt-stages", "1", "--token-stages", "1", "--hosts", "2", "--kv-takeover", "off",
                                 "--lookahead", "on"),
        [(150, kill_stage(1, caught_up=True))], n=16, stages=2)
    assert done == ["stage-1"] and outs == refs
    (rec,) = st["recoveries"]
    assert rec["stage"] == 1
    check_replica(rec, logs)
    assert st["lookahead"]
