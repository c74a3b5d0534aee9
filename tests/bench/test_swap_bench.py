"""`dejavu-bench swap` (bench/swap_bench.py): its settings, the memory it sets for a tight budget, the summary's
arithmetic on made-up runs, and one short real run (off and on, the tiny model on CPU; slow)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import pytest

from bench import swap_bench
from bench.pipeline_bench import write_model
from recovery.preflight import check_model
from recovery.sizing import AUTO, from_env, size_deployment
from recovery.specs import DeploymentConfig


def test_settings_default_to_the_given_microbatches_and_bad_ones_are_refused(capsys) -> None:  # type: ignore[no-untyped-def]
    assert swap_bench.settings_arg("off,on,on:8,auto", 4) == [("off", 4), ("on", 4), ("on", 8), ("auto", 4)]
    for bad, why in (("maybe", "a mode is one of auto, on, off"), ("on:x", "M must be a number"),
                     ("off:0", "1 microbatch or more"), ("on:2", "more microbatches than the 2"), ("", "at least one")):
        with pytest.raises(ValueError, match=why):
            swap_bench.settings_arg(bad, 4)
    args = swap_bench.parser().parse_args([])
    assert (args.shape, args.stages, args.microbatches, args.settings, args.microbatch_size) == (
        "opt-13b", 1, 4, "off,on,auto", 0)
    assert swap_bench.proxy_args(args) == ["--lookahead", "off"]  # one stage stands for a stage of a pipeline
    assert swap_bench.proxy_args(swap_bench.parser().parse_args(["--stages", "4"])) == []
    for argv, why in ((["--settings", "on:2"], "--microbatches 3 or more"),
                      (["--off-slots", "2", "--device-memory", "1G"], "not both"), (["--stages", "0"], "1 or more")):
        with pytest.raises(SystemExit) as e:  # refused before anything starts
            swap_bench.main(argv)
        assert e.value.code == 2 and why in capsys.readouterr().err


def test_off_slots_sets_a_memory_where_off_holds_that_many_and_on_holds_more(tmp_path: Path) -> None:
    """The tight budget the quick run (and a GPU run with --off-slots) serves under, by dejavu-serve's own sizing:
    off holds exactly N per microbatch; with 2 of 4 microbatches resident, swapping's microbatches are larger."""
    model = write_model("tiny", tmp_path)
    spec = check_model(model)
    args = swap_bench.parser().parse_args(["--device", "cpu", "--dtype", "float32", "--max-seq-len", "128"])
    for n in (1, 2, 3):
        total = swap_bench.starved_memory(model, args, "off", 4, n)
        mems = from_env(str(total), ["cpu"], True)

        def size(mode: str, total: int = total, mems: Any = mems) -> int:
            cfg = DeploymentConfig(str(model), num_stages=1, device="cpu", dtype="float32", microbatch_size=AUTO,
                                   max_seq_len=128, num_microbatches=4, swap=mode)
            return size_deployment(cfg, spec, mems).microbatch_size

        assert size("off") == n
        # (at 1 slot the tiny model's activations, which grow with the batch, eat what the 2 frames leave)
        assert size("on") > n or n == 1


def run(name: str, mode: str, swapping: bool, all_busy: float | None,
        rates: list[tuple[float, float, float]]) -> dict[str, Any]:
    return {"name": name, "mode": mode, "swapping": swapping, "microbatches": 4, "microbatch_size": 8,
            "overhead": {"decode_tokens_per_s": all_busy},
            "rates": [{"rate": r, "tokens_per_s": t, "normalized_latency_s": {"p50": nl}} for r, t, nl in rates]}


