"""Model families: `spec.py` maps Hugging Face architectures to families and parses their config.json
(torch-free); one module per family (llama.py, opt.py, bloom.py) builds its layers; shared pieces live in
stages/layers. Importing this package does not import torch: the supervisor reads specs through it."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from stages.models.spec import ModelSpec, read_spec

if TYPE_CHECKING:
    from stages.models.base import Family


def load_spec(model_dir: Path) -> tuple[Family, ModelSpec]:
    """The model's family (its torch modules) and spec."""
    from stages.models import bloom, llama, opt

    spec = read_spec(Path(model_dir))
    return {f.name: f for f in (llama.FAMILY, opt.FAMILY, bloom.FAMILY)}[spec.family], spec


__all__ = ["ModelSpec", "load_spec", "read_spec"]
