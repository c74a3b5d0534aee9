"""Deployments across hosts, simulated on this machine (`dejavu-serve --hosts H --spare-hosts K`: each host an agent
with its own loopback address, streamer, shared memory and run directory): placement, whole-host failures (kill -9
of every process of a host; SIGSTOP of a whole host), fencing, and exact outputs throughout."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from typing import Any

import pytest

from bus.child import alive
from bus.client import AsyncClient
from recovery.hosts import DEAD, SPARE, UP, Host, HostTable
from recovery.launch import descendants
from tests.bus.test_serving import hf_greedy, workload
from tests.conftest import start_deployment
from tests.recovery.test_recovery import MAX_SEQ, Progress, reference, stream_exactly
from tests.recovery.test_recovery import workload as long_workload

# ------------------------------------------------------------------ placement (pure)


def host(table: HostTable, name: str, devices: list[str], spare: bool = False) -> Host:
    h = Host(name, table.slot_for(name), hash(name) & 0xFFFF, name.encode(), "127.0.0.1", devices, spare_wanted=spare)
    table.join(h)
    return h


def test_cpu_stages_go_in_blocks_and_a_lost_hosts_stages_move_together_to_a_spare() -> None:
    t = HostTable(num_stages=4, max_hosts=8)
    a, b = host(t, "a", ["cpu"]), host(t, "b", ["cpu"])
    spare = host(t, "s", ["cpu"], spare=True)
    assert t.place_initial(2) == [a, b]
    assert (a.stages, b.stages, spare.stages) == ({0: "cpu", 1: "cpu"}, {2: "cpu", 3: "cpu"}, {})
    assert (a.state, spare.state) == (UP, SPARE)
    first = t.incarnation(2)
    orphans = t.lose(b)
    assert b.state == DEAD and t.is_fenced("b", b.boot) and orphans == {2: "cpu", 3: "cpu"}
    assert t.place(orphans) == {"s": [2, 3]} and spare.state == UP
    assert t.incarnation(2) > t.last_incarnation(2) - (1 << 16) > first  # a new generation: newer than any old one


def test_without_a_spare_stages_go_to_the_least_loaded_live_host() -> None:
    t = HostTable(num_stages=3, max_hosts=8)
    a, b, c = (host(t, n, ["cpu"]) for n in "abc")
    t.place_initial(3)
    assert t.place(t.lose(b)) == {"a": [1]}  # a and c hold one stage each: the lower slot wins
    assert a.stages == {0: "cpu", 1: "cpu"} and t.unplaced == []


def test_gpu_stages_fill_each_hosts_devices_and_wait_for_devices_when_short() -> None:
    t = HostTable(num_stages=3, max_hosts=8)
    a = host(t, "a", ["cuda:0", "cuda:1"])
    assert "waiting for hosts" in t.place_initial(2)
    b = host(t, "b", ["cuda:0"])
    assert t.place_initial(2) == [a, b]
    assert a.stages == {0: "cuda:0", 1: "cuda:1"} and b.stages == {2: "cuda:0"}
    # b is lost: a has no free GPU and there is no spare -> degraded until a host joins
    assert t.place(t.lose(b)) == {} and t.unplaced == [2]
    c = host(t, "c", ["cuda:3"])
    assert t.place({}) == {"c": [2]} and c.stages == {2: "cuda:3"} and t.unplaced == []


def test_a_host_id_keeps_its_slot_across_boots() -> None:
    t = HostTable(num_stages=1, max_hosts=2)
    assert t.slot_for("x") == 0 and t.slot_for("y") == 1 and t.slot_for("x") == 0
    with pytest.raises(ValueError, match="at most 2 hosts"):
        t.slot_for("z")


# ------------------------------------------------------------------ real deployments


def hosts_of(status: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {h["host_id"]: h for h in status["hosts"]}


def host_tree(status: dict[str, Any], host_id: str) -> list[int]:
    """Every process of a simulated host: its agent and everything below it (streamer, stages, janitor)."""
    agent = next(p["pid"] for p in status["processes"] if p["role"] == "agent" and p["host"] == host_id)
    return [agent, *descendants(agent)]


async def until(c: AsyncClient, check, within: float, what: str) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + within
    while True:
        st = await c.status()
        if check(st):
            return st
        if time.monotonic() > deadline:
            raise AssertionError(f"not {what} within {within}s: {st['state']} {st['hosts']}")
        await asyncio.sleep(0.1)


def test_three_simulated_hosts_one_stage_each_serve_exactly_as_hf(model_factory) -> None:  # type: ignore[no-untyped-def]
    path = model_factory("llama")
    from stages.models import load_spec

    work = workload(load_spec(path)[1].vocab_size)[:12]
    refs = hf_greedy(path, work)
    dep = start_deployment(path, 3, "--hosts", "3", "--microbatch-size", "4", "--max-seq-len", "96")
    try:
        async def scenario() -> tuple[list[Any], dict[str, Any]]:
            async with AsyncClient(dep.address, timeout=120) as c:
                outs = await asyncio.gather(*(c.generate(prompt_token_ids=p, max_new_tokens=n) for p, n in work))
                return outs, await c.status()

        outs, st = asyncio.run(scenario())
        assert [list(o.token_ids) for o in outs] == refs
        assert st["state"] == "serving"
        hosts = hosts_of(st)
        assert {h: (v["state"], v["address"], v["stages"]) for h, v in hosts.items()} == {
            "host-0": ("up", "127.0.0.2", [0]), "host-1": ("up", "127.0.0.3", [1]), "host-2": ("up", "127.0.0.4", [2])}
        procs = {(p["role"], p["index"]): p for p in st["processes"]}
        for i in range(3):  # each host: its agent, its streamer, its stage, on its own address
            assert procs[("stage", i)]["host"] == procs[("agent", i)]["host"] == procs[("streamer", i)]["host"] \
                == f"host-{i}"
            assert procs[("stage", i)]["detail"].startswith(f"tcp://127.0.0.{2 + i}:")
        assert len({procs[("streamer", i)]["pid"] for i in range(3)}) == 3
    finally:
        assert dep.stop() == 0


def run_host_failure(path, sig: int, extra: tuple[str, ...]) -> tuple[list[list[int]], dict[str, Any], dict[str, Any]]:  # type: ignore[no-untyped-def]
    """Stream long requests on 2 hosts + 1 spare; once 150 tokens arrived, send `sig` to every process of host-1.
    Returns the outputs, what happened (pids, timings), and the status after."""
    reqs = long_workload(211, n=16)
    dep = start_deployment(path, 2, "--hosts", "2", "--spare-hosts", "1", "--microbatch-size", "4",
                           "--max-seq-len", str(MAX_SEQ), "--heartbeat-interval", "0.5", "--heartbeat-timeout", "3",
                           *extra)
    seen: dict[str, Any] = {}

    async def scenario() -> tuple[list[list[int]], dict[str, Any]]:
        progress = Progress()
        async with AsyncClient(dep.address, timeout=180) as c:
            async def fail_host() -> None:
                await progress.reach(150)
                st = await c.status()
                seen["tree"] = tree = host_tree(st, "host-1")
                seen["boot"] = hosts_of(st)["host-1"]["boot"]
                t0 = time.monotonic()
                for pid in tree:
                    os.kill(pid, sig)
                await until(c, lambda s: hosts_of(s)["host-1"]["state"] == "dead" or
                            hosts_of(s)["host-1"]["boot"] != seen["boot"], 30, "host-1 declared dead")
                seen["declared_dead_s"] = time.monotonic() - t0
                if sig == signal.SIGSTOP:
                    await until(c, lambda s: hosts_of(s)["host-2"]["stages"] == [1], 30, "stage 1 moved")
                    for pid in tree:
                        os.kill(pid, signal.SIGCONT)
                    seen["woke"] = time.monotonic()

            failer = asyncio.create_task(fail_host())
            outs = await asyncio.gather(*(stream_exactly(c, r, progress) for r in reqs))
            await asyncio.wait_for(failer, 60)
            # the lost host's agent comes back (a new boot: dejavu-serve restarts it as systemd would) as a spare
            st = await until(c, lambda s: hosts_of(s)["host-1"]["state"] == "spare"
                             and hosts_of(s)["host-1"]["boot"] != seen["boot"], 60, "host-1 back as a spare")
            return outs, st

    try:
        outs, st = asyncio.run(scenario())
        seen["logs"] = dep.logs()
    finally:
        assert dep.stop() == 0
    seen["refs"] = reference(path, reqs)
    return outs, seen, st


def test_kill_9_of_every_process_of_a_host_moves_its_stage_to_the_spare_host(model_factory) -> None:  # type: ignore[no-untyped-def]
    path = model_factory("llama")
    outs, seen, st = run_host_failure(path, signal.SIGKILL, ())
    assert outs == seen["refs"]  # every request finished, each token once, equal to the fault-free run
    hosts = hosts_of(st)
    assert hosts["host-2"]["state"] == "up" and hosts["host-2"]["stages"] == [1]
    assert hosts["host-0"]["stages"] == [0] and hosts["host-1"]["stages"] == []
    stage1 = next(p for p in st["processes"] if p["role"] == "stage" and p["index"] == 1)
    assert stage1["host"] == "host-2" and stage1["state"] == "serving" and stage1["incarnation"] >= 1 << 16
    assert "[hosts] host-1 (127.0.0.3) declared dead: its agent process killed by SIGKILL" in seen["logs"]
    assert not [p for p in seen["tree"] if alive(p)]


def test_a_frozen_host_is_declared_dead_within_the_timeout_and_fenced_when_it_wakes(model_factory) -> None:  # type: ignore[no-untyped-def]
    """SIGSTOP of every process of host-1 (a hung machine, a long GC pause, a VM migration): its lease runs out
    after --heartbeat-timeout 3 s, its stage moves to the spare host, requests finish exactly. When it wakes up
    (SIGCONT) its old boot is fenced: every one of its processes stops at once, and it joins again as a spare."""
    path = model_factory("llama")
    outs, seen, st = run_host_failure(path, signal.SIGSTOP, ())
    print(f"host-1 frozen -> declared dead in {seen['declared_dead_s']:.2f}s (heartbeat timeout 3 s)")
    # its lease ran from its last beat, up to one heartbeat interval (0.5 s) before the freeze
    assert 3.0 - 0.5 <= seen["declared_dead_s"] < 3.0 + 2.5
    assert outs == seen["refs"]
    assert hosts_of(st)["host-2"]["stages"] == [1]
    assert not [p for p in seen["tree"] if alive(p)], "the fenced host's processes all stopped"
    logs = seen["logs"]
    assert "[hosts] host-1 (127.0.0.3) declared dead: silent for" in logs
    assert "[fenced] host host-1" in logs
