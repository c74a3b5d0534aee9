"""The HTTP endpoints (aiohttp): /v1/completions, /v1/chat/completions, /v1/models, /metrics, /health, /ready.

Runs in the front process (bus/front/proc.py owns the loop, the server, the client and the drain). One generation
request: admission (bus/front/admission.py), its body parsed (bus/front/protocol.py), its prompt turned into token ids on
the text thread (bus/front/chat.py), its length checked against the deployment's maximum sequence length, then one
stream of the ZeroMQ client (bus/client.py) whose text goes through the stop strings (bus/front/stops.py) to the HTTP
client - whole, or as server-sent events. Errors before the first token are an HTTP status in the OpenAI error
shape; after it, an SSE `{"error": ...}` event (what the `openai` client raises from).

Each request's stream is read at the pace its HTTP client takes it: a slow client only fills its own queue in
this process, never slows the controller. A client that disconnects cancels its request (aiohttp cancels the
handler; leaving the stream cancels the request on the controller).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import msgspec
from aiohttp import web

from bus.client import AsyncClient, TokenEvent, TokenStream
from bus.errors import DejaVuError
from bus.front import chat
from bus.front.admission import Admission
from bus.front.auth import Keys, middleware
from bus.front.config import FrontConfig
from bus.front.errors import ApiError, bad_request, from_client, too_long, unauthorized, unavailable
from bus.front.logprobs import LogprobsWriter, TokenTexts
from bus.front.metrics import CONTENT_TYPE, Metrics
from bus.front.protocol import (
    MAX_SEED,
    Answer,
    Params,
    models_list,
    parse_chat,
    parse_completion,
    refuse_model,
    usage,
)
from bus.front.stops import StopMatcher

log = logging.getLogger(__name__)
ENDPOINT_OF = {"/v1/completions": "completions", "/v1/chat/completions": "chat"}  # what /metrics counts
SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
DONE = b"data: [DONE]\n\n"
COMPLETION_DEFAULT_MAX_TOKENS = 16  # the OpenAI API's default for /v1/completions
encode = msgspec.json.Encoder().encode


def error_response(e: ApiError) -> web.Response:
    return web.Response(status=e.status, body=encode(e.body()), content_type="application/json", headers=e.headers)


def json_response(obj: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, body=encode(obj), content_type="application/json")


def sse(obj: Any) -> bytes:
    return b"data: " + encode(obj) + b"\n\n"


@web.middleware
async def openai_errors(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                        ) -> web.StreamResponse:
    """aiohttp's own refusals (no such route, wrong method, body too large) in the OpenAI error shape too."""
    try:
        return await handler(request)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        kind = "invalid_request_error" if e.status < 500 else "server_error"
        return error_response(ApiError(e.status, f"{request.method} {request.path}: {e.reason}", kind))


@dataclass
class Run:
    """One generation's progress, for its answer and its metrics."""

    endpoint: str
    answer: Answer
    params: Params
    prompt_tokens: int
    t0: float
    matcher: StopMatcher
    stream: TokenStream  # its request of the deployment (sent when first read)
    tokens: int = 0
    first: float | None = None
    last: float = 0.0
    finish: str | None = None
    parts: list[str] = field(default_factory=list)
    logprobs: LogprobsWriter | None = None  # the request asked for logprobs
    index: int = 0  # its choice (n > 1: one run, and one request of the deployment, per choice)

    def take(self, ev: TokenEvent) -> str:
        """The text this event adds to the answer (held back where it may begin a stop string). Its tokens'
        logprobs wait in `logprobs` for the text they go out with (a token's text may be held back)."""
        if self.logprobs is not None:
            self.logprobs.add(ev.token_ids, ev.logprobs, ev.text)
        if ev.token_ids:
            now = time.perf_counter()
            if self.first is None:
                self.first = now
            self.last = now
            self.tokens += len(ev.token_ids)
        text, stopped = self.matcher.push(ev.text or "")
        if stopped:
            self.finish = "stop"
        return text


@dataclass
class Piece:
    """What one choice adds to the answer: its text (empty: an event whose text is held back), the logprobs
    that go with it (None: none asked, or not yet), and whether it is the choice's last (its run's finish set)."""

    index: int
    text: str
    logprobs: dict[str, Any] | None = None
    last: bool = False


