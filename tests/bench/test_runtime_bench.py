"""Keeps bench/runtime_bench.py (`dejavu-bench runtime`) working: its --quick mode runs the real code path (model directory written,
our runtime, Hugging Face, the floor) on CPU with a tiny shape and writes the JSON, the plot and a table."""

from __future__ import annotations

import json
import math
import tempfile
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench() -> Iterator[ModuleType]:
    pytest.importorskip("matplotlib")
    import bench.runtime_bench

    yield bench.runtime_bench


def _positive(x: object) -> bool:
    return isinstance(x, float) and math.isfinite(x) and x > 0


def test_quick_run_writes_json_plot_and_table(bench: ModuleType, tmp_path: Path, capsys, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    out, scratch = tmp_path / "out", tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    assert bench.main(["--quick", "--out", str(out), "--batches", "1,3"]) == 0
    assert list(scratch.iterdir()) == [], "--quick must clean up its scratch model"
    result = json.loads((out / "runtime_bench.json").read_text())
    png = (out / "runtime_bench.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000

    assert result["card"] and result["date"] and result["quick"] is True
    assert result["command"] == "bin/dejavu-bench runtime --quick --out " + str(out) + " --batches 1,3"
    assert result["versions"]["torch"] == torch.__version__ and result["versions"]["transformers"]
    assert _positive(result["hardware"]["copy_GBps"]) and _positive(result["hardware"]["matmul_TFLOPs"])
    assert result["weight_bytes"] > 0 and _positive(result["floor"]["decode_weights_ms"])
    assert result["model"]["rope_scaling"]["rope_type"] == "llama3"

    p = result["prefill"]
    for key in ("ours_ms", "hf_ms", "ours_over_hf", "compute_floor_ms", "ours_over_compute_floor"):
        assert _positive(p[key]), key
    assert len(p["ours"]["samples_ms"]) == result["settings"]["prefill_repeats"]
    assert [d["batch"] for d in result["decode"]] == [1, 3]
    for d in result["decode"]:
        for key in ("ours_ms", "hf_ms", "floor_ms", "ours_over_hf", "ours_over_floor", "floor_with_kv_ms"):
            assert _positive(d[key]), (d["batch"], key)
        assert d["ours_over_hf"] == pytest.approx(d["ours_ms"] / d["hf_ms"])
        assert d["ours_over_floor"] == pytest.approx(d["ours_ms"] / d["floor_ms"])
        assert d["floor_with_kv_ms"] > d["floor_ms"]

    table = capsys.readouterr().out
    assert "ours/HF" in table and "decode b=3 ctx=16" in table and "prefill 2x16" in table
    assert not Path(result["model_dir"]).exists(), "--quick must clean up its scratch model"


def test_model_directory_is_a_loadable_checkpoint_and_reused(bench: ModuleType, tmp_path: Path) -> None:
    from stages.generate import GenerationRequest, LocalPipeline, generate
    from stages.weights import INDEX_FILE

    path = tmp_path / "model"
    assert bench.ensure_model(path, bench.TINY, torch.bfloat16, "cpu", 0) is False
    index = json.loads((path / INDEX_FILE).read_text())
    assert set(index["weight_map"]) == {name for name, _ in bench.weight_shapes(bench.TINY)}
    stamp = (path / "config.json").stat().st_mtime_ns
    assert bench.ensure_model(path, bench.TINY, torch.bfloat16, "cpu", 0) is True
    assert (path / "config.json").stat().st_mtime_ns == stamp
    [res] = generate(LocalPipeline(path, 2, num_slots=1, max_seq_len=16, dtype="bfloat16"),
                     [GenerationRequest([3, 4, 5], 3)])
    assert len(res.token_ids) >= 1
    # a different shape is not mistaken for this one
    other = {**bench.TINY, "num_hidden_layers": 3}
    assert bench.ensure_model(path, other, torch.bfloat16, "cpu", 0) is False
    assert json.loads((path / "config.json").read_text())["num_hidden_layers"] == 3
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".model-")], "temporary dir left behind"


def test_full_settings_match_the_issue(bench: ModuleType) -> None:
    c, s = bench.LLAMA3_8B, bench.FULL
    assert (c["hidden_size"], c["num_hidden_layers"], c["num_attention_heads"], c["num_key_value_heads"],
            c["intermediate_size"], c["vocab_size"]) == (4096, 32, 32, 8, 14336, 128256)
    assert c["rope_scaling"]["rope_type"] == "llama3"
    assert (s.device, s.dtype, s.prompt_batch, s.prompt_len, s.context, s.batches) == (
        "cuda", "bfloat16", 8, 1000, 1000, (1, 8, 32, 64))
    params = sum(math.prod(shape) for _, shape in bench.weight_shapes(c))
    assert 8.0e9 < params < 8.1e9  # Llama-3-8B: 8.03 B parameters


@pytest.mark.gpu
def test_quick_run_on_cuda(bench: ModuleType, tmp_path: Path) -> None:
    """The CUDA code path (weights drawn on the GPU, CUDA-event timing) at the tiny shape: seconds."""
    assert bench.main(["--quick", "--device", "cuda", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "runtime_bench.json").read_text())
    assert result["card"] == torch.cuda.get_device_name()
    assert all(_positive(d["ours_ms"]) and _positive(d["hf_ms"]) for d in result["decode"])
