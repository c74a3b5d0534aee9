"""Typed errors of the model runtime. Every one says what was wrong and what to change."""

from __future__ import annotations

from bus.errors import InvalidRequestError  # the control side's: a request (or step) is wrong, not the stage

__all__ = ["CapacityError", "InvalidRequestError", "LayerRangeError", "ModelLoadError", "StageError", "StepVoid",
           "UnsupportedArchitectureError"]


class StageError(Exception):
    """Base class of every error raised by the stage runtime."""


class ModelLoadError(StageError):
    """The model directory cannot be loaded: missing files or tensors, unreadable config, bad dtype/device."""


class UnsupportedArchitectureError(ModelLoadError):
    """config.json names an architecture this runtime does not implement."""


class LayerRangeError(StageError, ValueError):
    """A shard's layer range [a, b) is empty or outside the model's layers."""


class CapacityError(StageError):
    """No KV slot is free, or a sequence would outgrow its slot."""


class StepVoid(StageError):
    """A lookahead step feeds back tokens of its microbatch's previous step, and that step did not sample here
    (it failed, or never came): the step does not run, and the controller sends its members again."""
