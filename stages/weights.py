"""Shard-aware checkpoint reading from safetensors files (never pickles).

`Checkpoint` maps tensor names to files, from `model.safetensors.index.json` when present, else from each
file's header (safetensors headers are read without touching the data). `load_shard` opens only the files
that hold the shard's tensors and reads only those tensors; it records what it opened and read, so tests
can check that a shard for layers [a, b) touched nothing else.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import safe_open

from stages.errors import ModelLoadError
from stages.models.base import DecoderShard, WeightRef
from stages.models.spec import INDEX_FILE, RANDOM_WEIGHTS_KEY, weight_files


class Checkpoint:
    def __init__(self, model_dir: Path) -> None:
        self.dir = Path(model_dir)
        self.opened_files: list[str] = []
        self.read_keys: list[str] = []
        index = self.dir / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, ValueError, KeyError) as e:
                raise ModelLoadError(f"{index}: unreadable index ({e})") from e
            self.file_of: dict[str, str] = dict(weight_map)
        else:
            self.file_of = {}
            for name in weight_files(self.dir):
                with self._open(name, "cpu") as f:
                    for key in f.keys():
                        self.file_of[key] = name
        self.keys = set(self.file_of)

    def _open(self, name: str, device: str):  # type: ignore[no-untyped-def]
        path = self.dir / name
        if not path.is_file():
            raise ModelLoadError(f"{path}: missing checkpoint file (named by {INDEX_FILE})")
        self.opened_files.append(name)
        try:
            return safe_open(str(path), framework="pt", device=device)
        except Exception as e:  # safetensors raises its own error types
            raise ModelLoadError(f"{path}: not a readable safetensors file ({e})") from e

    def resolve(self, candidates: Iterable[str]) -> str | None:
        """The checkpoint's name for a tensor: exact, or with/without a leading `model.`/`transformer.`."""
        for key in candidates:
            for variant in (key, key.split(".", 1)[1] if "." in key else key, f"model.{key}"):
                if variant in self.keys:
                    return variant
        return None

    def read(self, wanted: dict[str, list[WeightRef]], device: str) -> Iterable[tuple[str, torch.Tensor]]:
        by_file: dict[str, list[str]] = {}
        for key in wanted:
            by_file.setdefault(self.file_of[key], []).append(key)
        for name, keys in sorted(by_file.items()):
            with self._open(name, device) as f:
                present = set(f.keys())
                for key in keys:
                    # an index can name a file that lacks the tensor: say so instead of leaking SafetensorError
                    if key not in present:
                        raise ModelLoadError(f"{self.dir / name}: lacks tensor {key!r} (named by {INDEX_FILE})")
                    self.read_keys.append(key)
                    try:
                        tensor = f.get_tensor(key)
                    except Exception as e:  # truncated or corrupt data section
                        raise ModelLoadError(f"{self.dir / name}: cannot read tensor {key!r} ({e})") from e
                    yield key, tensor


def load_shard(shard: DecoderShard, ckpt: Checkpoint, device: torch.device) -> None:
    """Fill every parameter of `shard` from `ckpt`. Raises ModelLoadError naming any missing tensor."""
    params = dict(shard.named_parameters())
    wanted: dict[str, list[WeightRef]] = {}
    missing = []
    for ref in shard.weight_refs():
        key = ckpt.resolve(ref.keys)
        if key is None:
            missing.append(ref.keys[0])
            continue
        wanted.setdefault(key, []).append(ref)
    if missing:
        raise ModelLoadError(
            f"{ckpt.dir}: checkpoint lacks {len(missing)} tensor(s) this shard needs, e.g. {missing[:3]}"
        )
    filled: set[tuple[str, str | None]] = set()
    # safetensors reads straight onto cuda; bf16 -> other dtype conversion happens in copy_into
    read_device = str(device) if device.type == "cuda" else "cpu"
    for key, tensor in ckpt.read(wanted, read_device):
        for ref in wanted[key]:
            param = params[ref.param]
            param.weight_loader(param, tensor, ref.shard_id)  # type: ignore[attr-defined]
            filled.add((ref.param, ref.shard_id))
    unfilled = [name for name in params if not any(p == name for p, _ in filled)]
    if unfilled:
        raise ModelLoadError(f"no checkpoint tensor maps to parameter(s) {unfilled[:3]} (runtime bug)")


def random_weights_setting(raw_config: dict) -> dict | None:  # type: ignore[type-arg]
    """Benchmark models may carry `"dejavu_random_weights": {"seed": S, "std": 0.02}` in config.json and
    no weight files: each stage then draws its own parameters on its device instead of reading them (a
    132 GB model costs seconds instead of minutes of disk). Never used for real checkpoints."""
    value = raw_config.get(RANDOM_WEIGHTS_KEY)
    if value is None:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("seed", 0), int):
        raise ModelLoadError(f"config.json: {RANDOM_WEIGHTS_KEY} must be an object like {{\"seed\": 0, \"std\": 0.02}}")
    return value


def random_fill(shard: DecoderShard, seed: int, std: float) -> None:
    """Deterministic random parameters: matrices ~ N(0, std), norm weights 1, biases 0; each parameter's
    stream is seeded by (seed, its name with the global layer index), so any split gives the same model."""
    import zlib

    gen = None
    for name, p in shard.named_parameters():
        parts = name.split(".")
        if parts[0] == "blocks":
            parts[1] = str(shard.layers.start + int(parts[1]))
        key = zlib.crc32(".".join(parts).encode()) ^ (seed * 0x9E3779B1)
        with torch.no_grad():
            if p.dim() == 1:
                p.fill_(1.0 if name.endswith("weight") else 0.0)
                continue
            if gen is None or gen.device != p.device:
                gen = torch.Generator(device=p.device)
            gen.manual_seed(key & 0xFFFFFFFFFFFF)
            p.normal_(0.0, std, generator=gen)
