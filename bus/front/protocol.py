"""The OpenAI API's request and response shapes (completions, chat completions, their stream chunks, usage).

Pure: a request body (parsed JSON) in, `Params` out, or an ApiError naming the offending field; and the JSON
objects of the answers. Fields the deployment cannot honour (best_of, echo, tools, ...) are refused
with a 400 that names them - never silently ignored. `n` choices (up to MAX_N) are n requests of the deployment.
`logit_bias` (at most 300 ids, each bias in [-100, 100]) and `presence_penalty` / `frequency_penalty` (each in
[-2, 2], over the generated tokens, as vLLM) are honoured. Extensions, as vLLM names them: `top_k`,
`ignore_eos`, `stop_token_ids`; a completions prompt may be a list of token ids.

Logprobs: completions' `logprobs: N`, chat's `logprobs: true` with `top_logprobs: N` (N in [0, MAX_LOGPROBS]) -
each output token's log-probability under the model's own distribution (before temperature, top-k and top-p, as
vLLM reports them) and its N most likely alternatives'; bus/front/logprobs.py writes them.
"""

from __future__ import annotations

import math
import operator
import time
from dataclasses import dataclass
from typing import Any

from bus.errors import InvalidRequestError
from bus.front.errors import ApiError, bad_request
from bus.requests import MAX_LOGPROBS, check_logit_bias

MAX_STOPS = 4  # as the OpenAI API
MAX_SEED = 2**63
MAX_N = 16  # choices per request: each is a request of the deployment, with a slot (and a prompt pass) of its own


@dataclass(frozen=True)
class Params:
    model: str
    prompt: str | list[int] | None  # completions: text or token ids; chat: None (the messages are rendered)
    max_tokens: int | None  # None: completions 16, chat whatever fits the maximum sequence length
    temperature: float
    top_p: float
    top_k: int
    seed: int | None  # None: a fresh random seed (as the OpenAI API: sampling is not reproducible without one)
    stop: tuple[str, ...]
    stop_token_ids: tuple[int, ...]
    ignore_eos: bool
    stream: bool
    include_usage: bool
    logprobs: int | None = None  # None: none asked; N: each token's log-probability and N alternatives'
    n: int = 1  # choices: choice i samples with seed + i (a given seed), or a fresh random seed each
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias in [-100, 100]); the vocabulary is the server's
    presence_penalty: float = 0.0  # OpenAI's, each in [-2, 2], over the tokens generated so far
    frequency_penalty: float = 0.0


def _number(body: dict[str, Any], name: str, default: float, lo: float, hi: float) -> float:
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not lo <= v <= hi:
        raise bad_request(f"{name} must be a number in [{lo:g}, {hi:g}], got {v!r}", name)
    return float(v)


def _int(body: dict[str, Any], name: str, lo: int, hi: int) -> int | None:
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v < hi:
        raise bad_request(f"{name} must be an integer in [{lo}, {hi}), got {v!r}", name)
    return v


def _flag(body: dict[str, Any], name: str) -> bool:
    v = body.get(name, False)
    if v is None:
        return False
    if not isinstance(v, bool):
        raise bad_request(f"{name} must be true or false, got {v!r}", name)
    return v


def _token_ids(v: Any, name: str) -> list[int]:
    out = []
    for t in v:
        try:
            i = operator.index(t)
        except TypeError:
            raise bad_request(f"{name} must hold integer token ids, got {t!r}", name) from None
        if isinstance(t, bool) or not 0 <= i < 2**31:
            raise bad_request(f"{name} must hold token ids in [0, 2**31), got {t!r}", name)
        out.append(i)
    return out


