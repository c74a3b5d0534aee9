"""Every `dejavu-bench` sub-command writes where --out says, by default into one folder of the current
directory (never inside the package), says so in its --help, and has --quiet for its progress bars."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

from bench.cli import COMMANDS
from bus.loadgen import RESULTS_DIR


def test_one_default_folder_in_the_current_directory() -> None:
    assert RESULTS_DIR == Path("dejavu-bench-results") and not RESULTS_DIR.is_absolute()


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_out_default_help_and_quiet(name: str) -> None:
    module = importlib.import_module(COMMANDS[name])
    p = module.parser()
    help_text = " ".join(p.format_help().split())
    assert f"./{RESULTS_DIR}/" in help_text and "current directory" in help_text, help_text
    assert "--quiet" in help_text
    args = p.parse_args(["--address", "tcp://127.0.0.1:1"] if name == "serve" else [])
    if name == "serve":  # --out is the JSON file's path there; the default goes into the same folder
        assert args.out is None and module.parse_args(["--address", "tcp://127.0.0.1:1"]).out.parent == RESULTS_DIR
    else:
        assert args.out == RESULTS_DIR
        assert p.parse_args(["--out", "elsewhere"]).out == Path("elsewhere")
