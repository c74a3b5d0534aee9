"""`DEJAVU_PROFILE_STEPS=FIRST,COUNT,DIR`: where a served step's time goes (issue 20's lean step). Runs on a stage
process's compute thread: torch.profiler over steps FIRST .. FIRST + COUNT - 1 (the thread's operators, every CUDA
kernel and copy), written to DIR/stage-<i>-profile.txt (operators by CPU and by device time) and
DIR/stage-<i>-trace.json (a Chrome trace; `python3 bench/profile_step.py --gaps FILE` lists the device's idle
gaps inside steps and what the host ran then). A diagnostic: off unless the variable is set.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

log = logging.getLogger(__name__)


class StepProfiler:
    """One stage's profile of a few served steps (see the module's docstring)."""

    def __init__(self, index: int, first: int, count: int, out: Path) -> None:
        self.index, self.first, self.count, self.out = index, first, count, out
        self.seen = 0
        self.prof: torch.profiler.profile | None = None
        self.done = False

    @classmethod
    def from_env(cls, index: int) -> StepProfiler | None:
        spec = os.environ.get("DEJAVU_PROFILE_STEPS", "")
        if not spec:
            return None
        try:
            first, count, out = spec.split(",", 2)
            return cls(index, int(first), int(count), Path(out))
        except ValueError:
            log.warning("[profile] DEJAVU_PROFILE_STEPS=%r: expected FIRST,COUNT,DIR; not profiling", spec)
            return None

    def before_step(self) -> None:
        if self.done or self.prof is not None or self.seen < self.first:
            return
        acts = [torch.profiler.ProfilerActivity.CPU]
        if torch.cuda.is_available():
            acts.append(torch.profiler.ProfilerActivity.CUDA)
        self.prof = torch.profiler.profile(activities=acts)
        self.prof.__enter__()

    def after_step(self) -> None:
        self.seen += 1
        if self.prof is None or self.seen < self.first + self.count:
            return
        prof, self.prof, self.done = self.prof, None, True
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        prof.__exit__(None, None, None)
        self.out.mkdir(parents=True, exist_ok=True)
        avg = prof.key_averages()
        device_key = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
        (self.out / f"stage-{self.index}-profile.txt").write_text(
            avg.table(sort_by="self_cpu_time_total", row_limit=30) + "\n" + avg.table(sort_by=device_key, row_limit=30))
        prof.export_chrome_trace(str(self.out / f"stage-{self.index}-trace.json"))
        log.info("[profile] stage %d: steps %d-%d profiled into %s", self.index, self.first,
                 self.first + self.count - 1, self.out)
