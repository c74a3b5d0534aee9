"""Tensors as raw ZeroMQ frames (zero-copy both ways) described by a `TensorMeta` in the message.

Used by the CPU activation plane (and any CPU tensor payload). bfloat16 has no numpy dtype, so every tensor
travels as its bytes and is re-viewed on arrival from the meta's dtype name and shape.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from bus.errors import ProtocolError
from bus.messages import TensorMeta

DTYPE_NAMES: dict[torch.dtype, str] = {
    torch.float32: "float32",
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
    torch.int64: "int64",
    torch.int32: "int32",
    torch.uint8: "uint8",
}
DTYPES = {v: k for k, v in DTYPE_NAMES.items()}


def tensor_frame(t: torch.Tensor) -> tuple[TensorMeta, memoryview]:
    """(meta, buffer) for a CPU tensor; the buffer aliases the tensor's memory (keep it alive until sent)."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    meta = TensorMeta(DTYPE_NAMES[t.dtype], list(t.shape))
    return meta, memoryview(t.view(torch.uint8).numpy()).cast("B") if t.numel() else memoryview(b"")


def frame_tensor(meta: TensorMeta, frame: Any) -> torch.Tensor:
    """A tensor viewing the frame's bytes (no copy). Raises ProtocolError when meta and bytes disagree."""
    dtype = DTYPES.get(meta.dtype)
    if dtype is None:
        raise ProtocolError(f"unknown tensor dtype {meta.dtype!r}")
    if any(d < 0 for d in meta.shape):
        raise ProtocolError(f"negative tensor shape {meta.shape}")
    buf = frame.buffer if hasattr(frame, "buffer") else frame
    numel = 1
    for d in meta.shape:
        numel *= d
    nbytes = numel * torch.empty(0, dtype=dtype).element_size()
    if len(buf) != nbytes:
        raise ProtocolError(f"tensor frame has {len(buf)} bytes; {meta.dtype}{meta.shape} needs {nbytes}")
    if nbytes == 0:
        return torch.empty(meta.shape, dtype=dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # read-only buffer: we never write to activations in place
        return torch.frombuffer(buf, dtype=torch.uint8).view(dtype).view(meta.shape)
