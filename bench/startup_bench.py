"""`dejavu-bench startup`: how long `dejavu-serve --model default` takes to start and to stop, against the floor.

For each stage count N (--stages, default 1,2), --repeats times (default 5): the wall time from launching
`bin/dejavu-serve --model default --stages N` until it prints its `ready` line, and from SIGINT until it has
exited (and until every process it started is gone). The floor, measured in the same run and interleaved with
the launches: `python -c "import torch"` in a fresh process - a deployment cannot be ready before at least one
process has imported torch. Reported: median, min and max of each, and the ratio of the medians start-up /
floor. The project's target: under 5 s for the default model on 2 cores.

Before the timed launches, one untimed launch per stage count (--warmup) writes the default model into the
cache dir if it is not there yet (first use) and warms the page cache for torch's import, which the floor pays
too; the timed figures are those of a model already on disk.

Writes <out>/startup_bench.json (date, machine, exact command lines, every sample) and <out>/startup_bench.png
(--out: default ./dejavu-bench-results/ in the current directory); a progress bar on stderr (on a terminal,
without --quiet). `--quick`: one repeat of one stage (CI).
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.metadata
import json
import os
import platform
import re
import selectors
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bus.child import alive
from bus.loadgen import OUT_DEFAULT, RESULTS_DIR, echo, progress
from recovery.launch import ROOT, SERVE, descendants

TARGET_S = 5.0  # the project's target for the default model on 2 cores
FLOOR_CODE = "import torch"


def _stages(text: str) -> list[int]:
    try:
        out = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        out = []
    if not out or min(out) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated stage counts >= 1, got {text!r}")
    return out


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dejavu-bench startup", description=__doc__.split("\n\n")[0])
    p.add_argument("--stages", type=_stages, help="comma-separated stage counts (default 1,2; --quick 1)")
    p.add_argument("--repeats", type=int, help="timed launches per stage count, and floor samples (default 5; "
                   "--quick 1)")
    p.add_argument("--warmup", type=int, default=1, help="untimed launches per stage count first (default 1; the "
                   "first one writes the default model if absent)")
    p.add_argument("--cache-dir", help="dejavu-serve --cache-dir: where the default model is (default: "
                   "dejavu-serve's, $DEJAVU_CACHE else ~/.cache/dejavu)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds a launch may take to be ready (default 120)")
    p.add_argument("--stop-timeout", type=float, default=60.0,
                   help="seconds a deployment may take to exit after SIGINT (default 60)")
    p.add_argument("--out", type=Path, default=RESULTS_DIR,
                   help=f"folder for startup_bench.json and startup_bench.png (default {OUT_DEFAULT})")
    p.add_argument("--quick", action="store_true", help="one repeat of one stage (CI smoke run)")
    p.add_argument("--quiet", action="store_true",
                   help="no progress bar (on stderr; shown only when stderr is a terminal)")
    return p


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = parser()
    args = p.parse_args(argv)
    if args.stages is None:
        args.stages = [1] if args.quick else [1, 2]
    if args.repeats is None:
        args.repeats = 1 if args.quick else 5
    if args.repeats < 1 or args.warmup < 0 or args.timeout <= 0 or args.stop_timeout <= 0:
        p.error("--repeats must be >= 1, --warmup >= 0, the timeouts > 0")
    return args


# ---------------------------------------------------------------- measuring


def serve_command(stages: int, cache_dir: str | None) -> list[str]:
    return [sys.executable, str(SERVE), "--model", "default", "--stages", str(stages),
            *(["--cache-dir", cache_dir] if cache_dir else [])]


def floor_command() -> list[str]:
    return [sys.executable, "-c", FLOOR_CODE]


def time_floor(timeout: float) -> float:
    """Seconds from launching `python -c "import torch"` until it has exited."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(floor_command(), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _, err = proc.communicate(timeout=timeout)
        took = time.perf_counter() - t0
    finally:  # a timeout or Ctrl-C: not left running, nor unreaped
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    if proc.returncode != 0:
        raise RuntimeError(f"{shlex.join(floor_command())} failed ({proc.returncode}): {err[-2000:]}")
    return took


def _ready_line(proc: subprocess.Popen[str], deadline: float) -> str | None:
    """The line with `ready` from the deployment's stdout, or None at EOF (it exited) or at the deadline."""
    assert proc.stdout is not None
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        while (left := deadline - time.perf_counter()) > 0:
            if not sel.select(timeout=left):
                return None
            line = proc.stdout.readline()
            if not line:
                return None
            if re.search(r"\bready tcp://", line):
                return line.strip()
    return None


def _gone(pids: set[int], deadline: float) -> bool:
    """Waits (polling /proc, bounded by `deadline`) until none of `pids` is alive."""
    while any(alive(p) for p in pids):
        if time.perf_counter() > deadline:
            return False
        time.sleep(0.005)  # polling other processes' exit: there is no event to wait on for non-children
    return True


