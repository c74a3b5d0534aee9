"""The load generator: workload distributions (deterministic, clamped, Poisson) and runs against a fake server."""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import random
import statistics
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import pytest

from bus import loadgen as sb
from bus.messages import CancelRequest, GenerateRequest
from tests.bus.fake_controller import FakeController, never_answer


def run(coro: Coroutine[Any, Any, Any], timeout: float = 20.0) -> Any:
    async def bounded() -> Any:
        async with asyncio.timeout(timeout):
            return await coro

    return asyncio.run(bounded())


def test_parse_length_specs() -> None:
    assert sb.parse_length("paper", sb.PAPER_OUTPUT) is sb.PAPER_OUTPUT
    assert sb.parse_length("12", sb.PAPER_PROMPT) == sb.LengthDist("fixed", 12)
    assert sb.parse_length("3:9", sb.PAPER_PROMPT) == sb.LengthDist("uniform", 3, 9)
    assert sb.parse_length("lognormal:100:0.5:2:50", sb.PAPER_OUTPUT) == sb.LengthDist("lognormal", 100, 0.5, 2, 50)
    for bad in ["0", "5:3", "x", "1:2:3", "lognormal:0:1", "lognormal:10:1:5:2", ""]:
        with pytest.raises(argparse.ArgumentTypeError):
            sb.parse_length(bad, sb.PAPER_OUTPUT)


def test_draws_are_deterministic_and_shared_across_counts() -> None:
    a = sb.draw_requests(50, sb.LengthDist("uniform", 1, 20), sb.PAPER_OUTPUT, 256, seed=3)
    assert a == sb.draw_requests(50, sb.LengthDist("uniform", 1, 20), sb.PAPER_OUTPUT, 256, seed=3)
    assert a[:10] == sb.draw_requests(10, sb.LengthDist("uniform", 1, 20), sb.PAPER_OUTPUT, 256, seed=3)
    assert a != sb.draw_requests(50, sb.LengthDist("uniform", 1, 20), sb.PAPER_OUTPUT, 256, seed=4)
    assert all(1 <= len(p) <= 20 and all(0 <= t < 256 for t in p) for p, _ in a)
    paper = sb.draw_requests(3, sb.PAPER_PROMPT, sb.PAPER_OUTPUT, 7, seed=0)
    assert all(len(p) == 1000 and max(p) < 7 for p, _ in paper)


def test_paper_outputs_are_long_tailed_and_clamped() -> None:
    rng = random.Random(0)
    xs = [sb.PAPER_OUTPUT.sample(rng) for _ in range(20_000)]
    assert min(xs) >= 2 and max(xs) == 950  # the tail reaches the clamp
    assert 180 <= statistics.median(xs) <= 220 and statistics.mean(xs) > statistics.median(xs)
    wide = sb.LengthDist("lognormal", 200, 3.0, lo=2, hi=950)
    ys = [wide.sample(rng) for _ in range(2_000)]
    assert min(ys) == 2 and max(ys) == 950
    u = [sb.LengthDist("uniform", 3, 5).sample(rng) for _ in range(300)]
    assert set(u) == {3, 4, 5}


def test_poisson_arrivals() -> None:
    t = sb.poisson_arrivals(4.0, seed=1, n=20_000)
    gaps = [b - a for a, b in zip([0.0, *t], t)]
    assert statistics.mean(gaps) == pytest.approx(0.25, rel=0.03)
    assert statistics.stdev(gaps) == pytest.approx(0.25, rel=0.05)  # exponential: stdev = mean
    assert t == sb.poisson_arrivals(4.0, seed=1, n=20_000)
    slow = sb.poisson_arrivals(2.0, seed=1, n=100)
    assert slow == pytest.approx([2 * x for x in t[:100]])  # the same pattern, stretched
    d = sb.poisson_arrivals(50.0, seed=2, duration=100.0)
    assert max(d) < 100.0 and len(d) == pytest.approx(5000, rel=0.05)


def test_percentiles() -> None:
    p = sb.percentiles([float(x) for x in range(1, 101)])
    assert (p["mean"], p["p50"], p["max"]) == (50.5, 50.5, 100.0)
    assert p["p99"] == pytest.approx(99.01)
    assert sb.percentiles([])["p50"] is None


