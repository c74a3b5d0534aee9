"""Loading a shard from a Hugging Face directory: sharded safetensors (with and without an index), a shard
reads only its own tensors, tied embeddings on both ends, every load failure as a typed error, and the
float16 / bfloat16 dtypes on CPU."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from stages.batch import SeqChunk
from stages.errors import LayerRangeError, ModelLoadError, UnsupportedArchitectureError
from stages.generate import GenerationRequest, LocalPipeline, generate
from stages.models.spec import split_layers
from stages.runtime import ShardConfig, ShardRuntime
from stages.weights import INDEX_FILE
from tests import tiny_models

LAYER_KEY = re.compile(r"\.layers\.(\d+)\.")
PROMPTS = [[5, 17, 42, 99, 3, 8, 150], [7, 11], [190, 1, 60, 61, 62, 63, 64, 65, 66, 67, 68]]


def _flat(prompts: list[list[int]]) -> list[int]:
    return [t for p in prompts for t in p]


def _prefill_logits(path: Path, stages: int, dtype: str = "float32") -> torch.Tensor:
    pipe = LocalPipeline(path, stages, num_slots=len(PROMPTS), max_seq_len=32, dtype=dtype)
    chunks = [SeqChunk(i, 0, len(p)) for i, p in enumerate(PROMPTS)]
    return pipe.step(chunks, _flat(PROMPTS), all_logits=True).float()


@pytest.fixture(scope="module")
def sharded(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny llama (untied) and qwen2 (tied) saved in ~20 KB files with an index; same weights as model_factory's."""
    out = {}
    for name in ("llama", "qwen2"):
        path = tiny_models.build(name, tmp_path_factory.mktemp(f"{name}-sharded"), max_shard_size="20KB")
        assert (path / INDEX_FILE).is_file()
        assert len(list(path.glob("*.safetensors"))) > 10
        out[name] = path
    return out


def _weight_map(path: Path) -> dict[str, str]:
    return json.loads((path / INDEX_FILE).read_text())["weight_map"]


def _expected_keys(keys: set[str], a: int, b: int, num_layers: int, tied: bool) -> set[str]:
    """What a shard for layers [a, b) must read: its layers, the embedding if first, norm + head if last."""
    out = {k for k in keys if (m := LAYER_KEY.search(k)) and a <= int(m.group(1)) < b}
    if a == 0:
        out.add("model.embed_tokens.weight")
    if b == num_layers:
        out |= {"model.norm.weight", "model.embed_tokens.weight" if tied else "lm_head.weight"}
    return out


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_sharded_index_loads_same_model(family: str, sharded, model_factory) -> None:  # type: ignore[no-untyped-def]
    """The many-file checkpoint gives exactly the logits of the single-file one (same seed, same weights)."""
    single = _prefill_logits(model_factory(family), 1)
    for stages in (1, 2):
        torch.testing.assert_close(_prefill_logits(sharded[family], stages), single, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "family,layers",
    [("llama", (0, 2)), ("llama", (1, 3)), ("llama", (2, 4)), ("llama", (0, 4)),
     ("qwen2", (0, 2)), ("qwen2", (2, 5)), ("qwen2", (0, 5))],
)
def test_shard_reads_only_its_tensors(family: str, layers: tuple[int, int], sharded) -> None:  # type: ignore[no-untyped-def]
    path = sharded[family]
    weight_map = _weight_map(path)
    num_layers = 4 if family == "llama" else 5
    tied = family == "qwen2"
    expected = _expected_keys(set(weight_map), *layers, num_layers, tied)
    rt = ShardRuntime(ShardConfig(path, layers, num_slots=1, max_seq_len=16))
    read = rt.checkpoint.read_keys
    assert set(read) == expected
    assert len(read) == len(set(read)), "a tensor was read twice (tied embedding on a one-shard model?)"
    opened = rt.checkpoint.opened_files
    assert set(opened) == {weight_map[k] for k in expected}
    assert len(opened) == len(set(opened)), "a file was opened twice"
    assert ("model.embed_tokens.weight" in read) == (layers[0] == 0 or (tied and layers[1] == num_layers))
    assert ("model.norm.weight" in read) == (layers[1] == num_layers)
    assert "lm_head.weight" not in read or not tied
    assert (rt.shard.embed is not None) == (layers[0] == 0)
    assert (rt.shard.head is not None) == (layers[1] == num_layers)


