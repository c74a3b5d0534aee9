"""Typed errors of the control plane and the client API."""

from __future__ import annotations


class BusError(Exception):
    """Base of every control-plane error."""


class ProtocolError(BusError):
    """A frame could not be decoded: wrong version, unknown type, bad shape, oversized.

    `msg_id` is the offending message's id when its envelope could be read (0 otherwise), so the answer
    can name the request it refuses."""

    def __init__(self, message: str, msg_id: int = 0) -> None:
        super().__init__(message)
        self.msg_id = msg_id


class DeadlineError(BusError, TimeoutError):
    """A wait ran past its deadline. The message names what was awaited and which setting governs it."""


class InvalidRequestError(ValueError):
    """A request cannot be served as given: bad token ids, empty or too-long prompt, bad sampling parameters.
    Raised where requests are admitted (bus/requests.py) and by the stage runtime for a malformed step."""


class DejaVuError(Exception):
    """Base of the errors the async client raises."""


class BadRequestError(DejaVuError, ValueError):
    """The server refused the request as given (token ids, lengths, sampling parameters)."""


class ServerError(DejaVuError):
    """The deployment failed to serve the request (or is shutting down)."""


class AuthenticationError(DejaVuError):
    """The deployment refused this client's connection: a key it does not admit, no key where it requires one (or
    one where it serves plaintext), or a server key other than the deployment's. No request can get through."""


class RequestTimeoutError(DejaVuError, TimeoutError):
    """No answer within the client's deadline."""


class CancelledError(DejaVuError):
    """The request was cancelled."""
