"""KV replication and recovery from replicas (issue 18), on simulated hosts: every stage streams each step's KV to a
replica on the next host; a stage that comes back without its KV (a killed process with --kv-takeover off, as a
GPU stage always does; a stage moved off a lost host) restores it from there, and only the positions after the
replicated watermark are fed again. Every output equals the fault-free run (greedy and seeded sampling), every
token arrives once, and status() says where each replica is and how each recovery went."""

from __future__ import annotations

import asyncio
import os
import random
import signal
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from bus.client import AsyncClient
from tests.conftest import start_deployment
from tests.recovery.test_hosts import host_tree, hosts_of, until
from tests.recovery.test_recovery import MAX_SEQ, Progress, reference, stream_exactly, workload

Action = Callable[[AsyncClient], Awaitable[str]]
BASE = ("--microbatch-size", "4", "--max-seq-len", str(MAX_SEQ), "--heartbeat-interval", "0.5",
        "--heartbeat-timeout", "3", "--max-restarts", "30")


def pid_of(st: dict[str, Any], role: str, index: int) -> int:
    pid = next(p["pid"] for p in st["processes"] if p["role"] == role and p["index"] == index)
    assert pid > 0, f"{role} {index} is not running"
    return pid


def kill_stage(index: int, caught_up: bool = False) -> Action:
    """kill -9 of stage `index`; caught_up: once its replica lacks no more than a decode step's rows (a prompt pass
    is one step of many positions: killed just after one, the stage rightly replays that prompt)."""
    async def act(c: AsyncClient) -> str:
        st = await c.status()
        if caught_up:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 20
            while True:
                rep = next((r for r in st["replicas"] if r["stage"] == index), None)
                if rep is not None and rep["state"] == "streaming" and rep["lag_tokens"] <= 8:
                    break
                assert loop.time() < deadline, f"stage {index}'s replica did not catch up within 20s: {rep}"
                await asyncio.sleep(0.005)
                st = await c.status()
        os.kill(pid_of(st, "stage", index), signal.SIGKILL)
        return f"stage-{index}"
    return act


def kill_hosts(*names: str) -> Action:
    async def act(c: AsyncClient) -> str:
        st = await c.status()
        for pid in [p for h in names for p in host_tree(st, h)]:
            os.kill(pid, signal.SIGKILL)
        return "+".join(names)
    return act


def settled(recoveries: int) -> Callable[[dict[str, Any]], bool]:
    """`recoveries` recoveries done, serving, and every replica filled (re-syncs finished)."""
    return lambda s: len(s["recoveries"]) >= recoveries and s["state"] == "serving" and \
        all(r["state"] == "streaming" for r in s["replicas"])


def serve_through(path, args: tuple[str, ...], failures: list[tuple[int, Action]], n: int = 16,  # type: ignore[no-untyped-def]
                  stages: int = 2, recoveries: int | None = None,
                  ) -> tuple[list[list[int]], list[list[int]], dict[str, Any], list[str], str]:
    """Stream `n` requests (greedy and seeded sampling); when the run has received `threshold` tokens, and
    every earlier failure's recovery has settled, run the next failure (each makes one recovery at least, unless
    `recoveries` says how many the run makes). Returns outputs, fault-free references, the final status, what
    was done, and the logs."""
    reqs = workload(211, n=n)
    expected = len(failures) if recoveries is None else recoveries
    dep = start_deployment(path, stages, *BASE, "--log-level", "INFO", *args)
    done: list[str] = []

    async def scenario() -> tuple[list[list[int]], dict[str, Any]]:
        progress = Progress()
        async with AsyncClient(dep.address, timeout=240) as c:
            async def inject() -> None:
                for k, (threshold, act) in enumerate(failures):
                    await progress.reach(threshold)
                    if k:
                        await until(c, settled(min(k, expected)), 60, f"failure {k} settled")
                    done.append(await act(c))

            injector = asyncio.create_task(inject())
            outs = await asyncio.gather(*(stream_exactly(c, r, progress) for r in reqs))
            await asyncio.wait_for(injector, 120)  # (a failure may still be settling when the last token came)
            st = await until(c, settled(expected), 60, "every recovery reported")
            return outs, st

    try:
        outs, st = asyncio.run(scenario())
        logs = dep.logs()
    finally:
        assert dep.stop() == 0
    return outs, reference(path, reqs), st, done, logs


