"""The packages' layering, enforced: every import of a project module (at the top of a file or inside a
function) points down the stack

    bus  <-  streamer  <-  stages  <-  recovery  <-  bench

`bus` is the foundation (wire types, codec, sockets, errors, the supervised-child link, the controller and the
client, and `bus/front/`, the OpenAI-compatible HTTP front: a client of the controller like the others);
`streamer` is the KV streaming library and its process (it owns the pool layout and region types); `stages` holds models, runtime and the stage process, a client of the library; `recovery` spawns and watches
everything; `bench` measures any of them. Tests and bin/ may import anything. The controller and the
supervisor must not import torch: they start first, and torch's import costs seconds (issue: start-up time).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ["bus", "streamer", "stages", "recovery", "bench"]


def project_imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.lineno, node.module))
    return [(line, name) for line, name in out if name.split(".")[0] in LAYERS]


def test_every_import_points_down_the_stack() -> None:
    wrong = []
    for package in LAYERS:
        rank = LAYERS.index(package)
        for path in sorted((ROOT / package).rglob("*.py")):
            for line, name in project_imports(path):
                if LAYERS.index(name.split(".")[0]) > rank:
                    wrong.append(f"{path.relative_to(ROOT)}:{line} imports {name}")
    assert not wrong, "imports against the layering " + " <- ".join(LAYERS) + ":\n" + "\n".join(wrong)


def test_the_controller_the_supervisor_and_the_agents_start_without_torch() -> None:
    code = ("import sys, bus.controller_proc, recovery.proc, recovery.serve_cli, recovery.agent, recovery.agent_cli, "
            "bus.keys_cli, bus.front.proc; "
            "print(sorted(m for m in ('torch', 'transformers', 'numpy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout
