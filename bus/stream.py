"""One request's side of the client: argument checks, the wire request, the stream of its tokens, the result.

Runs in the user's process, on the caller's event loop, inside bus.client.AsyncClient (which owns the socket,
the receiver that dispatches each request's messages to its queue, and reconnection). A TokenStream reads its
request's queue, in order: chunks arrive already checked to continue the output exactly (AsyncClient._on_chunk),
and the stream checks it again, then turns RequestDone into a GenerateResult and errors into typed exceptions.
"""

from __future__ import annotations

import asyncio
import math
import operator
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import msgspec

from bus.errors import (
    BadRequestError,
    CancelledError,
    DejaVuError,
    InvalidRequestError,
    RequestTimeoutError,
    ServerError,
)
from bus.messages import (
    ERR_BAD_MESSAGE,
    ERR_BAD_REQUEST,
    ERR_CANCELLED,
    ERR_OVERLOADED,
    ERR_SERVER,
    ERR_TIMEOUT,
    GenerateRequest,
    Msg,
    RequestDone,
    RequestFailed,
    StatusReply,
    TokenChunk,
    TokenLogprob,
)
from bus.requests import MAX_LOGPROBS, check_logit_bias, check_penalties
from bus.stopping import CANCELLED

if TYPE_CHECKING:
    from bus.client import AsyncClient

_ERRORS: dict[int, tuple[str, type[DejaVuError]]] = {
    ERR_BAD_MESSAGE: ("ERR_BAD_MESSAGE", BadRequestError),
    ERR_BAD_REQUEST: ("ERR_BAD_REQUEST", BadRequestError),
    ERR_SERVER: ("ERR_SERVER", ServerError),
    ERR_OVERLOADED: ("ERR_OVERLOADED", ServerError),
    ERR_CANCELLED: ("ERR_CANCELLED", CancelledError),
    ERR_TIMEOUT: ("ERR_TIMEOUT", RequestTimeoutError),
}
_MAX_ID = 2**31  # token ids and seeds the client lets through; the server checks the vocabulary


def error_for(code: int, message: str, request_id: str = "") -> DejaVuError:
    """The typed exception for a server error code (unknown codes are server errors)."""
    name, cls = _ERRORS.get(code, (f"code {code}", ServerError))
    where = f"request {request_id}: " if request_id else ""
    return cls(f"{where}{message} [{name}]")


@dataclass(frozen=True)
class TokenEvent:
    """Tokens as they arrive: output positions index .. index+len(token_ids)-1 (token_ids may be empty when
    a chunk only completes text). `t` = seconds since the request was sent."""

    index: int
    token_ids: tuple[int, ...]
    text: str | None
    t: float
    # one per token id when the request asked (stream(logprobs=N)): the sampled token's log-probability under the
    # model's distribution (before temperature, top-k, top-p) and the N most likely tokens' (bus/messages.py)
    logprobs: tuple[TokenLogprob, ...] | None = None


@dataclass(frozen=True)
class GenerateResult:
    request_id: str
    token_ids: tuple[int, ...]
    text: str | None  # None when the model has no tokenizer
    finish_reason: str  # "stop" | "length" (a request that did not finish raises a typed error instead)
    num_prompt_tokens: int
    token_times: tuple[float, ...]  # arrival of each token, seconds since the request was sent
    latency_s: float  # request sent -> RequestDone received
    logprobs: tuple[TokenLogprob, ...] | None = None  # one per token id when the request asked (TokenEvent)

    @property
    def num_generated(self) -> int:
        return len(self.token_ids)

    @property
    def ttft_s(self) -> float | None:
        """Time to first token (None if none came)."""
        return self.token_times[0] if self.token_times else None

    @property
    def tpot_s(self) -> float | None:
        """Time per output token after the first (None with fewer than two tokens)."""
        n = len(self.token_times)
        return (self.token_times[-1] - self.token_times[0]) / (n - 1) if n >= 2 else None

    @property
    def normalized_latency_s(self) -> float | None:
        """End-to-end seconds per generated token: the paper's metric."""
        return self.latency_s / len(self.token_ids) if self.token_ids else None


def _ids(name: str, ids: Iterable[Any]) -> list[int]:
    if isinstance(ids, (str, bytes)):
        raise BadRequestError(f"{name} must be a sequence of token ids, not {type(ids).__name__}")
    out: list[int] = []
    for t in ids:
        try:
            v = operator.index(t)
        except TypeError:
            raise BadRequestError(f"{name} must hold integers, got {t!r}") from None
        if isinstance(t, bool) or not 0 <= v < _MAX_ID:
            raise BadRequestError(f"{name} must hold token ids in [0, 2**31), got {t!r}")
        out.append(v)
    return out