def _refuse_unsupported(body: dict[str, Any], chat: bool) -> None:
    """Parameters the deployment cannot honour, when asked for anything but their neutral value."""
    if body.get("best_of") not in (None, 1, body.get("n", 1)):
        raise bad_request("best_of must be n: every choice sampled is returned", "best_of")
    if body.get("echo"):
        raise bad_request("echo is not supported", "echo")
    if body.get("suffix"):
        raise bad_request("suffix is not supported", "suffix")
    if body.get("tools") or body.get("functions"):
        raise bad_request("tools are not supported", "tools")
    fmt = body.get("response_format")
    if fmt is not None and (not isinstance(fmt, dict) or fmt.get("type", "text") != "text"):
        raise bad_request("response_format must be {\"type\": \"text\"}", "response_format")


def _logprobs(body: dict[str, Any], chat: bool) -> int | None:
    """How many alternatives per token (None: no logprobs): completions' `logprobs: N`; chat's `logprobs: true`
    with `top_logprobs: N` (which needs `logprobs: true`, as in the OpenAI API)."""
    if not chat:
        return _int(body, "logprobs", 0, MAX_LOGPROBS + 1)
    asked = _flag(body, "logprobs")
    top = _int(body, "top_logprobs", 0, MAX_LOGPROBS + 1)
    if top is not None and not asked:
        raise bad_request("top_logprobs needs logprobs: true", "top_logprobs")
    return (top or 0) if asked else None


def _logit_bias(body: dict[str, Any]) -> tuple[tuple[int, float], ...]:
    """OpenAI's logit_bias: {"token id": bias}, the ids as JSON object keys (strings of integers)."""
    bias = body.get("logit_bias")
    if bias is None:
        return ()
    if not isinstance(bias, dict):
        raise bad_request("logit_bias must be an object mapping token ids to numbers in [-100, 100]", "logit_bias")
    pairs = []
    for key, value in bias.items():
        try:
            token = int(key)
        except ValueError:
            raise bad_request(f"logit_bias keys must be token ids, got {key!r:.40}", "logit_bias") from None
        pairs.append((token, value))
    try:
        return check_logit_bias(pairs)
    except InvalidRequestError as e:
        raise bad_request(str(e), "logit_bias") from None


def _stops(body: dict[str, Any]) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise bad_request(f"stop must be a string or a list of strings, got {stop!r:.80}", "stop")
    if len(stops) > MAX_STOPS:
        raise bad_request(f"stop takes at most {MAX_STOPS} strings, got {len(stops)}", "stop")
    return tuple(s for s in stops if s)


def _params(body: dict[str, Any], prompt: str | list[int] | None, max_tokens_name: str, chat: bool) -> Params:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad_request("model is required: the name /v1/models lists", "model")
    max_tokens = _int(body, max_tokens_name, 1, 1 << 30)
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise bad_request("stream_options must be an object", "stream_options")
    stop_ids = body.get("stop_token_ids") or []
    if not isinstance(stop_ids, list):
        raise bad_request("stop_token_ids must be a list of token ids", "stop_token_ids")
    return Params(
        model=model, prompt=prompt, max_tokens=max_tokens,
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0), top_p=_number(body, "top_p", 1.0, 0.0, 1.0),
        top_k=_int(body, "top_k", 0, 1 << 31) or 0, seed=_int(body, "seed", 0, MAX_SEED),
        stop=_stops(body), stop_token_ids=tuple(_token_ids(stop_ids, "stop_token_ids")),
        ignore_eos=_flag(body, "ignore_eos"), stream=_flag(body, "stream"),
        include_usage=bool((options or {}).get("include_usage")), logprobs=_logprobs(body, chat),
        n=_int(body, "n", 1, MAX_N + 1) or 1, logit_bias=_logit_bias(body),
        presence_penalty=_number(body, "presence_penalty", 0.0, -2.0, 2.0),
        frequency_penalty=_number(body, "frequency_penalty", 0.0, -2.0, 2.0),
    )


def _check_top_p(p: Params) -> Params:
    if p.top_p <= 0.0:
        raise bad_request("top_p must be in (0, 1]", "top_p")
    return p


def parse_completion(body: Any) -> Params:
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    _refuse_unsupported(body, chat=False)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        if not prompt:
            raise bad_request("prompt is empty", "prompt")
        return _check_top_p(_params(body, prompt, "max_tokens", False))
    if isinstance(prompt, list) and prompt and not any(isinstance(t, (str, list)) for t in prompt):
        return _check_top_p(_params(body, _token_ids(prompt, "prompt"), "max_tokens", False))
    if isinstance(prompt, list) and len(prompt) > 1:
        raise bad_request("one prompt per request (send several requests)", "prompt")
    raise bad_request("prompt must be a non-empty string or a list of token ids", "prompt")


def parse_chat(body: Any) -> tuple[list[dict[str, str]], Params]:
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    _refuse_unsupported(body, chat=True)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad_request("messages must be a non-empty list", "messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise bad_request(f"messages[{i}] must be an object with a role", "messages")
        content = m.get("content")
        if isinstance(content, list):  # content parts: text only
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise bad_request(f"messages[{i}].content: only text parts are supported", "messages")
            content = "".join(p["text"] for p in content)
        elif content is None:
            content = ""
        elif not isinstance(content, str):
            raise bad_request(f"messages[{i}].content must be a string or a list of text parts", "messages")
        out.append({"role": m["role"], "content": content})
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    return out, _check_top_p(_params(body, None, name, True))


# ---------------------------------------------------------------- answers


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


@dataclass(frozen=True)
class Answer:
    """What every object of one request's answer shares."""

    id: str
    model: str
    chat: bool
    created: int

    @classmethod
    def new(cls, request_id: str, model: str, chat: bool) -> Answer:
        return cls(("chatcmpl-" if chat else "cmpl-") + request_id, model, chat, int(time.time()))

    def _head(self, chunk: bool) -> dict[str, Any]:
        kind = "chat.completion" if self.chat else "text_completion"
        return {"id": self.id, "object": kind + (".chunk" if chunk and self.chat else ""), "created": self.created,
                "model": self.model}

    def whole(self, choices: list[tuple[str, str, dict[str, Any] | None]], use: dict[str, int]) -> dict[str, Any]:
        """The whole answer: choices[i] = (text, finish reason, logprobs) of choice i."""
        out = []
        for i, (text, finish_reason, logprobs) in enumerate(choices):
            if self.chat:
                out.append({"index": i, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
                            "finish_reason": finish_reason})
            else:
                out.append({"index": i, "text": text, "logprobs": logprobs, "finish_reason": finish_reason})
        return {**self._head(False), "choices": out, "usage": use}

    def chunk(self, text: str | None, finish_reason: str | None = None, role: bool = False,
              logprobs: dict[str, Any] | None = None, index: int = 0) -> dict[str, Any]:
        if self.chat:
            delta: dict[str, str] = {"role": "assistant"} if role else {}
            if text is not None:
                delta["content"] = text
            choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
        else:
            choice = {"index": index, "text": text or "", "logprobs": logprobs, "finish_reason": finish_reason}
        return {**self._head(True), "choices": [choice]}

    def token_event_parts(self, encode: Any, index: int = 0) -> tuple[bytes, bytes]:
        """The SSE event of a token's text as (before, after) the JSON string of the text: every token's event is
        then one concatenation (the same bytes as encoding `chunk(text, index=index)`, at a fraction of the
        cost)."""
        marker = "\u0000dejavu\u0000"
        event = b"data: " + encode(self.chunk(marker, index=index)) + b"\n\n"
        before, after = event.split(encode(marker))
        return before, after

    def usage_chunk(self, use: dict[str, int]) -> dict[str, Any]:
        return {**self._head(True), "choices": [], "usage": use}


def models_list(model: str, created: int) -> dict[str, Any]:
    return {"object": "list", "data": [{"id": model, "object": "model", "created": created, "owned_by": "dejavu"}]}


def refuse_model(asked: str, served: str) -> ApiError:
    return ApiError(404, f"the model {asked!r} does not exist here: this server serves {served!r} (GET /v1/models)",
                    param="model", code="model_not_found")