class Front:
    def __init__(self, cfg: FrontConfig, client: AsyncClient, tokenizer: Any, admission: Admission,
                 metrics: Metrics, text_pool: ThreadPoolExecutor, max_prompt_bytes: int, keys: Keys) -> None:
        self.cfg, self.client, self.tokenizer, self.keys = cfg, client, tokenizer, keys
        self.admission, self.metrics, self.text_pool = admission, metrics, text_pool
        self.max_prompt_bytes = max_prompt_bytes
        self.model = cfg.served_name
        self.token_texts = TokenTexts(tokenizer)
        self.created = int(time.time())
        self.handlers: set[asyncio.Task[Any]] = set()  # generation requests in flight (the drain may cut them)
        self.aborting = ""  # why the requests still in flight are being cut ("" = they are not)
        metrics.in_flight.set_function(lambda: admission.in_flight)

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.cfg.max_body_bytes,
                              middlewares=[openai_errors, middleware(self.keys, self._unauthorized)])
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/metrics", self.metrics_page)
        app.router.add_get("/health", self.health)
        app.router.add_get("/ready", self.ready)
        return app

    def abort(self, why: str) -> None:
        """Cut every request still in flight (the drain's deadline passed): each ends with a 503 or an error
        event saying why, and its request is cancelled on the controller."""
        self.aborting = why
        for task in list(self.handlers):
            task.cancel()

    def _unauthorized(self, request: web.Request) -> web.Response:
        e = unauthorized("no API key given (Authorization: Bearer KEY)" if "Authorization" not in request.headers
                         else "the API key given is not accepted here")
        endpoint = ENDPOINT_OF.get(request.path)
        if endpoint is not None:
            self.metrics.outcome(endpoint, e.outcome)
        return error_response(e)

    # ------------------------------------------------------------------ small endpoints

    async def models(self, request: web.Request) -> web.Response:
        return json_response(models_list(self.model, self.created))

    async def metrics_page(self, request: web.Request) -> web.Response:
        return web.Response(body=self.metrics.render(), headers={"Content-Type": CONTENT_TYPE})

    async def health(self, request: web.Request) -> web.Response:
        """Liveness: this process serves HTTP (200 while draining too); what it knows of the deployment."""
        a = self.admission
        return json_response({"status": "draining" if a.draining else "ok", "deployment": a.state,
                              "controller": self.cfg.controller, "controller_reachable": a.reachable,
                              "in_flight": a.in_flight, "limit": a.limit})

    async def ready(self, request: web.Request) -> web.Response:
        """Readiness: 200 when new requests would be served; 503 (with the reason) when they would be refused."""
        a = self.admission
        if a.ready:
            return json_response({"status": "ready"})
        why = (f"draining: {a.draining}" if a.draining else f"deployment {a.state}" if a.reachable
               else "the controller does not answer")
        return json_response({"status": "unavailable", "reason": why}, 503)

    # ------------------------------------------------------------------ generation

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, "completions")

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, "chat")

    async def _generate(self, request: web.Request, endpoint: str) -> web.StreamResponse:
        t0 = time.perf_counter()
        task = asyncio.current_task()
        assert task is not None
        self.handlers.add(task)
        try:
            refusal = self.admission.refusal()
            if refusal is not None:
                raise refusal
            with contextlib.ExitStack() as held:
                held.enter_context(self.admission.hold())
                runs = await self._start(request, endpoint, t0, held)
                if runs[0].params.stream:
                    return await self._sse(request, runs)
                return await self._whole(runs)
        except ApiError as e:
            self.metrics.outcome(endpoint, e.outcome)
            return error_response(e)
        except asyncio.CancelledError:
            self.metrics.outcome(endpoint, "cancelled")  # its client went away (or the drain cut it: below)
            raise
        finally:
            self.handlers.discard(task)

    async def _start(self, request: web.Request, endpoint: str, t0: float, held: contextlib.ExitStack) -> list[Run]:
        """The request's runs, one per choice, each with its stream of the deployment open; `held` takes the
        admission places of choices beyond the first (or the request is refused: 429)."""
        body = await self._body(request)
        messages: list[dict[str, str]] | None = None
        if endpoint == "chat":
            messages, p = parse_chat(body)
        else:
            p = parse_completion(body)
        if p.model != self.model:
            raise refuse_model(p.model, self.model)
        ids = await self._prompt_ids(p, messages)
        max_new = self._max_new_tokens(len(ids), p, endpoint == "chat")
        if p.n > 1:
            refusal = self.admission.refusal(wanted=p.n, held=1)
            if refusal is not None:
                raise refusal
            held.enter_context(self.admission.hold(p.n - 1))
        runs: list[Run] = []
        try:
            for i in range(p.n):
                stream = self.client.stream(
                    prompt_token_ids=ids, max_new_tokens=max_new, temperature=p.temperature, top_k=p.top_k,
                    top_p=p.top_p, seed=random.getrandbits(63) if p.seed is None else (p.seed + i) % MAX_SEED,
                    stop_token_ids=p.stop_token_ids, ignore_eos=p.ignore_eos, timeout=self.cfg.request_timeout,
                    logprobs=p.logprobs, logit_bias=dict(p.logit_bias), presence_penalty=p.presence_penalty,
                    frequency_penalty=p.frequency_penalty)
                answer = runs[0].answer if runs else Answer.new(stream.request_id, self.model, endpoint == "chat")
                writer = None if p.logprobs is None else LogprobsWriter(self.token_texts, endpoint == "chat")
                runs.append(Run(endpoint, answer, p, len(ids), t0, StopMatcher(p.stop), logprobs=writer, index=i,
                                stream=stream))
        except DejaVuError as e:  # the client refuses at once: arguments, or a deployment that stopped (a stream
            raise from_client(e) from None  # sends its request when first read: the others sent nothing)
        self.metrics.prompt_tokens.inc(len(ids) * p.n)
        return runs

    async def _body(self, request: web.Request) -> Any:
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise ApiError(413, f"the request body is larger than {self.cfg.max_body_bytes} bytes",
                           outcome="too_long") from None
        try:
            return json.loads(raw)
        except ValueError as e:
            raise bad_request(f"the request body is not JSON: {e}") from None

    async def _prompt_ids(self, p: Params, messages: list[dict[str, str]] | None) -> list[int]:
        loop = asyncio.get_running_loop()
        if messages is not None:
            return await loop.run_in_executor(self.text_pool, chat.render, self.tokenizer, messages, self.model)
        if isinstance(p.prompt, list):
            return p.prompt
        assert isinstance(p.prompt, str)
        size = len(p.prompt.encode("utf-8", "surrogatepass"))
        if size > self.max_prompt_bytes:  # more tokens than max_seq_len for sure: no need to tokenize it
            raise too_long(f"a prompt of {size} bytes is longer than the maximum sequence length of "
                           f"{self.cfg.max_seq_len} tokens", "prompt")
        return await loop.run_in_executor(self.text_pool, chat.encode, self.tokenizer, p.prompt)

    def _max_new_tokens(self, n_prompt: int, p: Params, is_chat: bool) -> int:
        limit = self.cfg.max_seq_len
        if n_prompt >= limit:
            raise too_long(f"the prompt is {n_prompt} tokens long: the maximum sequence length is {limit} tokens "
                           "(prompt and at least one generated token)", "messages" if is_chat else "prompt")
        room = limit - n_prompt
        if p.max_tokens is None:
            return room if is_chat else min(COMPLETION_DEFAULT_MAX_TOKENS, room)
        if p.max_tokens > room:
            raise bad_request(f"the maximum sequence length is {limit} tokens: a prompt of {n_prompt} tokens "
                              f"leaves room for {room} new tokens, but max_tokens is {p.max_tokens}", "max_tokens",
                              "context_length_exceeded")
        return p.max_tokens

    def _served(self, runs: list[Run]) -> None:
        now = time.perf_counter()
        firsts = [r.first for r in runs if r.first is not None]
        ttft = min(firsts) - runs[0].t0 if firsts else None
        gaps = [(r.last - r.first) / (r.tokens - 1) for r in runs if r.first is not None and r.tokens > 1]
        tpot = sum(gaps) / len(gaps) if gaps else None
        self.metrics.served(runs[0].endpoint, ttft, tpot, now - runs[0].t0, sum(r.tokens for r in runs))
        self.metrics.outcome(runs[0].endpoint, "success")

    def _cut(self) -> ApiError:
        """Our task was cancelled: by the drain's deadline (an answer saying so), else by its client leaving."""
        task = asyncio.current_task()
        if not self.aborting or task is None:
            raise asyncio.CancelledError
        task.uncancel()
        return unavailable(f"the server stopped before this request finished ({self.aborting})", "draining")

    @staticmethod
    async def _pieces(run: Run, as_they_come: bool) -> AsyncIterator[Piece]:
        """One choice's answer: a piece per token event (its text as the stop strings let it out), then its
        last piece (the text held back, when no stop string cut it, and its finish reason set on the run). With
        as_they_come the logprobs go with the text they belong to, else all with the last piece. Leaving early
        (a stop string, an error, a cancel) cancels the rest of the request on the controller."""
        stream = run.stream
        async with stream:
            async for ev in stream:
                text = run.take(ev)
                logprobs = run.logprobs.take() if as_they_come and text and run.logprobs is not None else None
                yield Piece(run.index, text, logprobs)
                if run.finish is not None:
                    break  # a stop string
        tail = "" if run.finish is not None else run.matcher.flush()
        run.finish = run.finish or stream.result.finish_reason
        yield Piece(run.index, tail, run.logprobs.take() if run.logprobs is not None else None, last=True)

    @classmethod
    async def _merged(cls, runs: list[Run], as_they_come: bool) -> AsyncIterator[Piece]:
        """Every choice's pieces, in the order they come (one choice: its own, read here); DejaVuError raises."""
        if len(runs) == 1:
            async with contextlib.aclosing(cls._pieces(runs[0], as_they_come)) as pieces:
                async for piece in pieces:
                    yield piece
            return
        queue: asyncio.Queue[Piece | BaseException] = asyncio.Queue()

        async def pump(run: Run) -> None:
            try:
                async with contextlib.aclosing(cls._pieces(run, as_they_come)) as pieces:
                    async for piece in pieces:
                        queue.put_nowait(piece)
            except Exception as e:  # DejaVuError, or a fault here: the reader must not wait for this choice forever
                queue.put_nowait(e)

        tasks = [asyncio.ensure_future(pump(run)) for run in runs]
        try:
            left = len(runs)
            while left:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                left -= item.last
                yield item
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)  # each leaves its stream: cancelled there

    @staticmethod
    def _usage(runs: list[Run]) -> dict[str, int]:
        return usage(runs[0].prompt_tokens, sum(r.tokens for r in runs))  # the prompt once, as the OpenAI API

    async def _whole(self, runs: list[Run]) -> web.Response:
        logprobs: dict[int, dict[str, Any] | None] = {}
        try:
            async with contextlib.aclosing(self._merged(runs, as_they_come=False)) as pieces:
                async for piece in pieces:
                    runs[piece.index].parts.append(piece.text)
                    if piece.last:
                        logprobs[piece.index] = piece.logprobs
        except DejaVuError as e:
            raise from_client(e) from None
        except asyncio.CancelledError:
            raise self._cut() from None
        self._served(runs)
        answer = runs[0].answer
        return json_response(answer.whole([("".join(r.parts), r.finish or "stop", logprobs.get(r.index))
                                           for r in runs], self._usage(runs)))

    async def _sse(self, request: web.Request, runs: list[Run]) -> web.StreamResponse:
        answer, error = runs[0].answer, None
        async with contextlib.aclosing(self._merged(runs, as_they_come=True)) as pieces:
            try:  # what fails before the first token is an HTTP status
                piece: Piece | None = await anext(pieces, None)
            except DejaVuError as e:
                raise from_client(e) from None
            except asyncio.CancelledError:
                raise self._cut() from None
            resp = web.StreamResponse(headers=SSE_HEADERS)
            await resp.prepare(request)
            parts = [answer.token_event_parts(encode, i) for i in range(len(runs))]
            try:
                if answer.chat:
                    for i in range(len(runs)):
                        await resp.write(sse(answer.chunk("", role=True, index=i)))
                while piece is not None:
                    i = piece.index
                    if piece.last:  # tokens whose text was held back (or cut by a stop string), then the finish
                        if piece.text or piece.logprobs is not None:
                            await resp.write(sse(answer.chunk(piece.text, logprobs=piece.logprobs, index=i)))
                        await resp.write(sse(answer.chunk(None if answer.chat else "", runs[i].finish, index=i)))
                    elif piece.logprobs is not None:  # with the logprobs of the tokens whose text it is
                        await resp.write(sse(answer.chunk(piece.text, logprobs=piece.logprobs, index=i)))
                    elif piece.text:
                        before, after = parts[i]
                        await resp.write(before + encode(piece.text) + after)
                    piece = await anext(pieces, None)
            except DejaVuError as e:
                error = from_client(e)
            except asyncio.CancelledError:
                error = self._cut()
            except ConnectionResetError:  # the client went away while we wrote
                self.metrics.outcome(runs[0].endpoint, "cancelled")
                return resp
        try:
            if error is not None:
                self.metrics.outcome(runs[0].endpoint, error.outcome)
                await resp.write(sse(error.body()))
            else:
                if runs[0].params.include_usage:
                    await resp.write(sse(answer.usage_chunk(self._usage(runs))))
                self._served(runs)
            await resp.write(DONE)
            await resp.write_eof()
        except ConnectionResetError:
            pass
        return resp
