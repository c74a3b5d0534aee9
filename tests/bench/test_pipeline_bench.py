"""`dejavu-bench pipeline --quick` keeps working: a real 2-stage deployment, overhead run, two rates."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import tempfile
import time

import pytest

from bench import pipeline_bench


def test_pipeline_bench_quick(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    pytest.importorskip("matplotlib")
    scratch = tmp_path / "tmp"  # the run's temporary files (model config, deployment log): removed at the end
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    # --cudnn-attention changes nothing on CPU; here it checks the option reaches the stages' configuration
    assert pipeline_bench.main(["--quick", "--stages", "2", "--cudnn-attention", "off", "--out", str(tmp_path)]) == 0
    assert list(scratch.iterdir()) == [] and tempfile.tempdir == str(scratch)
    assert (tmp_path / "deployment.log").stat().st_size > 0
    result = json.loads((tmp_path / "pipeline_bench.json").read_text())
    (run,) = result["runs"]
    assert run["stages"] == 2 and run["baseline_step"]["median_s"] > 0
    assert set(run["overhead"]["stage_decode_step_s"]) == {"0", "1"}
    assert [r["rate"] for r in run["rates"]] == [4.0, 8.0]
    for r in run["rates"]:
        assert r["completed"] == r["requests"] and set(r["idle_fraction"]) == {"0", "1"}
        assert all(0.0 <= f <= 1.0 for f in r["idle_fraction"].values())
        assert r["stalls"] == [] and r["restarts"] == {}
        assert r["slots"] == 2 * int(result["settings"]["microbatch_size"])  # from status(): 2 microbatches
        assert set(r["saturated"]) == {"full_s", "full_tokens_per_s"}
    assert (tmp_path / "pipeline_bench.png").stat().st_size > 1000
    assert result["settings"]["cudnn_attention"] == "off"


class StallingStatus:
    """status() of a deployment whose stages stop finishing steps for a while, then go on."""

    def __init__(self, pid: int, stall_from: float, stall_to: float) -> None:
        self.pid, self.stall_from, self.stall_to = pid, stall_from, stall_to
        self.t0 = time.monotonic()
        self.resumed_polls = 0
        self.seen_resumed = asyncio.Event()  # polled a few times after the stall ended

    async def status(self) -> dict:  # type: ignore[type-arg]
        t = time.monotonic() - self.t0
        if t > self.stall_to:
            self.resumed_polls += 1
            if self.resumed_polls >= 3:
                self.seen_resumed.set()
        steps = int(min(t, self.stall_from) * 100) + (int((t - self.stall_to) * 100) if t > self.stall_to else 0)
        return {"processes": [{"role": "stage", "index": 0, "pid": self.pid, "incarnation": 0, "steps": steps,
                               "state": "serving"}]}


def test_a_stall_during_a_rate_is_reported_once_with_the_stacks_of_the_processes(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """No stage step for `quiet_s`: the watcher dumps every process's stacks once (faulthandler on SIGUSR1),
    saves the deployment log, and records the stall with its length when steps resume."""
    child = subprocess.Popen([sys.executable, "-c", "import faulthandler, signal, sys, time\n"
                              "faulthandler.register(signal.SIGUSR1, all_threads=True)\n"
                              "print('up', flush=True)\ntime.sleep(60)"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert child.stdout is not None and child.stdout.readline().strip() == "up"
    saved = []

    async def scenario() -> list:  # type: ignore[type-arg]
        done = asyncio.Event()
        fake = StallingStatus(child.pid, stall_from=0.3, stall_to=1.5)
        watcher = asyncio.create_task(pipeline_bench.watch_progress(
            fake, done, "r1", None, lambda: saved.append(1), quiet_s=0.4, poll_s=0.05))  # type: ignore[arg-type]
        await asyncio.wait_for(fake.seen_resumed.wait(), 10)
        done.set()
        return await asyncio.wait_for(watcher, 10)

    try:
        stalls = asyncio.run(scenario())
    finally:
        child.kill()
        _, err = child.communicate(timeout=10)
    (stall,) = stalls
    assert stall["before"] == [(0, 30)] and stall["after"][0][1] > 30
    assert 0.2 <= stall["t_s"] <= 1.0 and 0.6 <= stall["length_s"] <= 2.2
    assert saved == [1]
    assert "most recent call first" in err, err  # the process wrote its stacks
