"""`ModelSpec`: the parts of a Hugging Face config.json the runtime needs, normalised across families.

Reads the raw JSON (never imports a model class from transformers), so both the older `rope_scaling` /
`rope_theta` keys and the newer `rope_parameters` form are understood.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from stages.errors import ModelLoadError

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        if name not in DTYPES.values():
            raise ModelLoadError(f"dtype {name} is not supported (use one of {', '.join(DTYPES)})")
        return name
    try:
        return DTYPES[name]
    except KeyError:
        raise ModelLoadError(f"dtype {name!r} is not supported (use one of {', '.join(DTYPES)})") from None


@dataclass(frozen=True)
class ModelSpec:
    architecture: str
    family: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    max_positions: int  # 0 = no limit from the architecture (rotary, ALiBi)
    eos_token_ids: tuple[int, ...]
    bos_token_id: int | None
    tie_word_embeddings: bool
    sliding_window: int | None = None
    options: Mapping[str, Any] = field(default_factory=dict)  # family-specific knobs

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim


def read_config(model_dir: Path) -> dict[str, Any]:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise ModelLoadError(f"{model_dir}: no config.json (is this a Hugging Face model directory?)")
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{path}: unreadable config ({e})") from e
    if not isinstance(raw, dict):
        raise ModelLoadError(f"{path}: expected a JSON object")
    return raw


def eos_ids(raw: Mapping[str, Any], model_dir: Path | None = None) -> tuple[int, ...]:
    """EOS ids from config.json, widened by generation_config.json where present (as HF generate does)."""
    ids: list[int] = []
    sources: list[Any] = [raw.get("eos_token_id")]
    if model_dir is not None:
        gen = Path(model_dir) / "generation_config.json"
        if gen.is_file():
            try:
                sources.insert(0, json.loads(gen.read_text()).get("eos_token_id"))
            except (OSError, ValueError):
                pass
    for value in sources:
        for v in value if isinstance(value, list) else [value]:
            if isinstance(v, int) and v not in ids:
                ids.append(v)
        if ids:
            break
    return tuple(ids)


def rope_settings(raw: Mapping[str, Any]) -> tuple[float, dict[str, Any] | None, float]:
    """(theta, scaling dict or None, partial_rotary_factor) from either config style."""
    params = raw.get("rope_parameters")
    if isinstance(params, Mapping):
        theta = float(params.get("rope_theta", raw.get("rope_theta", 10000.0)))
        scaling = dict(params) if params.get("rope_type", "default") != "default" else None
        partial = float(params.get("partial_rotary_factor", raw.get("partial_rotary_factor", 1.0)))
        return theta, scaling, partial
    theta = float(raw.get("rope_theta", 10000.0))
    scaling = raw.get("rope_scaling")
    partial = float(raw.get("partial_rotary_factor", 1.0))
    return theta, (dict(scaling) if isinstance(scaling, Mapping) else None), partial


def required(raw: Mapping[str, Any], *keys: str) -> Any:
    for k in keys:
        if k in raw and raw[k] is not None:
            return raw[k]
    raise ModelLoadError(f"config.json lacks {' / '.join(keys)}")