def test_summary_sets_every_setting_against_the_first_off() -> None:
    runs = [run("off", "off", False, 100.0, [(1.0, 50.0, 0.04), (2.0, 80.0, 0.08)]),
            run("on", "on", True, 190.0, [(1.0, 50.0, 0.05), (2.0, 120.0, 0.06)]),
            run("on x8", "on", True, 150.0, [(1.0, 50.0, 0.05)]),
            run("auto", "auto", False, 98.0, [(1.0, 49.0, 0.04), (2.0, 79.0, 0.08)]),
            {"name": "failed", "mode": "on", "failed": "did not start", "rates": []}]
    out = swap_bench.summarize(runs)
    assert out["baseline"] == "off" and set(out["settings"]) == {"off", "on", "on x8", "auto"}
    on = out["settings"]["on"]
    assert on["all_busy_tokens_per_s_ratio"] == pytest.approx(1.9)
    assert on["rates"][1] == {"rate": 2.0, "tokens_per_s_ratio": pytest.approx(1.5),
                              "normalized_latency_p50_ratio": pytest.approx(0.75)}
    assert out["best_on_ratio"] == pytest.approx(1.9) and out["target"] == {"ratio": 1.8, "met": True}
    assert out["auto"]["never_below_off"] is True and out["auto"]["lowest_ratio"] == pytest.approx(0.98)
    assert out["auto"]["swapping"] == [False]
    runs[3]["rates"][1]["tokens_per_s"] = 70.0  # auto 12.5% below off at 2 req/s
    worse = swap_bench.summarize(runs)["auto"]
    assert worse["never_below_off"] is False and worse["lowest_ratio"] == pytest.approx(70 / 80)
    assert swap_bench.summarize(runs[1:3])["baseline"] is None  # no off measured: nothing to set against
    lines = swap_bench.summary_lines(out)
    assert lines[1].startswith("on: microbatch size 8, swapping on; every slot busy 1.90x off's tokens/s")
    assert "target 1.8x met: True" in lines[-2] and "never below off (within 3%): True" in lines[-1]


def test_swap_counters_are_summed_over_the_stages_and_differenced() -> None:
    def status(k: float) -> dict[str, Any]:
        return {"processes": [
            {"role": "controller", "index": 0},
            {"role": "stage", "index": 0, "swap": {"bytes_in": 100 * k, "bytes_out": 10 * k, "swap_ins": k,
                                                   "stalls": 0, "stall_s": 0.0, "failures": 0}},
            {"role": "stage", "index": 1, "swap": {"bytes_in": 50 * k, "bytes_out": 5 * k, "swap_ins": k,
                                                   "stalls": k, "stall_s": 0.5 * k, "failures": 0}},
            {"role": "stage", "index": 2}]}  # a stage that reported no swap field (not swapping, or no stats yet)

    assert swap_bench.swap_delta(status(1), status(3)) == {
        "bytes_in": 300, "bytes_out": 30, "swap_ins": 4, "stalls": 2, "stall_s": 1.0, "failures": 0}


@pytest.mark.slow  # two deployments, ~20 s on 2 cores: with the slow runs (the default suite stays under 15 min)
def test_a_quick_run_serves_off_and_on_under_one_budget_and_on_swaps(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    pytest.importorskip("matplotlib")
    scratch = tmp_path / "tmp"  # the run's temporary files (model config, deployment logs): removed at the end
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    monkeypatch.delenv("DEJAVU_DEVICE_MEMORY", raising=False)
    assert swap_bench.main(["--quick", "--quiet", "--out", str(tmp_path)]) == 0
    assert list(scratch.iterdir()) == [] and tempfile.tempdir == str(scratch)
    import os

    assert "DEJAVU_DEVICE_MEMORY" not in os.environ  # set for the deployments only
    result = json.loads((tmp_path / "swap_bench.json").read_text())
    assert result["partial"] is False and result["card"] == "cpu" and int(result["device_memory"]) > 0
    off, on = result["runs"]
    assert (off["mode"], on["mode"], off["swapping"], on["swapping"]) == ("off", "on", False, True)
    assert off["microbatch_size"] == 2 < on["microbatch_size"]  # the same budget: swapping's microbatches are larger
    assert off["overhead"]["swap"]["bytes_in"] == 0 < on["overhead"]["swap"]["bytes_in"]
    assert on["overhead"]["swap"]["failures"] == 0 and on["swap"]["0"]["frames"] == 2
    assert all(s["serve_args"][-2:] == ["--lookahead", "off"] for s in (off, on))
    for s in (off, on):
        (r,) = s["rates"]
        assert r["completed"] == r["requests"] == 8 and r["restarts"] == {} and r["failed"] == 0
        assert s["overhead"]["decode_tokens_per_s"] > 0
    assert on["rates"][0]["swap"]["bytes_in"] > 0
    assert result["summary"]["baseline"] == "off, 4 mb"
    assert result["summary"]["settings"]["on, 4 mb"]["all_busy_tokens_per_s_ratio"] > 0
    assert (tmp_path / "swap_bench.png").stat().st_size > 1000
    assert (tmp_path / "deployment-off-4mb.log").exists() and (tmp_path / "deployment-on-4mb.log").exists()
