"""`dejavu-bench streamer --device cpu --quick` keeps working: it finishes in well under a minute and prints
JSON lines with naive and buffered figures next to the ceilings, and writes the JSON and the plot."""

from __future__ import annotations

import json
import subprocess
import sys
import time

from tests.streamer.helpers import ROOT


def test_quick_cpu_benchmark(tmp_path) -> None:  # type: ignore[no-untyped-def]
    out_json, out_png = tmp_path / "b.json", tmp_path / "b.png"
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, str(ROOT / "bin" / "dejavu-bench"), "streamer", "--device", "cpu",
                           "--quick", "--json", str(out_json), "--plot", str(out_png)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert time.monotonic() - t0 < 60
    records = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    sections = {r["section"] for r in records}
    assert {"meta", "ceiling", "op", "speedup", "e2e", "overhead", "summary"} <= sections
    ops = [r for r in records if r["section"] == "op"]
    assert {r["mode"] for r in ops} == {"naive", "buffered"}
    assert {r["op"] for r in ops} == {"prompt_layer", "decode_step", "swap_out", "swap_in"}
    assert all(r["gbps"] > 0 and r["ceiling_gbps"] > 0 and r["fraction"] > 0 for r in ops)
    assert json.loads(out_json.read_text())["records"] == records
    assert out_png.stat().st_size > 10_000
