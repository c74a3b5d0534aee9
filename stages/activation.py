"""Activation plane: hidden states from stage i to stage i+1, behind one interface.

CPU (and CI): the StepRequest header and the tensor travel as one ZeroMQ multipart message, PUSH -> PULL,
zero-copy. CUDA: the header still goes over ZeroMQ, the tensor over NCCL (stages/nccl_activation.py, on the
library's links in streamer/nccl.py). Receivers are bound by the downstream stage; senders are rebuilt on every new epoch
(closing with linger 0 drops anything queued for a dead peer), so a restart never replays stale work.
"""

from __future__ import annotations

from typing import Any

import msgspec
import torch
import zmq
import zmq.asyncio

from bus.codec import Codec, Received
from bus.messages import Msg, StepRequest, TensorMeta
from bus.security import Keyring
from bus.sockets import bound_address, decode_frames, make_socket, recv_frames, send
from stages.frames import frame_tensor, tensor_frame


class ActivationIn:
    def __init__(self, ctx: zmq.asyncio.Context, codec: Codec, bind: str, keys: Keyring | None = None) -> None:
        self.codec = codec
        self.sock = make_socket(ctx, zmq.PULL, bind=bind, keys=keys)
        self.address = bound_address(self.sock)

    async def recv(self) -> tuple[Received, torch.Tensor | None]:
        """Next (message, hidden) — raises ProtocolError on a malformed message (caller drops it).

        A StepRequest whose `hidden` meta comes without a frame carries its tensor over NCCL: hidden is
        None and the receiver fetches it from its link."""
        frames = await recv_frames(self.sock)
        _, msg = decode_frames(self.codec, frames)
        hidden = None
        body = msg.body
        if isinstance(body, StepRequest) and body.hidden is not None and msg.frames:
            from bus.errors import ProtocolError

            if len(msg.frames) != 1:
                raise ProtocolError(f"step with hidden states needs 1 tensor frame, got {len(msg.frames)}")
            hidden = frame_tensor(body.hidden, msg.frames[0])
        return msg, hidden

    def close(self) -> None:
        self.sock.close(0)


class ActivationOut:
    def __init__(self, ctx: zmq.asyncio.Context, codec: Codec, address: str, keys: Keyring | None = None,
                 downstream: str = "") -> None:
        self.codec, self.address = codec, address
        self.sock = make_socket(ctx, zmq.PUSH, connect=address, keys=keys, server=downstream)

    async def send(self, step: StepRequest, hidden: torch.Tensor) -> None:
        meta, buf = tensor_frame(hidden)
        header = msgspec.structs.replace(step, hidden=meta)  # everything else as the step came (kv_to too)
        buffers: list[Any] = [buf]
        await send(self.sock, self.codec, header, buffers=buffers)

    async def send_header(self, step: StepRequest, meta: TensorMeta) -> None:
        """The header of a step whose tensor went over NCCL (no frame)."""
        await send(self.sock, self.codec, msgspec.structs.replace(step, hidden=meta))

    async def send_msg(self, body: Msg) -> None:
        await send(self.sock, self.codec, body)

    def close(self) -> None:
        self.sock.close(0)