def _kill(proc: subprocess.Popen[str], tree: set[int]) -> None:
    for pid in [proc.pid, *tree]:
        if alive(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
    proc.wait()


def time_launch(stages: int, cache_dir: str | None, scratch: Path, timeout: float, stop_timeout: float
                ) -> dict[str, Any]:
    """One deployment: seconds from launch to its ready line, from SIGINT to its exit and to the exit of every
    process it started. Whatever happens (error, Ctrl-C), nothing it started is left running."""
    cmd = serve_command(stages, cache_dir)
    err_path = Path(tempfile.mkstemp(prefix=f"serve-{stages}-", suffix=".log", dir=scratch)[1])
    tree: set[int] = set()
    with err_path.open("w") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, cwd=ROOT)
    try:
        line = _ready_line(proc, t0 + timeout)
        ready_s = time.perf_counter() - t0
        if line is None:
            raise RuntimeError(f"{shlex.join(cmd)}: no ready line within {timeout:g} s (exit code {proc.poll()}):\n"
                               + err_path.read_text()[-3000:])
        tree = descendants(proc.pid)
        t1 = time.perf_counter()
        proc.send_signal(signal.SIGINT)
        try:
            code = proc.wait(stop_timeout)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"{shlex.join(cmd)}: still running {stop_timeout:g} s after SIGINT") from None
        exit_s = time.perf_counter() - t1
        if not _gone(tree, t1 + stop_timeout):
            raise RuntimeError(f"{shlex.join(cmd)}: processes left {stop_timeout:g} s after SIGINT: "
                               f"{sorted(p for p in tree if alive(p))}")
        all_gone_s = time.perf_counter() - t1
        if code != 0:
            raise RuntimeError(f"{shlex.join(cmd)}: exit code {code} after SIGINT:\n" + err_path.read_text()[-3000:])
        return {"ready_s": ready_s, "stop_s": exit_s, "stop_all_s": all_gone_s, "processes": 1 + len(tree),
                "ready_line": line}
    finally:
        if proc.poll() is None:  # an error or Ctrl-C on our side: stop it, then make sure
            tree |= descendants(proc.pid)
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                pass
        _kill(proc, tree)
        if proc.stdout is not None:
            proc.stdout.close()


def stats(samples: list[float]) -> dict[str, Any]:
    return {"median_s": statistics.median(samples), "min_s": min(samples), "max_s": max(samples),
            "samples_s": samples}


def default_model_present(cache_dir: str | None) -> tuple[Path, bool]:
    """Where dejavu-serve will find the default model, and whether it is written already."""
    from stages.default_model import VERSION  # torch-free

    cache = cache_dir or os.environ.get("DEJAVU_CACHE") or str(Path.home() / ".cache" / "dejavu")
    path = Path(cache) / f"default-llama-{VERSION}"
    return path, (path / "config.json").is_file()


def machine() -> dict[str, Any]:
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = None
    try:
        torch_version = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        torch_version = None
    return {"cpu_count": os.cpu_count(), "cpus_usable": usable, "platform": platform.platform(),
            "machine": platform.machine(), "processor": platform.processor(), "python": platform.python_version(),
            "python_executable": sys.executable, "torch": torch_version, "host": platform.node(),
            "load_average_at_start": list(os.getloadavg())}


def run(args: argparse.Namespace, command: str) -> dict[str, Any]:
    machine_at_start = machine()
    model_dir, present = default_model_present(args.cache_dir)
    warmups = max(args.warmup, 0 if present else 1)  # the first use writes the model: never a timed launch
    floor: list[float] = []
    launches: dict[int, list[dict[str, Any]]] = {n: [] for n in args.stages}
    warm: list[dict[str, Any]] = []
    total = warmups * len(args.stages) + args.repeats * (1 + len(args.stages))
    with tempfile.TemporaryDirectory(prefix="dejavu-startup-") as scratch, \
            progress(total, "startup", args.quiet, "launch") as bar:
        for _ in range(warmups):
            for n in args.stages:
                bar.set_postfix_str(f"warm-up, {n} stage(s)")
                warm.append({"stages": n, **time_launch(n, args.cache_dir, Path(scratch), args.timeout,
                                                        args.stop_timeout)})
                bar.update(1)
        for r in range(args.repeats):  # interleaved: a slow spell of the machine hits floor and launches alike
            bar.set_postfix_str(f"repeat {r + 1}, torch import")
            floor.append(time_floor(args.timeout))
            bar.update(1)
            for n in args.stages:
                bar.set_postfix_str(f"repeat {r + 1}, {n} stage(s)")
                launches[n].append(time_launch(n, args.cache_dir, Path(scratch), args.timeout, args.stop_timeout))
                bar.update(1)
    floor_stats = stats(floor)
    startup = []
    for n, runs in launches.items():
        ready = stats([x["ready_s"] for x in runs])
        startup.append({
            "stages": n, "command": shlex.join(serve_command(n, args.cache_dir)), "processes": runs[0]["processes"],
            "ready": ready, "stop": stats([x["stop_s"] for x in runs]),
            "stop_all_processes": stats([x["stop_all_s"] for x in runs]),
            "ready_over_floor": ready["median_s"] / floor_stats["median_s"],
            "meets_target": ready["median_s"] < TARGET_S, "ready_line": runs[0]["ready_line"],
        })
    mach = {**machine_at_start, "load_average_at_end": list(os.getloadavg())}
    return {
        "benchmark": "startup: dejavu-serve --model default, launch to ready line and SIGINT to exit, against the "
                     "torch-import floor",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": command,
        "machine": mach,  # load averages: other work on the machine meanwhile (these figures are wall times)
        "settings": {"stages": args.stages, "repeats": args.repeats, "warmup": warmups, "quick": args.quick,
                     "cache_dir": args.cache_dir, "timeout_s": args.timeout, "stop_timeout_s": args.stop_timeout},
        "model_dir": str(model_dir), "model_written_by_warmup": not present,
        "target_s": TARGET_S,
        "floor": {"command": shlex.join(floor_command()), **floor_stats},
        "startup": startup,
        "warmup": warm,
    }


