"""`dejavu-bench pipeline --quick` keeps working: a real 2-stage deployment, overhead run, two rates; with
`--hosts`, the same on one host and on simulated hosts, compared (a slow test; its pieces are tested here on
made-up run records)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import tempfile
import time

import pytest

from bench import cross_host, curve_bench, pipeline_bench


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
    assert run["stages"] == 2 and run["hosts"] == 1 and run["baseline_step"]["median_s"] > 0
    assert run["overhead"]["decode_tokens_per_s"] > 0
    assert "cross_host_vs_one_host" not in result and "control_messages" not in result
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


@pytest.mark.slow  # two deployments one after the other: 25 s on the quiet 2-core box, 56 s on the busy one
def test_pipeline_bench_quick_on_one_host_and_on_two(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    pytest.importorskip("matplotlib")
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    assert pipeline_bench.main(["--quick", "--stages", "2", "--hosts", "2", "--out", str(tmp_path)]) == 0
    assert list(scratch.iterdir()) == []
    assert (tmp_path / "deployment.log").stat().st_size > 0 and (tmp_path / "deployment-2hosts.log").stat().st_size > 0
    result = json.loads((tmp_path / "pipeline_bench.json").read_text())
    assert [(r["stages"], r["hosts"]) for r in result["runs"]] == [(2, 1), (2, 2)]
    for run in result["runs"]:
        assert [r["completed"] for r in run["rates"]] == [r["requests"] for r in run["rates"]]
        assert all(r["restarts"] == {} for r in run["rates"])
    (depth,) = result["cross_host_vs_one_host"]["depths"]
    assert (depth["stages"], depth["hosts"]) == (2, 2) and isinstance(depth["within_target"], bool)
    for key in ("tpot_median_s", "decode_tokens_per_s", "stage_decode_step_s"):
        assert depth[key]["one_host"] > 0 and depth[key]["cross_host"] > 0 and depth[key]["ratio"] > 0
    assert [r["rate"] for r in depth["rates"]] == [4.0, 8.0]
    assert result["control_messages"]["messages"]["step_result"]["ping_pong"]["curve"]["round_trips_per_s"] > 0
    assert (tmp_path / "pipeline_bench.png").stat().st_size > 1000


def made_up_run(stages: int, hosts: int, tpot: float, tokens_per_s: float) -> dict:  # type: ignore[type-arg]
    rates = [{"rate": r, "tokens_per_s": r * 10 * (tokens_per_s / 100), "tpot_s": {"p50": tpot * 1.1},
              "normalized_latency_s": {"p50": tpot * 1.2, "p95": tpot * 1.5},
              "idle_fraction": {str(i): 0.3 for i in range(stages)}} for r in (1.0, 2.0)]
    return {"stages": stages, "hosts": hosts, "baseline_step": {"median_s": tpot / stages},
            "overhead": {"tpot_median_s": tpot, "decode_tokens_per_s": tokens_per_s,
                         "stage_decode_step_s": {str(i): tpot / stages for i in range(stages)}}, "rates": rates}


def test_cross_host_ratios_the_target_and_the_plot(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """cross-host / one host per depth; within target means the overhead run's TPOT and throughput both within
    3% of one host's, either way (far faster is noise, not a pass); the plot gets its third panel."""
    pytest.importorskip("matplotlib")
    runs = [made_up_run(2, 1, 0.100, 100.0), made_up_run(2, 2, 0.102, 98.0),
            made_up_run(4, 1, 0.200, 80.0), made_up_run(4, 4, 0.220, 70.0),
            made_up_run(3, 1, 0.100, 100.0), made_up_run(3, 3, 0.080, 125.0)]
    cross = cross_host.cross_host(runs)
    two, four, three = cross["depths"]
    assert three["tpot_median_s"]["ratio"] == pytest.approx(0.8) and three["within_target"] is False
    assert (two["stages"], two["hosts"], four["hosts"]) == (2, 2, 4)
    assert two["tpot_median_s"] == {"one_host": 0.100, "cross_host": 0.102, "ratio": pytest.approx(1.02)}
    assert two["decode_tokens_per_s"]["ratio"] == pytest.approx(0.98) and two["within_target"] is True
    assert four["tpot_median_s"]["ratio"] == pytest.approx(1.10) and four["within_target"] is False
    assert [r["tokens_per_s"]["ratio"] for r in four["rates"]] == [pytest.approx(70 / 80)] * 2
    assert len(cross_host.cross_host_lines(cross)) == 3
    samples = {(mode, kind, pattern): [{"round_trips_per_s": 1000.0, "latency_p50_us": 300.0,
                                        "cpu_us_per_round_trip": 290.0, "messages_per_s": 5000.0,
                                        "cpu_us_per_message": 100.0}]
               for mode in curve_bench.MODES for kind in curve_bench.MESSAGES for pattern in curve_bench.PATTERNS}
    control = {"messages": curve_bench.summarize(samples)}
    assert control["messages"]["heartbeat"]["stream"]["curve_over_plaintext"]["messages_per_s"] == 1.0
    result = {"shape": "tiny", "card": "cpu", "runs": runs, "cross_host_vs_one_host": cross,
              "control_messages": control}
    pipeline_bench.plot(result, tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 1000


def test_hosts_takes_each_or_a_number_that_fits_every_depth(capsys) -> None:  # type: ignore[no-untyped-def]
    p = pipeline_bench.parser()
    assert p.parse_args(["--hosts", "each"]).hosts == "each" and p.parse_args(["--hosts", "3"]).hosts == 3
    assert p.parse_args([]).hosts is None
    for bad in ("1", "0", "two"):
        with pytest.raises(SystemExit):
            p.parse_args(["--hosts", bad])
    assert cross_host.hosts_for(4, None) == [1] and cross_host.hosts_for(4, "each") == [1, 4]
    assert cross_host.hosts_for(4, 2) == [1, 2]
    assert cross_host.hosts_error("each", [2, 4]) == "" and cross_host.hosts_error(2, [2, 4]) == ""
    assert "1 stage" in cross_host.hosts_error("each", [1, 2]) and "3 hosts" in cross_host.hosts_error(3, [2, 4])
    with pytest.raises(SystemExit) as e:  # refused before anything starts
        pipeline_bench.main(["--quick", "--stages", "2", "--hosts", "3"])
    assert e.value.code == 2 and "cannot be spread over 3 hosts" in capsys.readouterr().err


def test_all_busy_rate_counts_tokens_while_every_request_decodes() -> None:
    # two requests, 9 tokens each, 10 ms apart; the second starts 25 ms later
    times = [[i * 0.01 for i in range(9)], [0.025 + i * 0.01 for i in range(9)]]
    start, end = 0.025 + 2 * 0.01, 0.08  # the later request's token 2 .. the earlier request's last token
    inside = sum(1 for t in times for x in t if start < x <= end)
    assert pipeline_bench.all_busy_rate(times) == pytest.approx(inside / (end - start))
    assert pipeline_bench.all_busy_rate([[0.0, 0.1], [0.5, 0.6]]) is None


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


def test_ab_is_refused_across_hosts_or_without_repeats(capsys) -> None:  # type: ignore[no-untyped-def]
    for argv in (["--ab", "--layer-split even", "--hosts", "2"], ["--ab", "--layer-split even", "--ab-repeats", "0"]):
        with pytest.raises(SystemExit) as e:  # refused before anything starts
            pipeline_bench.main(["--quick", "--stages", "2", *argv])
        assert e.value.code == 2 and "--ab runs on one host" in capsys.readouterr().err


@pytest.mark.slow  # two deployments, ~20 s on 2 cores
def test_an_ab_run_alternates_the_sides_and_sets_b_over_a(tmp_path) -> None:  # type: ignore[no-untyped-def]
    pytest.importorskip("matplotlib")
    assert pipeline_bench.main(["--quick", "--stages", "2", "--rates", "none", "--serve-args", "--layer-split even",
                                "--ab", "--layer-split balanced", "--ab-repeats", "1", "--quiet",
                                "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "pipeline_bench.json").read_text())
    assert [(r["ab"]["side"], r["ab"]["serve_args"]) for r in result["runs"]] == [
        ("A", "--layer-split even"), ("B", "--layer-split balanced")]
    ab = result["ab"]["2"]
    assert ab["repeats"] == 1 and ab["A"]["decode_tokens_per_s"] > 0 and ab["B"]["tpot_median_s"] > 0
    assert ab["b_over_a"]["decode_tokens_per_s"] == pytest.approx(
        ab["B"]["decode_tokens_per_s"] / ab["A"]["decode_tokens_per_s"])
    assert (tmp_path / "deployment-A1.log").exists() and (tmp_path / "deployment-B1.log").exists()
