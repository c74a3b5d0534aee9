"""A standby's device warm-up (stages/device_warmup.py): one layer of the stage's sizes run where the stage would
compute - its first layer with the embedding, its last with the head - then freed; a failure leaves the process
usable and says why. On a GPU: the context and the graphs, and the memory given back."""

from __future__ import annotations

import pytest
import torch

from stages.config import StageProcConfig
from stages.device_warmup import warm
from stages.runtime import ShardConfig
from stages.stage import StageCore
from tests.tiny_models import CONFIGS


def _config(path, layers: tuple[int, int], device: str = "cpu", **kw) -> StageProcConfig:  # type: ignore[no-untyped-def]
    return StageProcConfig(0, 2, 0, str(path), layers, 8, 128, "tcp://127.0.0.1:1", "tcp://127.0.0.1:2",
                           device=device, microbatch_size=4, **kw)


@pytest.mark.parametrize("family", list(CONFIGS))
def test_each_end_of_the_stage_is_run_once(family: str, model_factory) -> None:  # type: ignore[no-untyped-def]
    path = model_factory(family)
    layers = StageCore(ShardConfig(path, None, 1, 16)).runtime.spec.num_layers
    first = warm(_config(path, (0, layers - 1)), 0.9)  # the first stage: its first layer, with the embedding
    assert first.layers == [(0, 1)] and not first.failed and not first.skipped
    last = warm(_config(path, (1, layers)), 0.9)  # the last stage: its first layer, and its last with the head
    assert last.layers == [(1, 2), (layers - 1, layers)] and not last.failed
    assert "layers [1, " in last.line() and "warmed in" in last.line()


def test_a_warm_up_that_fails_says_why_and_leaves_the_process_usable(model_factory, tmp_path) -> None:  # type: ignore[no-untyped-def]
    w = warm(_config(tmp_path / "no-model", (0, 1)), 0.9)
    assert w.failed and not w.layers and "cut short" in w.line()
    path = model_factory("llama")  # the process still computes
    assert warm(_config(path, (0, 1)), 0.9).layers == [(0, 1)]


@pytest.mark.gpu
def test_a_gpu_warm_up_captures_graphs_and_gives_the_memory_back(model_factory) -> None:  # type: ignore[no-untyped-def]
    path = model_factory("llama")
    layers = StageCore(ShardConfig(path, None, 1, 16)).runtime.spec.num_layers
    reserved = torch.cuda.memory_reserved()
    w = warm(_config(path, (0, layers), device="cuda:0"), 0.9)  # one stage: the embedding and the head
    assert w.layers == [(0, 1), (layers - 1, layers)] and not w.failed and not w.skipped
    assert w.graphs >= 4, "each layer's range graph and a partly filled microbatch's batch graph"
    # (cuBLAS keeps one workspace per handle and stream from the caching allocator, a few MiB, for the process)
    assert torch.cuda.memory_reserved() <= reserved + (64 << 20), "the layers' memory went back to the device"
    tight = warm(_config(path, (0, layers), device="cuda:0"), 1.0)  # the stages' budget is the whole device
    assert not tight.layers and not tight.context_s and "--gpu-memory-fraction 1.0" in tight.skipped
    total = torch.cuda.get_device_properties(0).total_memory
    near = warm(_config(path, (0, layers), device="cuda:0"), 1.0 - 3.0 * 2**30 / total)  # room for a context only
    assert near.context_s > 0 and not near.failed