def check_replica(rec: dict[str, Any], logs: str = "") -> None:
    """`rec` restored from a replica, replaying few positions. logs: the deployment's, whose replication and
    recovery lines a failure shows."""
    why = f"{rec}\n" + "\n".join(line for line in logs.splitlines() if any(
        k in line for k in ("[replica]", "[recovery]", "[topology]", "[host", "[supervisor]")))
    assert rec["source"] == "replica", why
    assert rec["restored_bytes"] > 0 and rec["restore_s"] > 0, why
    # a recompute feeds every cached position again; the replica lags a step or two behind at most
    assert 0 <= rec["tokens_replayed"] * 5 < rec["tokens_recompute"], why


def test_a_killed_stage_comes_back_from_its_replica_on_the_other_host(model_factory) -> None:  # type: ignore[no-untyped-def]
    """kill -9 of a stage whose KV dies with it (--kv-takeover off: a GPU stage's case): restored from the replica
    on the other host, replaying a few positions instead of all of them."""
    outs, refs, st, _, logs = serve_through(model_factory("llama"), ("--hosts", "2", "--kv-takeover", "off"),
                                            [(150, kill_stage(1, caught_up=True))])
    assert outs == refs
    (rec,) = st["recoveries"]
    assert (rec["stage"], rec["host"]) == (1, "host-1")
    check_replica(rec, logs)
    reps = {r["stage"]: r for r in st["replicas"]}
    assert (reps[0]["host"], reps[1]["host"]) == ("host-1", "host-0")
    assert all(r["survives_host_loss"] and r["bytes"] > 0 and r["failures"] == 0 for r in reps.values())
    assert f"[recovery] stage 1 back on host-1 from replica in {rec['seconds']:.2f}s" in logs
    # the restarted stage said Hello before its weights were in: its links and restore ran while they loaded
    assert "[startup] stage 1 (incarnation 1) weights loaded in" in logs and "behind its Hello" in logs


def test_a_lost_hosts_stage_restores_on_the_spare_then_its_neighbour_restores_from_the_new_replica(model_factory) -> None:  # type: ignore[no-untyped-def]
    """kill -9 of every process of host-1: stage 1 restores on the spare host from its replica on host-0, and stage
    0's replica (it lived on host-1) is re-replicated whole to the spare; then stage 0 is killed and restores from
    that new replica."""
    outs, refs, st, _, logs = serve_through(
        model_factory("llama"), ("--hosts", "2", "--spare-hosts", "1", "--kv-takeover", "off"),
        [(120, kill_hosts("host-1")), (260, kill_stage(0, caught_up=True))])
    assert outs == refs
    first, second = st["recoveries"]
    assert (first["stage"], first["host"], second["stage"], second["host"]) == (1, "host-2", 0, "host-0")
    check_replica(first, logs)
    check_replica(second, logs)
    reps = {r["stage"]: r for r in st["replicas"]}
    assert (reps[0]["host"], reps[1]["host"]) == ("host-2", "host-0")