# ---------------------------------------------------------------- output


def table(result: dict[str, Any]) -> str:
    f = result["floor"]
    m = result["machine"]
    lines = [f"startup bench, {m['cpu_count']} CPUs, python {m['python']}, torch {m['torch']} ({result['date']})",
             f"{'what':<28}{'median s':>10}{'min s':>8}{'max s':>8}{'x floor':>9}",
             f"{'torch import (floor)':<28}{f['median_s']:>10.2f}{f['min_s']:>8.2f}{f['max_s']:>8.2f}{1.0:>9.2f}"]
    for s in result["startup"]:
        r, st = s["ready"], s["stop"]
        lines.append(f"{'ready, ' + str(s['stages']) + ' stage(s)':<28}{r['median_s']:>10.2f}{r['min_s']:>8.2f}"
                     f"{r['max_s']:>8.2f}{s['ready_over_floor']:>9.2f}"
                     + ("" if s["meets_target"] else f"  (target {result['target_s']:g} s missed)"))
        lines.append(f"{'stop, ' + str(s['stages']) + ' stage(s)':<28}{st['median_s']:>10.2f}{st['min_s']:>8.2f}"
                     f"{st['max_s']:>8.2f}")
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    """Bars: median time to ready and to stop per stage count (min-max whiskers); lines: the torch-import floor
    (median, min-max band) and the target."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["startup"]
    x = list(range(len(rows)))
    fig, ax = plt.subplots(figsize=(6.5, 4.8))

    def bars(key: str, shift: float, label: str, color: str) -> None:
        med = [r[key]["median_s"] for r in rows]
        err = [[m - r[key]["min_s"] for m, r in zip(med, rows)], [r[key]["max_s"] - m for m, r in zip(med, rows)]]
        ax.bar([i + shift for i in x], med, width=0.36, yerr=err, capsize=4, label=label, color=color)

    bars("ready", -0.19, "launch to ready line", "tab:blue")
    bars("stop", 0.19, "SIGINT to exit", "tab:gray")
    for i, r in enumerate(rows):
        ax.annotate(f"{r['ready']['median_s']:.2f} s\n{r['ready_over_floor']:.2f}x floor",
                    (i - 0.19, r["ready"]["max_s"]), ha="center", va="bottom", fontsize=8)
    f = result["floor"]
    ax.axhspan(f["min_s"], f["max_s"], color="tab:orange", alpha=0.15)
    ax.axhline(f["median_s"], color="tab:orange", lw=1.5, label=f"floor: python -c \"import torch\" ({f['median_s']:.2f} s)")
    ax.axhline(result["target_s"], color="tab:red", lw=1, ls="--", label=f"target {result['target_s']:g} s")
    ax.set_xticks(x, [f"{r['stages']} stage(s)" for r in rows])
    ax.set_ylabel("seconds (median; whiskers min-max)")
    top = max([result["target_s"], f["max_s"], *(r["ready"]["max_s"] for r in rows)])
    ax.set_ylim(0, top * 1.2)
    m = result["machine"]
    load = [m.get(k, [None])[0] for k in ("load_average_at_start", "load_average_at_end")]
    ax.set_title(f"dejavu-serve --model default: start-up, {m['cpu_count']} CPUs, "
                 f"{result['settings']['repeats']} repeats, {result['date'][:10]}"
                 + (f"\nload average {load[0]:.1f} at the start, {load[1]:.1f} at the end" if None not in load else ""),
                 fontsize=9)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=2, frameon=False)
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = shlex.join(sys.orig_argv if argv is None else ["bin/dejavu-bench", "startup", *argv])
    try:
        result = run(args, command)
    except RuntimeError as e:
        print(f"dejavu-bench startup: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("dejavu-bench startup: interrupted", file=sys.stderr)
        return 130
    args.out.mkdir(parents=True, exist_ok=True)
    json_path, png_path = args.out / "startup_bench.json", args.out / "startup_bench.png"
    json_path.write_text(json.dumps(result, indent=1) + "\n")
    plot(result, png_path)
    echo(table(result))
    echo(f"[startup] wrote {json_path} and {png_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
