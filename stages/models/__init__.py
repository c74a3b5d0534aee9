"""Model families by Hugging Face architecture name. One file per family; shared pieces in stages/layers."""

from __future__ import annotations

from pathlib import Path

from stages.errors import UnsupportedArchitectureError
from stages.models import bloom, llama, opt
from stages.models.base import DecoderShard, Family, WeightRef
from stages.models.spec import ModelSpec, read_config

FAMILIES: tuple[Family, ...] = (llama.FAMILY, opt.FAMILY, bloom.FAMILY)
BY_ARCHITECTURE: dict[str, Family] = {a: f for f in FAMILIES for a in f.architectures}


def load_spec(model_dir: Path) -> tuple[Family, ModelSpec]:
    raw = read_config(model_dir)
    archs = raw.get("architectures") or []
    if not archs:
        raise UnsupportedArchitectureError(f"{model_dir}/config.json names no architecture")
    family = BY_ARCHITECTURE.get(archs[0])
    if family is None:
        raise UnsupportedArchitectureError(
            f"architecture {archs[0]!r} is not supported (supported: {', '.join(sorted(BY_ARCHITECTURE))})"
        )
    return family, family.parse(raw, Path(model_dir))


__all__ = ["BY_ARCHITECTURE", "FAMILIES", "DecoderShard", "Family", "ModelSpec", "WeightRef", "load_spec"]
