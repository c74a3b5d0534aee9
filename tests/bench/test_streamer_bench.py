"""`dejavu-bench streamer --device cpu --quick` keeps working: it finishes in well under a minute and prints
JSON lines with naive and buffered figures next to the ceilings, writes the JSON and the plot, and leaves no
temporary file or folder behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.streamer.helpers import ROOT


@pytest.mark.slow  # the whole streamer bench, ~30 s: with the slow runs (the default suite stays under 15 min)
def test_quick_cpu_benchmark(tmp_path) -> None:  # type: ignore[no-untyped-def]
    out_json, out_png = tmp_path / "b.json", tmp_path / "b.png"
    # the run's temporary folders (streamer sockets and logs, the random model) go here: it must end up empty
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, str(ROOT / "bin" / "dejavu-bench"), "streamer", "--device", "cpu",
                           "--quick", "--json", str(out_json), "--plot", str(out_png)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120, env={**os.environ, "TMPDIR": str(scratch)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert time.monotonic() - t0 < 60
    records = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    sections = {r["section"] for r in records}
    assert {"meta", "ceiling", "op", "speedup", "e2e", "overhead", "summary"} <= sections
    ops = [r for r in records if r["section"] == "op"]
    assert {r["mode"] for r in ops} == {"naive", "buffered"}
    assert {r["op"] for r in ops} == {"prompt_layer", "decode_step", "swap_out", "swap_in"}
    assert all(r["gbps"] > 0 and r["ceiling_gbps"] > 0 and r["fraction"] > 0 for r in ops)
    written = json.loads(out_json.read_text())
    assert written["records"] == records and "--quick" in written["command"]
    assert out_png.stat().st_size > 10_000
    assert sorted(p.name for p in scratch.iterdir()) == [], "temporary files left behind"
    assert "%|" not in proc.stderr, "progress bars drawn although stderr is not a terminal"


def test_outputs_default_to_the_shared_folder_in_the_current_directory() -> None:
    from bench.streamer_bench import outputs, parser

    def paths(*argv: str) -> tuple[Path, Path]:
        return outputs(parser().parse_args(list(argv)))

    default = Path("dejavu-bench-results")
    assert paths() == (default / "streamer_bench.json", default / "streamer_bench.png")
    assert paths("--out", "d") == (Path("d/streamer_bench.json"), Path("d/streamer_bench.png"))
    assert paths("--json", "x/a.json") == (Path("x/a.json"), Path("x/a.png"))
    assert paths("--json", "a.json", "--plot", "p.png") == (Path("a.json"), Path("p.png"))
    assert paths("--out", "d", "--plot", "p.png") == (Path("d/streamer_bench.json"), Path("p.png"))
    assert "./dejavu-bench-results/" in parser().format_help()
