"""Typed errors of the streaming library and the streamer process.

Every failure a caller can see is one of these. Each carries a stable integer `code` (the `XFER_*` constants
of streamer/wire.py) so that a failure crossing a socket is rebuilt as the same type on the other side
(`error_for`). Messages say what went wrong and, where a setting governs it, which one to change.
"""

from __future__ import annotations

from streamer import wire


class StreamerError(Exception):
    """Base of every streaming error."""

    code = wire.XFER_INTERNAL


class BadRequestError(StreamerError, ValueError):
    """A request cannot be served as given: unknown pool, region outside a pool, incompatible layouts."""

    code = wire.XFER_BAD_REQUEST


class CapacityError(StreamerError):
    """A host pool (swap space, replica store, prompt receive slots, disk) would exceed its capacity."""

    code = wire.XFER_CAPACITY


class PeerDeadError(StreamerError):
    """The other end of a transfer (a peer streamer, or the stage that feeds a layered transfer) stopped
    answering within its deadline, or is known to be dead."""

    code = wire.XFER_PEER_DEAD


class TransferTimeoutError(StreamerError, TimeoutError):
    """A transfer ran past its overall deadline while its peer was still alive."""

    code = wire.XFER_TIMEOUT


class IntegrityError(StreamerError):
    """A checksum did not match: the bytes that arrived are not the bytes that were sent."""

    code = wire.XFER_CORRUPT


class DuplicateError(StreamerError):
    """A transfer id or a data chunk was seen before; it is refused so that nothing is delivered twice."""

    code = wire.XFER_DUPLICATE


class StaleError(StreamerError):
    """A message came from an older incarnation of its sender and was dropped."""

    code = wire.XFER_STALE


class CancelledError(StreamerError):
    """The transfer was cancelled by its requester (or because its pool was unregistered)."""

    code = wire.XFER_CANCELLED


class OwnerDownError(StreamerError):
    """The process that owns a pool (the stage) died; transfers that needed it were failed."""

    code = wire.XFER_OWNER_DOWN


class TransportUnavailableError(StreamerError):
    """The transport a transfer needs is not available here (no CUDA, no CuPy, no NCCL)."""

    code = wire.XFER_UNAVAILABLE


class StreamerDownError(StreamerError):
    """The streamer process itself is gone (its socket disconnected) or did not answer within a deadline."""

    code = wire.XFER_STREAMER_DOWN


_BY_CODE: dict[int, type[StreamerError]] = {
    cls.code: cls
    for cls in (
        StreamerError, BadRequestError, CapacityError, PeerDeadError, TransferTimeoutError, IntegrityError,
        DuplicateError, StaleError, CancelledError, OwnerDownError, TransportUnavailableError,
        StreamerDownError,
    )
}


def error_for(code: int, message: str) -> StreamerError:
    """The typed error for a code received over the wire (unknown codes become the base type)."""
    return _BY_CODE.get(code, StreamerError)(message)


def code_of(exc: BaseException) -> int:
    return exc.code if isinstance(exc, StreamerError) else wire.XFER_INTERNAL
