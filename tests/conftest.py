"""Shared fixtures: tiny random HF models written once per session; the GPU marker's skip."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import shutil  # noqa: E402
import tempfile  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from tests import tiny_models  # noqa: E402

torch.set_num_threads(min(4, torch.get_num_threads()))


def pytest_configure(config: pytest.Config) -> None:
    """Every temporary file of the run (the tests' own, and those of the processes they start) goes into one
    short-named folder that the run removes at its end: a test run leaves nothing in /tmp. Short, because
    ipc:// socket paths may not exceed ~107 bytes. (What the product itself must clean up - a deployment's run
    directory and shared memory - is not affected: it does not use tempfile's folder; tests check it.)"""
    run_tmp = tempfile.mkdtemp(prefix="dvt")
    config.stash[RUN_TMP] = run_tmp
    os.environ["TMPDIR"] = tempfile.tempdir = run_tmp


def pytest_unconfigure(config: pytest.Config) -> None:
    run_tmp = config.stash.get(RUN_TMP, None)
    if run_tmp:
        shutil.rmtree(run_tmp, ignore_errors=True)


RUN_TMP = pytest.StashKey[str]()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def model_factory(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """model_factory(name) -> Path of the tiny model `name`, built once per session."""
    cache: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in cache:
            cache[name] = tiny_models.build(name, tmp_path_factory.mktemp(name))
        return cache[name]

    return get


@pytest.fixture(scope="session")
def default_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from stages.default_model import default_model_dir

    return default_model_dir(tmp_path_factory.mktemp("cache"))


def start_deployment(model: Path | str, stages: int, *args: str):  # type: ignore[no-untyped-def]
    """A real deployment for a test: one torch thread per stage (CI has 2 cores for all of them)."""
    from recovery.launch import Deployment

    return Deployment.start(model, stages, "--stage-threads", "1", *args)