def test_tied_head_is_the_embedding_on_both_ends(sharded) -> None:  # type: ignore[no-untyped-def]
    """qwen2 saves no lm_head.weight; first and last shard both read the embedding and hold equal copies."""
    path = sharded["qwen2"]
    assert "lm_head.weight" not in _weight_map(path)
    pipe = LocalPipeline(path, 2, num_slots=1, max_seq_len=16)
    first, last = pipe.shards
    assert "model.embed_tokens.weight" in first.checkpoint.read_keys
    assert "model.embed_tokens.weight" in last.checkpoint.read_keys
    assert "model.embed_tokens.weight" not in [k for k in last.checkpoint.read_keys if ".layers." in k]
    assert torch.equal(first.shard.embed.weight, last.shard.head.lm_head.weight)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_shard_loads_without_other_layers_files(sharded, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Delete every file holding none of shard [2, 4)'s tensors: it still loads and computes the same;
    shard [0, 2) (which needs them) fails with a ModelLoadError naming a missing file."""
    src = sharded["llama"]
    weight_map = _weight_map(src)
    needed = _expected_keys(set(weight_map), 2, 4, 4, tied=False)
    keep = {weight_map[k] for k in needed}
    pruned = _copy(src, tmp_path / "pruned")
    deleted = [f for f in set(weight_map.values()) if f not in keep]
    assert len(deleted) >= 5  # the embedding and layers 0-1 live in files of their own
    for name in deleted:
        (pruned / name).unlink()

    hidden = torch.randn(9, 72, generator=torch.Generator().manual_seed(0))
    chunks = [SeqChunk(0, 0, 9)]
    outs = []
    for path in (src, pruned):
        rt = ShardRuntime(ShardConfig(path, (2, 4), num_slots=1, max_seq_len=16))
        outs.append(rt.forward(chunks, hidden, all_logits=True))
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=0)

    with pytest.raises(ModelLoadError, match="missing checkpoint file"):
        ShardRuntime(ShardConfig(pruned, (0, 2), num_slots=1, max_seq_len=16))


def test_loads_without_index(sharded, model_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Several *.safetensors and no index: names are taken from the file headers."""
    path = _copy(sharded["llama"], tmp_path / "noindex")
    weight_map = _weight_map(path)
    (path / INDEX_FILE).unlink()
    torch.testing.assert_close(_prefill_logits(path, 2), _prefill_logits(model_factory("llama"), 1), rtol=0, atol=1e-5)
    rt = ShardRuntime(ShardConfig(path, (1, 3), num_slots=1, max_seq_len=16))
    assert set(rt.checkpoint.read_keys) == _expected_keys(set(weight_map), 1, 3, 4, tied=False)


# --- failures -------------------------------------------------------------------------------------------------


def _load(path: Path, layers: tuple[int, int] | None = None, **kw: object) -> ShardRuntime:
    return ShardRuntime(ShardConfig(path, layers, num_slots=1, max_seq_len=16, **kw))  # type: ignore[arg-type]


def test_missing_config(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="no config.json"):
        _load(tmp_path)


def test_missing_weight_files(model_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "m"
    path.mkdir()
    shutil.copy(model_factory("llama") / "config.json", path)
    with pytest.raises(ModelLoadError, match=r"no \*\.safetensors files"):
        _load(path)


def test_pickle_only_checkpoint_is_refused(model_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "m"
    path.mkdir()
    shutil.copy(model_factory("llama") / "config.json", path)
    (path / "pytorch_model.bin").write_bytes(b"not a pickle either: must never be opened")
    with pytest.raises(ModelLoadError, match="pickle") as info:
        _load(path)
    assert "safetensors" in str(info.value)


def test_index_names_missing_file(sharded, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    path = _copy(sharded["llama"], tmp_path / "m")
    victim = _weight_map(path)["model.layers.1.mlp.down_proj.weight"]
    (path / victim).unlink()
    with pytest.raises(ModelLoadError, match=re.escape(victim)):
        _load(path, (0, 2))
    _load(path, (2, 4))  # the other half never looks at it


def test_missing_tensor(sharded, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A tensor absent from the index, absent from a file the index names, and absent with no index."""
    key = "model.layers.1.mlp.down_proj.weight"
    # 1. dropped from the index (and its file)
    path = _copy(sharded["llama"], tmp_path / "a")
    index = json.loads((path / INDEX_FILE).read_text())
    file = index["weight_map"].pop(key)
    (path / INDEX_FILE).write_text(json.dumps(index))
    tensors = load_file(path / file)
    del tensors[key]
    save_file(tensors or {"unrelated": torch.zeros(1)}, path / file)
    with pytest.raises(ModelLoadError, match=re.escape(key)):
        _load(path, (0, 2))
    _load(path, (2, 4))
    # 2. the index still names the file, the file lacks it
    path = _copy(sharded["llama"], tmp_path / "b")
    file = _weight_map(path)[key]
    tensors = load_file(path / file)
    del tensors[key]
    save_file(tensors or {"unrelated": torch.zeros(1)}, path / file)
    with pytest.raises(ModelLoadError, match=re.escape(key)):
        _load(path, (0, 2))
    # 3. no index at all
    (path / INDEX_FILE).unlink()
    with pytest.raises(ModelLoadError, match=re.escape(key)):
        _load(path, (0, 2))


def test_corrupt_files(sharded, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    path = _copy(sharded["llama"], tmp_path / "m")
    (path / INDEX_FILE).write_text("{not json")
    with pytest.raises(ModelLoadError, match="unreadable index"):
        _load(path)
    path = _copy(sharded["llama"], tmp_path / "n")
    victim = _weight_map(path)["model.layers.0.mlp.up_proj.weight"]
    (path / victim).write_bytes(b"\x00" * 100)
    with pytest.raises(ModelLoadError, match="not a readable safetensors file"):
        _load(path)
    (path / "config.json").write_text("[1, 2")
    with pytest.raises(ModelLoadError, match="unreadable config"):
        _load(path)


def test_unknown_architecture(model_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    path = _copy(model_factory("llama"), tmp_path / "m")
    config = json.loads((path / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedArchitectureError, match="GPT2LMHeadModel") as info:
        _load(path)
    assert "LlamaForCausalLM" in str(info.value)  # says what is supported
    assert isinstance(info.value, ModelLoadError)
    del config["architectures"]
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedArchitectureError, match="names no architecture"):
        _load(path)


@pytest.mark.parametrize("layers", [(2, 2), (3, 1), (-1, 2), (0, 5), (4, 5)])
def test_bad_layer_range(layers: tuple[int, int], model_factory) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(LayerRangeError, match=re.escape(f"[{layers[0]}, {layers[1]})")):
        _load(model_factory("llama"), layers)


def test_bad_stage_count(model_factory) -> None:  # type: ignore[no-untyped-def]
    for stages in (0, 5):
        with pytest.raises(LayerRangeError, match="cannot split 4 layers"):
            LocalPipeline(model_factory("llama"), stages, num_slots=1, max_seq_len=16)
    assert split_layers(5, 3) == [(0, 2), (2, 4), (4, 5)]


def test_a_heavy_lm_head_gives_the_last_stage_fewer_layers() -> None:
    """--layer-split balanced: the slowest stage's cost (its layers, and the head on the last) as low as whole
    layers allow; ties keep the even split. The heads in layers are real models' (weight bytes over a layer's)."""
    assert split_layers(12, 2, 5.45) == [(0, 9), (9, 12)]  # OPT-125M: 9 vs 3 + 5.45, not 6 vs 6 + 5.45
    assert split_layers(32, 2, 2.41) == [(0, 17), (17, 32)]  # Llama-3-8B: 17 vs 17.41 (even: 18.41)
    assert split_layers(28, 2, 2.34) == [(0, 15), (15, 28)]  # Qwen2.5-7B
    assert split_layers(80, 4, 1.23) == [(0, 21), (21, 41), (41, 61), (61, 80)]  # Llama-3-70B: 21 vs 21.23
    for layers, stages, head in ((64, 4, 0.45), (40, 2, 0.82), (48, 2, 0.58), (4, 2, 0.36), (5, 3, 0.4)):
        assert split_layers(layers, stages, head) == split_layers(layers, stages)  # OPT-66B/13B/30B, tiny: even
    assert split_layers(4, 4, 9.0) == [(0, 1), (1, 2), (2, 3), (3, 4)]  # one layer each: nothing to move
    assert split_layers(7, 1, 3.0) == [(0, 7)]
    assert split_layers(4, 2, 7.7) == [(0, 3), (3, 4)]  # the last keeps at least one layer
    with pytest.raises(ValueError, match="head_layers"):
        split_layers(4, 2, -1.0)


@pytest.mark.parametrize("dtype", ["float64", "int8", "fp16", ""])
def test_bad_dtype(dtype: str, model_factory) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ModelLoadError, match="float32, float16, bfloat16"):
        _load(model_factory("llama"), dtype=dtype)


def test_bad_device(model_factory) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ModelLoadError, match="bad device"):
        _load(model_factory("llama"), device="no-such-device")
    if not torch.cuda.is_available():
        with pytest.raises(ModelLoadError, match="no CUDA GPU"):
            _load(model_factory("llama"), device="cuda")


# --- dtypes ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "qwen2", "bloom"])
@pytest.mark.parametrize("dtype,tol", [("float16", 0.02), ("bfloat16", 0.1)])
def test_half_dtypes_run_on_cpu(family: str, dtype: str, tol: float, model_factory) -> None:  # type: ignore[no-untyped-def]
    """Weights, KV pool and compute in the dtype; logits close to float32 (relative to their scale)."""
    path = model_factory(family)
    ref = _prefill_logits(path, 1)
    pipe = LocalPipeline(path, 2, num_slots=len(PROMPTS), max_seq_len=32, dtype=dtype)
    want = getattr(torch, dtype)
    assert all(p.dtype == want for s in pipe.shards for p in s.shard.parameters())
    assert all(s.pool.data.dtype == want for s in pipe.shards)
    chunks = [SeqChunk(i, 0, len(p)) for i, p in enumerate(PROMPTS)]
    got = pipe.step(chunks, _flat(PROMPTS), all_logits=True)
    assert got.dtype == want
    got = got.float()
    assert torch.isfinite(got).all()
    scale = ref.abs().max()
    assert (got - ref).abs().max() <= tol * scale
    assert (got - ref).abs().mean() <= tol * scale / 5
    # the decode path runs too (a fresh pipeline: generate owns its slots from 0)
    pipe = LocalPipeline(path, 2, num_slots=2, max_seq_len=32, dtype=dtype)
    results = generate(pipe, [GenerationRequest(PROMPTS[0], 4), GenerationRequest(PROMPTS[1], 4)])
    assert all(len(r.token_ids) == 4 or r.finish_reason == "stop" for r in results)
