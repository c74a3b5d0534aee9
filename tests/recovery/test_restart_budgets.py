"""Each process's own restart budget and back-off, and what clients hear when the deployment gives up: failures
of different processes spread over time do not stop the deployment; one process past its budget does, and every
connected client gets a ServerError naming that process and the settings at once - not when its
reconnect_timeout has passed. The back-off schedule itself is a pure unit (recovery/supervisor.py)."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from typing import Any

import pytest

from bus.client import AsyncClient
from bus.errors import ServerError
from recovery.specs import DeploymentConfig
from recovery.supervisor import Backoff, RestartIntensity
from tests.conftest import start_deployment
from tests.recovery.test_recovery import MAX_SEQ, Progress, reference, stream_exactly, workload

# ------------------------------------------------------------------ pure policy


def test_backoff_grows_while_a_process_keeps_failing_and_resets_once_it_stayed_up() -> None:
    b = Backoff(base=0.5, cap=4.0, reset_after=10.0)
    t = 100.0  # a fake clock: the policy only sees the times it is given
    # dies again and again before it ever says Hello: 0, then doubling from base up to the cap
    assert [b.next_delay(t + i) for i in range(7)] == [0.0, 0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    # says Hello, but dies 3 s later (< reset_after): still a restart in a row
    b.up(200.0)
    assert b.next_delay(203.0) == 4.0
    # stays up reset_after seconds after its Hello: the next restart is immediate again, and the schedule restarts
    b.up(300.0)
    assert b.next_delay(310.0) == 0.0
    assert b.next_delay(311.0) == 0.5  # its replacement died before its Hello
    b.up(320.0)
    assert b.next_delay(329.9) == 1.0
    # the Hello counts for one incarnation only: a later one that dies before its own Hello does not reset it
    b.up(400.0)
    assert b.next_delay(401.0) == 2.0
    assert b.next_delay(500.0) == 4.0


def test_backoff_zero_base_never_waits_and_bad_settings_are_refused() -> None:
    b = Backoff(base=0.0, cap=0.0, reset_after=1.0)
    assert {b.next_delay(float(i)) for i in range(10)} == {0.0}
    big = Backoff(base=1.0, cap=30.0, reset_after=1.0)
    assert [big.next_delay(0.0) for _ in range(200)][-1] == 30.0  # no overflow after many restarts in a row
    for base, cap, reset in ((-1.0, 1.0, 1.0), (2.0, 1.0, 1.0), (0.5, 1.0, 0.0)):
        with pytest.raises(ValueError):
            Backoff(base, cap, reset)
    with pytest.raises(ValueError, match="restart_backoff"):
        DeploymentConfig(model_dir="x", restart_backoff=5.0, restart_backoff_max=1.0)


def test_restart_budget_counts_failures_within_the_window() -> None:
    stage0, stage1 = RestartIntensity(2, 60.0), RestartIntensity(2, 60.0)  # one per process
    assert stage0.allow(0.0) and stage0.allow(10.0)
    assert stage1.allow(11.0) and stage1.allow(12.0)  # the other process's failures do not count
    assert not stage0.allow(20.0) and stage0.failures == 3  # a third within 60 s: give up
    assert stage0.allow(65.0) and stage0.failures == 2  # the one at 0 has left the window (60 s ago and more)


async def _hold_off_is_abandoned_when_the_deployment_stops() -> None:
    from recovery.proc import SupervisorProcess

    sup = SupervisorProcess(DeploymentConfig(model_dir="unused"))
    try:
        assert await asyncio.wait_for(sup._hold_off(0.01), 10)  # a short back-off runs out: restart
        waiting = asyncio.ensure_future(sup._hold_off(600.0))
        await asyncio.sleep(0)  # let it start waiting
        sup._request_stop("test")
        assert await asyncio.wait_for(waiting, 10) is False  # stopped meanwhile: no restart, no 600 s wait
        assert await asyncio.wait_for(sup._hold_off(0.0), 10) is False  # and none once stopping
    finally:
        sup.ctx.destroy(linger=0)


def test_a_back_off_wait_is_abandoned_when_the_deployment_stops() -> None:
    asyncio.run(_hold_off_is_abandoned_when_the_deployment_stops())


# ------------------------------------------------------------------ real deployments


async def stages_back(c: AsyncClient, incarnations: dict[int, int], within: float = 90.0,
                      state: str = "serving") -> dict[int, dict[str, Any]]:
    """Poll status() (bounded by `within` seconds) until each stage i runs incarnation incarnations[i] in `state`."""
    deadline = time.monotonic() + within
    while True:
        st = await c.status()
        stages = {p["index"]: p for p in st["processes"] if p["role"] == "stage"}
        if all(stages[i]["incarnation"] == n and stages[i]["state"] == state for i, n in incarnations.items()):
            return stages
        if time.monotonic() > deadline:
            raise AssertionError(f"stages not {state} at incarnations {incarnations} within {within}s: {stages}")
        await asyncio.sleep(0.1)


def test_kills_of_different_stages_spread_over_time_do_not_stop_the_deployment(model_factory) -> None:  # type: ignore[no-untyped-def]
    """--max-restarts 2 is each process's own budget: stage 0 and stage 1 are each killed twice, one kill after
    another once the previous victim serves again - four failures in all, twice what one shared budget of 2
    allowed. The deployment goes on and every output equals the fault-free run, each token once; each stage's
    second restart waited its back-off."""
    path = model_factory("llama")
    reqs = workload(211, n=24)
    refs = reference(path, reqs)
    total = sum(len(r) for r in refs)
    victims = [0, 1, 0, 1]
    dep = start_deployment(path, 2, "--microbatch-size", "4", "--max-seq-len", str(MAX_SEQ), "--max-restarts", "2",
                           "--restart-window", "600", "--restart-backoff", "0.5", "--restart-backoff-reset", "600")

    async def scenario() -> tuple[list[list[int]], dict[int, dict[str, Any]]]:
        progress = Progress()
        async with AsyncClient(dep.address, timeout=240) as c:
            async def killer() -> None:
                incarnations = {0: 0, 1: 0}
                for k, victim in enumerate(victims):
                    await progress.reach(total * (k + 1) // 6)
                    stages = await stages_back(c, incarnations)  # the previous victim is back and serving
                    os.kill(stages[victim]["pid"], signal.SIGKILL)
                    incarnations[victim] += 1

            kills = asyncio.create_task(killer())
            outs = await asyncio.gather(*(stream_exactly(c, r, progress) for r in reqs))
            assert kills.done(), "the failures were injected before generation ended"
            kills.result()
            return outs, await stages_back(c, {0: 2, 1: 2})

    try:
        outs, stages = asyncio.run(scenario())
        assert outs == refs
        assert stages[0]["incarnation"] == stages[1]["incarnation"] == 2
        logs = dep.logs()
        assert "[fatal]" not in logs
        for i in (0, 1):
            assert f"[restart] stage-{i} incarnation 0 killed by SIGKILL: restart 1 of 2 within 600s, now" in logs
            assert (f"[restart] stage-{i} incarnation 1 killed by SIGKILL: restart 2 of 2 within 600s, in 0.5s "
                    "(back-off: restart_backoff / restart_backoff_max)") in logs
        assert logs.count("taken over with its KV") == 4  # every restarted stage took its pool over
    finally:
        assert dep.stop() == 0


def test_a_process_past_its_budget_stops_the_deployment_and_every_client_hears_why_at_once(model_factory) -> None:  # type: ignore[no-untyped-def]
    """Stage 1 fails twice with --max-restarts 1: the deployment stops, and a client with a request in flight gets
    a ServerError naming stage-1 and the settings within seconds - far sooner than its reconnect_timeout (60 s),
    which is what it waited before the controller's last messages were flushed on exit. An idle connected
    client is told too: its next request fails at once with the same reason."""
    dep = start_deployment(model_factory("llama"), 2, "--microbatch-size", "2", "--max-seq-len", "256",
                           "--max-restarts", "1")

    async def scenario() -> None:
        async with AsyncClient(dep.address, timeout=120, reconnect_timeout=60) as c, \
                AsyncClient(dep.address, timeout=120, reconnect_timeout=60) as idle:
            stages = await stages_back(c, {0: 0, 1: 0})
            os.kill(stages[1]["pid"], signal.SIGKILL)  # within its budget: restarted
            stages = await stages_back(c, {0: 0, 1: 1})
            killed_at = 0.0
            with pytest.raises(ServerError) as failed:
                async with c.stream(prompt_token_ids=[5, 6, 7], max_new_tokens=250, ignore_eos=True) as s:
                    async for ev in s:
                        if not killed_at:
                            assert ev.index == 0
                            os.kill(stages[1]["pid"], signal.SIGKILL)  # past its budget: the deployment stops
                            killed_at = time.monotonic()
                            break  # the rest of the stream is read under a deadline below
                    await asyncio.wait_for(_drain(s), 20)
            waited = time.monotonic() - killed_at
            message = str(failed.value)
            assert "stage-1" in message and "max_restarts" in message and "restart_window" in message, message
            assert "killed by SIGKILL" in message and "the deployment stopped" in message, message
            assert waited < 20, waited
            # the idle client was told as well: its next request fails with the reason, well before 60 s
            with pytest.raises(ServerError, match="stage-1.*max_restarts"):
                await asyncio.wait_for(idle.generate(prompt_token_ids=[5, 6], max_new_tokens=4), 20)

    asyncio.run(scenario())
    assert dep.proc.wait(60) == 1
    logs = dep.logs()
    assert "[fatal] stage-1 killed by SIGKILL: failed 2 times within 60s, past its budget of 1 restart" in logs
    # both told (whether each confirmed within flush_timeout depends on the machine's load; that both clients got
    # the error is asserted above)
    assert "told 2 client(s)" in logs


def test_a_controller_past_its_budget_leaves_no_client_waiting_for_its_reconnect_timeout(model_factory) -> None:  # type: ignore[no-untyped-def]
    """The controller itself fails twice with --max-restarts 1: nobody is left to tell its clients, so the
    supervisor stands in at the client address; the client, reconnecting to resume its request, gets a ServerError
    naming controller-0 and the settings within seconds instead of after its reconnect_timeout (60 s)."""
    dep = start_deployment(model_factory("llama"), 1, "--microbatch-size", "2", "--max-seq-len", "256",
                           "--max-restarts", "1", "--heartbeat-interval", "0.2")

    async def controller(c: AsyncClient) -> dict[str, Any]:
        st = await c.status()  # sent into a break, it is answered by the successor
        return next(p for p in st["processes"] if p["role"] == "controller")

    async def scenario() -> None:
        async with AsyncClient(dep.address, timeout=120, reconnect_timeout=60) as c:
            os.kill((await controller(c))["pid"], signal.SIGKILL)  # within its budget: restarted
            ctl = await controller(c)
            assert ctl["incarnation"] == 1
            await stages_back(c, {0: 0})  # the stage registered again with the new controller
            killed_at = 0.0
            with pytest.raises(ServerError) as failed:
                async with c.stream(prompt_token_ids=[5, 6, 7], max_new_tokens=250, ignore_eos=True) as s:
                    async for _ in s:
                        os.kill(ctl["pid"], signal.SIGKILL)  # past its budget: the deployment stops
                        killed_at = time.monotonic()
                        break
                    await asyncio.wait_for(_drain(s), 20)
            waited = time.monotonic() - killed_at
            message = str(failed.value)
            assert "controller-0 killed by SIGKILL" in message and "max_restarts / restart_window" in message, message
            assert waited < 20, waited

    asyncio.run(scenario())
    assert dep.proc.wait(60) == 1
    logs = dep.logs()
    assert "[fatal] controller-0 killed by SIGKILL: failed 2 times within 60s" in logs
    assert "told 1 client(s), 1 confirmed" in logs


async def _drain(s) -> None:  # type: ignore[no-untyped-def]
    async for _ in s:
        pass


def test_a_restart_waiting_out_its_back_off_holds_up_nothing_and_a_stop_abandons_it(model_factory) -> None:  # type: ignore[no-untyped-def]
    """Stage 1 fails twice in a row: its second restart waits a 60 s back-off (status() says "restarting").
    Meanwhile stage 0 is killed and restarted at once - its own first restart - so the supervisor's loop is not
    held up by stage 1's wait; and a stop during the wait ends the deployment at once, starting nothing new."""
    dep = start_deployment(model_factory("llama"), 2, "--microbatch-size", "2", "--max-seq-len", "64",
                           "--restart-backoff", "60", "--restart-backoff-max", "60", "--restart-backoff-reset", "600")

    async def scenario() -> None:
        async with AsyncClient(dep.address, timeout=60) as c:
            stages = await stages_back(c, {0: 0, 1: 0})
            os.kill(stages[1]["pid"], signal.SIGKILL)
            stages = await stages_back(c, {0: 0, 1: 1})
            os.kill(stages[1]["pid"], signal.SIGKILL)  # its second restart in a row: 60 s of back-off
            await stages_back(c, {1: 1}, state="restarting")
            os.kill(stages[0]["pid"], signal.SIGKILL)  # stage 0's first restart: immediate
            # stage 0's new incarnation says Hello while stage 1 still waits (the pipeline is incomplete: not serving)
            deadline = time.monotonic() + 90
            while True:
                st = await stages_back(c, {1: 1}, state="restarting")
                if st[0]["incarnation"] == 1:
                    break
                assert time.monotonic() < deadline, f"stage 0 was not restarted during stage 1's back-off: {st}"
                await asyncio.sleep(0.1)

    try:
        asyncio.run(scenario())
        assert "[restart] stage-1 incarnation 1 killed by SIGKILL: restart 2 of 5 within 60s, in 60s" in dep.logs()
        started = time.monotonic()
    finally:
        assert dep.stop(timeout=30) == 0
    assert time.monotonic() - started < 30
    logs = dep.logs()
    assert "[spawn] stage-1 incarnation 2" not in logs  # the stop abandoned the back-off: nothing was restarted
    assert "[spawn] stage-0 incarnation 1" in logs