def test_a_host_that_comes_back_replicates_again_from_its_new_streamer(model_factory) -> None:  # type: ignore[no-untyped-def]
    """host-1 lost (stage 1 moves to the spare), its agent back as a new boot (the spare now); then the spare lost, so
    stage 1 moves back to host-1, whose new streamer - same name, a new process - streams stage 1's deltas to its
    replica on host-0 (host-0's streamer had seen the old one's transfer ids: the new boot's must count as newer);
    then stage 1 killed restores from that replica. Found by a randomized run (seed 101)."""
    async def back_then_kill_the_spare(c: AsyncClient) -> str:
        await until(c, lambda s: hosts_of(s)["host-1"]["state"] == "spare", 60, "host-1 back as the spare")
        return await kill_hosts("host-2")(c)

    outs, refs, st, _, logs = serve_through(
        model_factory("llama"), ("--hosts", "2", "--spare-hosts", "1", "--kv-takeover", "off"),
        [(80, kill_hosts("host-1")), (160, back_then_kill_the_spare), (260, kill_stage(1, caught_up=True))], n=24)
    assert outs == refs
    assert [(r["stage"], r["host"]) for r in st["recoveries"]] == [(1, "host-2"), (1, "host-1"), (1, "host-1")]
    check_replica(st["recoveries"][2], logs)
    reps = {r["stage"]: r for r in st["replicas"]}
    assert reps[1]["host"] == "host-0" and reps[1]["failures"] == 0, reps[1]


def test_a_stage_and_its_replica_lost_together_are_recomputed_exactly(model_factory) -> None:  # type: ignore[no-untyped-def]
    """Both hosts at once: each stage and the other's replica are gone - the stages move to the spares and every
    request is recomputed from its prompt and committed tokens, still exact."""
    outs, refs, st, _, _ = serve_through(model_factory("llama"), ("--hosts", "2", "--spare-hosts", "2"),
                                         [(150, kill_hosts("host-0", "host-1"))])
    assert outs == refs
    assert sorted((r["stage"], r["source"]) for r in st["recoveries"]) == [(0, "recompute"), (1, "recompute")]
    assert all(r["tokens_replayed"] == r["tokens_recompute"] > 0 for r in st["recoveries"])
    assert {hosts_of(st)[h]["state"] for h in ("host-2", "host-3")} == {"up"}


def test_a_replica_that_falls_behind_makes_steps_wait_and_is_counted(model_factory) -> None:  # type: ignore[no-untyped-def]
    """host-1's streamer frozen for 1.5 s (shorter than every timeout): both stages' transfers to or through it
    wait, a microbatch more than --replica-lag steps behind waits before its next step, and status counts it."""
    async def freeze(c: AsyncClient) -> str:
        pid = pid_of(await c.status(), "streamer", 1)
        os.kill(pid, signal.SIGSTOP)
        await asyncio.sleep(1.5)
        os.kill(pid, signal.SIGCONT)
        return "froze streamer-1"

    outs, refs, st, _, _ = serve_through(model_factory("llama"), ("--hosts", "2", "--replica-lag", "1"),
                                         [(100, freeze)], recoveries=0)
    assert outs == refs and st["recoveries"] == []
    reps = {r["stage"]: r for r in st["replicas"]}
    # the stage that waits first holds the pipeline up: the other may then get no step to wait before
    assert sum(r["stalls"] for r in reps.values()) >= 1, reps
    assert sum(r["stall_s"] for r in reps.values()) >= 0.5, reps
    assert all(r["failures"] == 0 and r["lag_steps"] <= 1 for r in reps.values()), reps


def test_one_host_replicates_on_its_own_streamer_and_says_the_replicas_die_with_it(model_factory) -> None:  # type: ignore[no-untyped-def]
    outs, refs, st, _, logs = serve_through(model_factory("llama"),
                                            ("--hosts", "1", "--replicate", "on", "--kv-takeover", "off"),
                                         [(150, kill_stage(0, caught_up=True))])
    assert outs == refs
    check_replica(st["recoveries"][0], logs)
    assert [(r["host"], r["survives_host_loss"]) for r in st["replicas"]] == [("host-0", False)] * 2


def random_failures(seed: int, count: int) -> list[tuple[int, Action]]:
    """Kills at random moments (a prompt pass, a decode step, right after a step: whatever runs then) of a random
    stage process or a whole host (host-1 while it holds a stage; the spare takes over)."""
    rng = random.Random(seed)
    out, at = [], 0
    for _ in range(count):
        at += rng.randint(40, 220)
        out.append((at, kill_stage(rng.randrange(2)) if rng.random() < 0.7 else _kill_a_stage_host(rng)))
    return out


