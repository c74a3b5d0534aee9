"""The one encoder and decoder of the control plane: `Envelope` + typed body, msgpack, no fallbacks.

decode() validates everything a peer sends — protocol version, message type (by tag), field types and
shapes — and raises ProtocolError on anything else; it never returns a half-valid object. Raw tensor frames
after the envelope are passed through untouched (zero-copy); `tensor_frame`/`frame_tensor` convert.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Union

import msgspec

from bus.errors import ProtocolError
from bus.messages import ALL_MESSAGES, PROTOCOL_VERSION, Envelope, Msg

MAX_CONTROL_BYTES = 16 * 1024 * 1024  # a control frame larger than this is refused before decoding


@dataclass(frozen=True)
class Received:
    env: Envelope
    body: Msg
    frames: Sequence[Any]  # raw frames after the envelope (zmq.Frame or bytes)


class Codec:
    def __init__(self, sender: str, incarnation: int = 0, types: Iterable[type[Msg]] = ALL_MESSAGES,
                 max_bytes: int = MAX_CONTROL_BYTES) -> None:
        self.sender, self.incarnation, self.max_bytes = sender, incarnation, max_bytes
        self._ids = itertools.count(1)
        self._enc = msgspec.msgpack.Encoder()
        self._env_dec = msgspec.msgpack.Decoder(Envelope)
        self._body_dec = msgspec.msgpack.Decoder(Union[tuple(types)])  # type: ignore[misc]  # noqa: UP007

    def encode(self, body: Msg, reply_to: int = 0) -> bytes:
        env = Envelope(PROTOCOL_VERSION, next(self._ids), self.sender, self.incarnation, reply_to,
                       msgspec.Raw(self._enc.encode(body)))
        return self._enc.encode(env)

    def decode(self, frame: bytes | memoryview, rest: Sequence[Any] = ()) -> Received:
        if len(frame) > self.max_bytes:
            raise ProtocolError(f"control frame of {len(frame)} bytes exceeds the limit of {self.max_bytes}")
        try:
            env = self._env_dec.decode(frame)
        except Exception as e:  # DecodeError, ValidationError, UnicodeDecodeError, ...: all mean "bad frame"
            raise ProtocolError(f"bad envelope: {type(e).__name__}: {e}") from None
        if env.version != PROTOCOL_VERSION:
            raise ProtocolError(f"protocol version {env.version}, this process speaks {PROTOCOL_VERSION}",
                                env.msg_id)
        try:
            body = self._body_dec.decode(env.body)
        except Exception as e:
            raise ProtocolError(f"bad message body from {env.sender!r}: {type(e).__name__}: {e}",
                                env.msg_id) from None
        return Received(env, body, rest)
