"""Typed errors of the model runtime. Every one says what was wrong and what to change."""

from __future__ import annotations


class StageError(Exception):
    """Base class of every error raised by the stage runtime."""


class ModelLoadError(StageError):
    """The model directory cannot be loaded: missing files or tensors, unreadable config, bad dtype/device."""


class UnsupportedArchitectureError(ModelLoadError):
    """config.json names an architecture this runtime does not implement."""


class LayerRangeError(StageError, ValueError):
    """A shard's layer range [a, b) is empty or outside the model's layers."""


class InvalidRequestError(StageError, ValueError):
    """A request cannot be served as given: bad token ids, empty or too-long prompt, bad sampling parameters."""


class CapacityError(StageError):
    """No KV slot is free, or a sequence would outgrow its slot."""