def test_saturated_throughput_counts_only_the_time_every_slot_is_busy() -> None:
    """Two slots. A: sent at 0, first token at once, 11 tokens by 10 s (1 token/s after the first). B: sent at
    2, 9 tokens by 6 s (2 tokens/s). Both slots are busy during [2, 6): 4 s at 3 tokens/s. A failed request
    counts for nothing; one slot more and the deployment is never full."""
    a = {"error": None, "arrival_s": 0.0, "sent_s": 0.0, "ttft_s": 0.0, "end_s": 10.0, "generated": 11}
    b = {"error": None, "arrival_s": 2.0, "sent_s": 2.0, "ttft_s": 0.0, "end_s": 6.0, "generated": 9}
    failed = {"error": "ServerError", "sent_s": 1.0}
    got = sb.saturated([a, b, failed], 2)
    assert got["full_s"] == pytest.approx(4.0) and got["full_tokens_per_s"] == pytest.approx(3.0)
    assert sb.saturated([a, b], 3) == {"full_s": 0.0, "full_tokens_per_s": None}
    assert sb.saturated([], 2) == {"full_s": 0.0, "full_tokens_per_s": None}
    summary = sb.summarize(1.0, [a | {"output_len": 11}, b | {"output_len": 9}], 10.0, slots=2)
    assert summary["slots"] == 2 and summary["saturated"]["full_s"] == pytest.approx(4.0)
    assert "saturated" not in sb.summarize(1.0, [a | {"output_len": 11}], 10.0)


class Terminal(io.StringIO):
    """stderr as a terminal: progress bars are drawn."""

    def isatty(self) -> bool:
        return True


def test_quick_run_against_fake_server(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "serve.json"
    monkeypatch.setattr("sys.stderr", term := Terminal())

    async def body() -> tuple[int, list[GenerateRequest]]:
        async with FakeController() as fake:
            rc = await sb.amain(["--address", fake.address, "--quick", "--out", str(out), "--label", "fake"])
            seen = []
            while not fake.inbox.empty():
                msg = fake.inbox.get_nowait()[2]
                if isinstance(msg, GenerateRequest):
                    seen.append(msg)
        return rc, seen

    rc, seen = run(body())
    assert rc == 0
    report = json.loads(out.read_text())
    assert out.with_suffix(".png").stat().st_size > 1000
    assert report["command"].startswith("dejavu-bench serve --address") and report["date"]
    assert report["server"]["model"] == "fake" and report["label"] == "fake"
    assert [s["rate"] for s in report["rates"]] == sb.QUICK["rates"]
    for s in report["rates"]:
        assert (s["requests"], s["completed"], s["failed"], s["length_mismatch"]) == (8, 8, 0, 0)
        assert s["throughput_rps"] > 0 and s["tokens_per_s"] > 0
        for key in ("ttft_s", "tpot_s", "latency_s", "normalized_latency_s"):
            assert set(s[key]) == {"mean", "p50", "p95", "p99", "max"} and s[key]["p50"] is not None
    assert len(seen) == 16
    assert "rate 8 req/s (1/2)" in term.getvalue() and "rate 16 req/s (2/2)" in term.getvalue()
    assert "8/8" in term.getvalue()  # progress per rate, on stderr
    for req in seen:
        assert req.temperature == 0.0 and req.stop_token_ids == [] and 2 <= req.max_new_tokens <= 8
        assert req.prompt_token_ids is not None and len(req.prompt_token_ids) == 16


def test_deadline_cancels_what_is_left(tmp_path: Path) -> None:
    out = tmp_path / "stuck.json"

    async def body() -> int:
        async with FakeController(never_answer) as fake:
            rc = await sb.amain(["--address", fake.address, "--rates", "100", "--num-requests", "2",
                                 "--prompt-len", "4", "--output-len", "4", "--deadline", "0.5", "--no-plot",
                                 "--out", str(out)])
            for _ in range(2):
                await fake.expect(CancelRequest)  # each unfinished request was cancelled on the server
            return rc

    assert run(body()) == 1
    s = json.loads(out.read_text())["rates"][0]
    assert s["completed"] == 0 and s["errors"]["unfinished"]["count"] == 2


def test_default_output_is_a_folder_in_the_current_directory(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Never inside the package (it once defaulted to bus/results/), --quick or not; --out as given."""
    monkeypatch.chdir(tmp_path)
    for extra in ([], ["--quick"]):
        out = sb.parse_args(["--address", "tcp://127.0.0.1:1", *extra]).out
        assert not out.is_absolute() and out.parent == sb.RESULTS_DIR == Path("dejavu-bench-results")
        assert out.name.startswith("serve-") and out.suffix == ".json"
        assert out.resolve().parent == tmp_path / "dejavu-bench-results"
    assert sb.parse_args(["--address", "tcp://127.0.0.1:1", "--out", "x/y.json"]).out == Path("x/y.json")
    assert "./dejavu-bench-results/serve-<UTC time>.json" in " ".join(sb.parser().format_help().split())


def test_progress_bars_only_on_a_terminal_and_never_with_quiet(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr("sys.stderr", io.StringIO())
    with sb.progress(3, "x") as bar:
        assert bar.disable
    term = Terminal()
    monkeypatch.setattr("sys.stderr", term)
    with sb.progress(3, "x", quiet=True) as bar:
        assert bar.disable
    with sb.progress(3, "rate 1 req/s", unit="req") as bar:
        assert not bar.disable
        bar.update(3)
    assert "rate 1 req/s" in term.getvalue() and "3/3" in term.getvalue()
