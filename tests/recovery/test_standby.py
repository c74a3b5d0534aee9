"""The warm standby stage process (`--standby`, recovery/standby.py): a killed stage comes back as the standby its
host's agent prepared (imports done), outputs stay exact, a new standby follows for the next restart, and none
outlives the deployment."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import time

from bus.child import alive
from recovery.standby import keeps_standby
from tests.conftest import start_deployment
from tests.recovery.test_recovery import MAX_SEQ, reference, run_with_kills, workload

READY = re.compile(r"\[standby\] pid (\d+) ready")


def ready_standbys(logs: str) -> list[int]:
    return [int(p) for p in READY.findall(logs)]


def wait_standby(dep, count: int, timeout: float = 90.0) -> int:  # type: ignore[no-untyped-def]
    """The pid of the `count`-th standby to become ready (the log says so), within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        pids = ready_standbys(dep.logs())
        if len(pids) >= count:
            return pids[count - 1]
        assert time.monotonic() < deadline, f"standby {count} not ready within {timeout}s:\n{dep.logs()[-3000:]}"
        time.sleep(0.2)  # the agent logs it; there is no status push to wait on


def test_auto_keeps_a_standby_for_gpu_stages_only() -> None:
    assert keeps_standby("auto", "cuda:1") and not keeps_standby("auto", "cpu")
    assert keeps_standby("on", "cpu") and not keeps_standby("off", "cuda:0")


def test_a_killed_stage_comes_back_as_the_standby_exactly(model_factory) -> None:  # type: ignore[no-untyped-def]
    path = model_factory("llama")
    reqs = workload(211, 12)
    refs = reference(path, reqs)
    dep = start_deployment(path, 2, "--microbatch-size", "4", "--max-seq-len", str(MAX_SEQ), "--standby", "on")
    try:
        first = wait_standby(dep, 1)
        outs, status = asyncio.run(run_with_kills(dep.address, reqs, [(100, 1)]))
        assert outs == refs
        stage1 = next(p for p in status["processes"] if p["role"] == "stage" and p["index"] == 1)
        assert stage1["incarnation"] == 1 and stage1["pid"] == first, "the restart must be the standby process"
        logs = dep.logs()
        assert f"[standby] stage-1 incarnation 1: the standby pid {first} takes it" in logs
        assert re.search(r"\[startup\] stage 1 \(incarnation 1\) ready [0-9.]+ s after exec: standby", logs), \
            "the restarted stage skipped the imports"
        # --standby-warmup (on by default): the standby ran a layer of the stage's sizes on its device first
        assert re.search(r"\[startup\] stage 1 \(incarnation 1\) is a standby that warmed its device first: cpu "
                         r"warmed in [0-9.]+ s: no context \(CPU\), layers \[\d+", logs), logs[-3000:]
        second = wait_standby(dep, 2)  # prepared again for the next restart
        assert second != first
        outs, status = asyncio.run(run_with_kills(dep.address, reqs[:6], [(60, 0)]))
        assert outs == refs[:6]
        stage0 = next(p for p in status["processes"] if p["role"] == "stage" and p["index"] == 0)
        assert stage0["pid"] == second and stage0["incarnation"] == 1
    finally:
        assert dep.stop() == 0
    third = ready_standbys(dep.logs())[2:]  # the one waiting at the stop exits with the deployment
    deadline = time.monotonic() + 10
    while any(alive(p) for p in third) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(alive(p) for p in third)


def test_the_policy_tells_agents_whether_standbys_warm_and_the_stages_budget(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from recovery.serve_cli import parser
    from recovery.specs import DeploymentConfig

    assert parser().parse_args(["--model", "m"]).standby_warmup == "on"
    assert parser().parse_args(["--model", "m", "--standby-warmup", "off"]).standby_warmup == "off"
    on = DeploymentConfig(model_dir=str(tmp_path), gpu_memory_fraction=0.8).policy()
    assert on.standby_warmup and on.gpu_memory_fraction == 0.8
    assert not DeploymentConfig(model_dir=str(tmp_path), standby_warmup=False).policy().standby_warmup


def test_a_standby_refuses_anything_but_a_stage() -> None:
    p = subprocess.Popen([sys.executable, "-m", "stages.standby"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    try:
        assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        _, err = p.communicate('{"argv": ["python", "-c", "print(1)"], "log": ""}\n', timeout=30)
        assert p.returncode == 2 and "not a stage's command line" in err
    finally:
        if p.poll() is None:
            p.kill()