def build_request(
    prompt: str | None, prompt_token_ids: Iterable[int] | None, max_new_tokens: int, temperature: float,
    top_k: int, top_p: float, seed: int, stop_token_ids: Iterable[int], ignore_eos: bool = False,
    logprobs: int | None = None, logit_bias: Mapping[int, float] | None = None, presence_penalty: float = 0.0,
    frequency_penalty: float = 0.0,
) -> GenerateRequest:
    """Validate the obvious client-side (BadRequestError) and build the wire request; the server decides
    the rest (vocabulary, sequence length)."""
    if (prompt is None) == (prompt_token_ids is None):
        raise BadRequestError("give exactly one of prompt (text) and prompt_token_ids")
    ids: list[int] | None = None
    if prompt is not None:
        if not isinstance(prompt, str) or not prompt:
            raise BadRequestError(f"prompt must be a non-empty string, got {prompt!r:.40}")
    else:
        assert prompt_token_ids is not None
        ids = _ids("prompt_token_ids", prompt_token_ids)
        if not ids:
            raise BadRequestError("prompt_token_ids is empty: give at least one token")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise BadRequestError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature >= 0):
        raise BadRequestError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise BadRequestError(f"top_k must be an integer >= 0 (0 = off), got {top_k!r}")
    if not (isinstance(top_p, (int, float)) and 0.0 < top_p <= 1.0):
        raise BadRequestError(f"top_p must be in (0, 1], got {top_p!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise BadRequestError(f"seed must be an integer in [0, 2**63), got {seed!r}")
    if logprobs is not None and (isinstance(logprobs, bool) or not isinstance(logprobs, int)
                                 or not 0 <= logprobs <= MAX_LOGPROBS):
        raise BadRequestError(f"logprobs must be None or an integer in [0, {MAX_LOGPROBS}] (alternatives per token), "
                              f"got {logprobs!r}")
    try:
        check_penalties(presence_penalty, frequency_penalty)
    except InvalidRequestError as e:
        raise BadRequestError(str(e)) from None
    bias = None
    if logit_bias:
        try:
            bias = dict(check_logit_bias(dict(logit_bias)))
        except (InvalidRequestError, TypeError, ValueError) as e:
            raise BadRequestError(str(e) if isinstance(e, InvalidRequestError) else
                                  f"logit_bias must map token ids to numbers, got {logit_bias!r:.80}") from None
    return GenerateRequest(
        request_id=uuid.uuid4().hex, prompt=prompt, prompt_token_ids=ids, max_new_tokens=max_new_tokens,
        temperature=float(temperature), top_k=top_k, top_p=float(top_p), seed=seed,
        stop_token_ids=_ids("stop_token_ids", stop_token_ids), ignore_eos=bool(ignore_eos), logprobs=logprobs,
        logit_bias=bias, presence_penalty=float(presence_penalty), frequency_penalty=float(frequency_penalty),
    )


def status_dict(reply: StatusReply) -> dict[str, Any]:
    return {
        # fields that do not apply to a process (busy_s and steps: stages only) are left out
        "processes": [{k: msgspec.structs.asdict(v) if isinstance(v, msgspec.Struct) else v  # (a stage's swap)
                       for k, v in msgspec.structs.asdict(p).items() if v is not None} for p in reply.processes],
        "model": reply.model, "stages": reply.stages, "epoch": reply.epoch,
        "waiting": reply.waiting, "running": reply.running, "slots": reply.slots,
        "state": reply.state, "hosts": [msgspec.structs.asdict(h) for h in reply.hosts],
        "replicas": [msgspec.structs.asdict(r) for r in reply.replicas],
        "recoveries": [msgspec.structs.asdict(r) for r in reply.recoveries],
        "prompt_stages": reply.prompt_stages, "receive_waiting": reply.receive_waiting,
        "receive_waits": reply.receive_waits, "kv_streamed_bytes": reply.kv_streamed_bytes,
        "microbatch_size": reply.microbatch_size, "sizing": reply.sizing,
        "memory": [msgspec.structs.asdict(m) for m in reply.memory],
        "lookahead": reply.lookahead, "lookahead_dropped_rows": reply.lookahead_dropped_rows,
    }


@dataclass
class PendingRequest:
    queue: asyncio.Queue[tuple[float, Msg | DejaVuError]]  # (receive time, message or error)
    msg_id: int  # envelope id of the GenerateRequest (or of its latest resume), for ErrorReply.reply_to
    request: GenerateRequest
    received: list[int]  # output tokens received so far, in order (what a resume sends)
    resumes: int = 0


class TokenStream:
    """Async iterator over one request's TokenEvents; sends the request on the first `__anext__`.

    Closing it before the end — `aclose()`, leaving `async with`, or dropping it after `break` — sends
    CancelRequest. After a normal end, `.result` holds the GenerateResult.
    """

    def __init__(self, client: AsyncClient, request: GenerateRequest, timeout: float) -> None:
        self._client, self._request, self._timeout = client, request, timeout
        self.request_id = request.request_id
        self._pending: PendingRequest | None = None
        self._t0 = self._deadline = 0.0
        self._tokens: list[int] = []
        self._times: list[float] = []
        self._texts: list[str] | None = None  # becomes a list on the first chunk with text
        self._logprobs: list[TokenLogprob] | None = [] if request.logprobs is not None else None
        self._result: GenerateResult | None = None
        self._finished = False

    @property
    def result(self) -> GenerateResult:
        if self._result is None:
            raise RuntimeError(f"request {self.request_id} has not finished: iterate the stream to its end")
        return self._result

    def __aiter__(self) -> TokenStream:
        return self

    async def __aenter__(self) -> TokenStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        self._abandon()

    def __del__(self) -> None:
        if self._pending is not None and not self._finished:  # dropped after `break`: cancel on the server
            try:
                self._client._loop.call_soon_threadsafe(self._client._cancel, self.request_id)
            except (RuntimeError, AttributeError):
                pass  # the loop is gone: so is the socket

    def _abandon(self) -> None:
        if self._pending is not None and not self._finished:
            self._client._cancel(self.request_id)
        self._finished = True

    async def __anext__(self) -> TokenEvent:
        if self._finished:
            raise StopAsyncIteration
        if self._pending is None:
            self._t0 = time.perf_counter()
            self._deadline = self._t0 + self._timeout
            self._pending = self._client._submit(self._request)
        try:
            t, item = await self._next()
        except BaseException:  # timeout, or our task was cancelled: stop the request on the server too
            self._abandon()
            raise
        if isinstance(item, TokenChunk):
            return self._on_chunk(item, t)
        self._finished = True
        if isinstance(item, RequestDone):
            if item.finish_reason == CANCELLED:  # stopped (the client closing): the output is not finished
                raise CancelledError(f"request {self.request_id}: cancelled after {len(self._tokens)} token(s); "
                                     "its output is not finished")
            self._on_done(item, t)
            raise StopAsyncIteration
        if isinstance(item, RequestFailed):
            raise error_for(item.code, item.message, self.request_id)
        assert isinstance(item, DejaVuError)
        raise item

    async def _next(self) -> tuple[float, Msg | DejaVuError]:
        assert self._pending is not None
        queue = self._pending.queue
        remaining = self._deadline - time.perf_counter()
        try:
            if remaining <= 0:
                raise TimeoutError
            if not queue.empty():  # no waiting, so no timer: the common case of a busy stream
                return queue.get_nowait()
            async with asyncio.timeout(remaining):  # (wait_for would start a task per token)
                return await queue.get()
        except TimeoutError:
            raise RequestTimeoutError(
                f"request {self.request_id}: not finished within {self._timeout:.1f}s after sending "
                f"({len(self._tokens)} token(s) received) (setting: timeout= of generate()/stream(), "
                "default AsyncClient(timeout=...))"
            ) from None

    def _on_chunk(self, chunk: TokenChunk, t: float) -> TokenEvent:
        # AsyncClient._on_chunk queues only chunks that continue the output exactly (gaps and contradictions
        # end the request there, repeats after a resume are dropped there)
        assert chunk.index == len(self._tokens), (chunk.index, len(self._tokens))
        logprobs = None
        if self._logprobs is not None:
            logprobs = tuple(chunk.logprobs or ())
            if len(logprobs) != len(chunk.token_ids):
                self._abandon()
                raise ServerError(f"request {self.request_id}: asked for logprobs, but a chunk of "
                                  f"{len(chunk.token_ids)} token(s) carries {len(logprobs)} (a stage too old for them?)")
            self._logprobs.extend(logprobs)
        self._tokens.extend(chunk.token_ids)
        self._times.extend([t - self._t0] * len(chunk.token_ids))
        if chunk.text is not None:
            if self._texts is None:
                self._texts = []
            self._texts.append(chunk.text)
        return TokenEvent(chunk.index, tuple(chunk.token_ids), chunk.text, t - self._t0, logprobs)

    def _on_done(self, done: RequestDone, t: float) -> None:
        if done.num_generated != len(self._tokens):
            raise ServerError(
                f"request {self.request_id}: server reports {done.num_generated} generated token(s) but "
                f"{len(self._tokens)} arrived; refusing a truncated output"
            )
        self._result = GenerateResult(
            request_id=self.request_id, token_ids=tuple(self._tokens),
            text="".join(self._texts) if self._texts is not None else None,
            finish_reason=done.finish_reason, num_prompt_tokens=done.num_prompt_tokens,
            token_times=tuple(self._times), latency_s=t - self._t0,
            logprobs=tuple(self._logprobs) if self._logprobs is not None else None,
        )
