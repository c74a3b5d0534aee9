"""Typed errors of the HTTP front, in the OpenAI error shape, and the mapping from the client's errors.

Every refusal is an ApiError: its HTTP status, and the body {"error": {"message", "type", "param", "code"}} the
`openai` client turns into its typed exceptions (BadRequestError, RateLimitError, ...). `outcome` is the label
the request is counted under in /metrics (dejavu_requests_total)."""

from __future__ import annotations

from typing import Any

from bus.errors import (
    AuthenticationError,
    BadRequestError,
    CancelledError,
    DejaVuError,
    RequestTimeoutError,
    ServerError,
)

# dejavu_requests_total{outcome}: every request ends as exactly one of these
OUTCOMES = ("success", "bad_request", "too_long", "overloaded", "unavailable", "timeout", "cancelled", "error",
            "unauthorized")


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, outcome: str = "bad_request") -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.outcome = outcome
        self.headers: dict[str, str] = {"Retry-After": "1"} if status in (429, 503) else {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


def unauthorized(message: str) -> ApiError:
    e = ApiError(401, message, code="invalid_api_key", outcome="unauthorized")
    e.headers["WWW-Authenticate"] = "Bearer"
    return e


def too_long(message: str, param: str | None = "messages") -> ApiError:
    return ApiError(413, message, param=param, code="context_length_exceeded", outcome="too_long")


def overloaded(message: str) -> ApiError:
    return ApiError(429, message, "rate_limit_error", code="queue_full", outcome="overloaded")


def unavailable(message: str, code: str = "unavailable") -> ApiError:
    return ApiError(503, message, "server_error", code=code, outcome="unavailable")


def from_client(e: DejaVuError) -> ApiError:
    """The HTTP answer to an error of the deployment (bus/stream.py error_for names the server's code in the
    message: the controller refuses a full queue with ERR_OVERLOADED, a too-long prompt with ERR_BAD_REQUEST)."""
    text = str(e)
    if isinstance(e, BadRequestError):
        if "too long" in text:  # the front's own check comes first; this is the controller's, should they differ
            return too_long(text, None)
        return bad_request(text)
    if isinstance(e, RequestTimeoutError):
        return ApiError(504, text, "timeout", code="timeout", outcome="timeout")
    if isinstance(e, ServerError) and "[ERR_OVERLOADED]" in text:
        return overloaded(text)
    if isinstance(e, (ServerError, CancelledError, AuthenticationError)):
        return unavailable(text)
    return ApiError(500, text, "server_error", outcome="error")
