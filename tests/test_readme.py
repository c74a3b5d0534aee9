"""README keeps exactly two commands at the top; .ci/run runs the test one verbatim; bin scripts exist."""

from __future__ import annotations

import os
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    block = re.search(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert block is not None
    return [line for line in block.group(1).splitlines() if line.strip()]


def test_two_commands_and_ci_runs_the_test_one() -> None:
    demo, tests = readme_commands()
    assert "dejavu-demo" in demo and "pytest" in tests
    assert tests in (ROOT / ".ci" / "run").read_text().splitlines()


def test_bin_scripts_are_executable() -> None:
    for name in ("dejavu-generate", "dejavu-serve", "dejavu-client", "dejavu-demo", "dejavu-bench"):
        path = ROOT / "bin" / name
        assert path.is_file() and os.access(path, os.X_OK), name