def _kill_a_stage_host(rng: random.Random) -> Action:
    async def act(c: AsyncClient) -> str:
        st = await c.status()
        holders = [h for h, v in hosts_of(st).items() if v["stages"]]
        return await kill_hosts(rng.choice(holders))(c)
    return act


def randomized(path, seed: int, count: int, n: int) -> None:  # type: ignore[no-untyped-def]
    outs, refs, st, done, _ = serve_through(path, ("--hosts", "2", "--spare-hosts", "1", "--kv-takeover", "off"),
                                            random_failures(seed, count), n=n)
    assert outs == refs, done
    assert len(st["recoveries"]) >= count, (done, st["recoveries"])
    assert any(r["source"] == "replica" for r in st["recoveries"]), st["recoveries"]


def test_randomized_kills_restore_from_replicas_exactly(model_factory) -> None:  # type: ignore[no-untyped-def]
    randomized(model_factory("llama"), seed=1, count=3, n=20)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [11, 12, 13, 14])
def test_long_randomized_kills_restore_from_replicas_exactly(model_factory, seed: int) -> None:  # type: ignore[no-untyped-def]
    """20 randomized kill trials in all (5 per seed)."""
    randomized(model_factory("llama"), seed=seed, count=5, n=40)


@pytest.mark.gpu
@pytest.mark.parametrize("stages", [1, 2])
def test_a_killed_gpu_stage_restores_its_kv_from_the_replica(model_factory, stages: int) -> None:  # type: ignore[no-untyped-def]
    """A GPU stage's pool is registered with the streamer (CUDA IPC) and replicated to pinned host memory; killed,
    its KV dies with its CUDA context and comes back from the replica. Outputs equal the fault-free GPU run. The
    restore warmed its microbatches' decode attention and captured their graphs before their first steps."""
    import torch

    if torch.cuda.device_count() < stages:
        pytest.skip(f"needs {stages} GPUs")
    path = model_factory("llama")
    args = ("--device", "cuda", "--hosts", "1", "--replicate", "on")
    clean, _, _, _, _ = serve_through(path, args, [], stages=stages)
    outs, _, st, _, logs = serve_through(path, args, [(150, kill_stage(stages - 1, caught_up=True))], stages=stages)
    assert outs == clean
    check_replica(st["recoveries"][0])
    assert "restored graph shape(s) warmed in" in logs
    assert "warm-up of decode attention" not in logs  # (a failed warm-up's line)


def test_replication_comes_back_after_streamers_and_the_controller_are_killed(model_factory) -> None:  # type: ignore[no-untyped-def]
    """A restarted streamer has lost the replica pools it kept and the peers it knew: with no stage restarted, the
    controller sees the replicas broken and a new epoch sets them up again. A restarted controller knows no
    watermark: its first epoch re-syncs every replica. Every output is exact."""
    async def kill(c: AsyncClient, role: str, index: int) -> None:
        os.kill(pid_of(await c.status(), role, index), signal.SIGKILL)
        await until(c, lambda s: next(p for p in s["processes"] if p["role"] == role and p["index"] == index)["state"]
                    == "serving", 60, f"{role} {index} back")

    async def streamers(c: AsyncClient) -> str:
        epoch = (await c.status())["epoch"]
        await kill(c, "streamer", 1)
        await kill(c, "streamer", 0)
        await until(c, lambda s: s["epoch"] > epoch and settled(0)(s), 60, "replication set up again")
        return "streamers"

    async def controller(c: AsyncClient) -> str:
        await kill(c, "controller", 0)
        return "controller"

    outs, refs, st, _, logs = serve_through(model_factory("llama"), ("--hosts", "2",),
                                            [(100, streamers), (200, controller)], n=40, recoveries=0)
    assert outs == refs
    assert [(r["state"], r["error"]) for r in st["replicas"]] == [("streaming", "")] * 2, st["replicas"]
    assert "a new epoch sets their replicas up again" in logs
