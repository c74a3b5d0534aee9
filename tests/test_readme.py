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
    for name in ("dejavu-generate", "dejavu-serve", "dejavu-client", "dejavu-demo", "dejavu-bench", "dejavu-keys",
                 "dejavu-plan"):
        path = ROOT / "bin" / name
        assert path.is_file() and os.access(path, os.X_OK), name


def test_the_python_snippet_runs_as_written(default_model) -> None:  # type: ignore[no-untyped-def]
    """README's client example, executed against a real deployment (only its address is replaced)."""
    import subprocess
    import sys

    from tests.conftest import start_deployment

    snippet = re.search(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert snippet is not None and "asyncio.run(main())" in snippet.group(1)
    dep = start_deployment(default_model, 1)
    try:
        code = snippet.group(1).replace("tcp://127.0.0.1:5555", dep.address)
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
        assert out.returncode == 0, out.stderr
        assert "'processes'" in out.stdout and "uptime_s" in out.stdout
    finally:
        assert dep.stop() == 0
