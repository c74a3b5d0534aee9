"""Admission of a client request: validation into a `Request` the scheduler can run, and its live state.

Pure (no sockets). The controller is the authority on what is valid; every refusal is an
InvalidRequestError with a message meant for the client.
"""

from __future__ import annotations

import math
import time
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

from bus.errors import InvalidRequestError
from bus.messages import GenerateRequest, Sampling
from bus.text import IncrementalDetokenizer

MAX_REQUEST_ID = 128
MAX_LOGPROBS = 20  # alternatives per token a request may ask for (GenerateRequest.logprobs), as OpenAI's chat API
MAX_LOGIT_BIAS = 300  # tokens a request may bias (GenerateRequest.logit_bias), as the OpenAI API
LOGIT_BIAS_RANGE = 100.0  # each bias in [-100, 100], as the OpenAI API


def check_sampling(temperature: float, top_k: int, top_p: float, seed: int) -> None:
    """Sampling parameters as the last stage's sampler takes them (stages/layers/sampling.py)."""
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and 0.0 <= temperature <= 100.0):
        raise InvalidRequestError(f"temperature must be a number in [0, 100], got {temperature!r}")
    if not (isinstance(top_k, int) and top_k >= 0):
        raise InvalidRequestError(f"top_k must be an integer >= 0 (0 = off), got {top_k!r}")
    if not (isinstance(top_p, (int, float)) and math.isfinite(top_p) and 0.0 < top_p <= 1.0):
        raise InvalidRequestError(f"top_p must be in (0, 1], got {top_p!r}")
    if not (isinstance(seed, int) and 0 <= seed < 2**64):
        raise InvalidRequestError(f"seed must be an integer in [0, 2^64), got {seed!r}")


def check_penalties(presence: float, frequency: float) -> None:
    """GenerateRequest.presence_penalty and frequency_penalty: numbers in [-2, 2], as the OpenAI API."""
    if type(presence) is float and type(frequency) is float and presence == frequency == 0.0:
        return  # (every step's sampling rows pass here: the common case costs one comparison)
    for name, v in (("presence_penalty", presence), ("frequency_penalty", frequency)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not -2.0 <= v <= 2.0:
            raise InvalidRequestError(f"{name} must be a number in [-2, 2], got {v!r}")


def check_logprobs(logprobs: int | None) -> None:
    """GenerateRequest.logprobs: None (none), or how many alternatives to report besides the sampled token."""
    if logprobs is not None and (isinstance(logprobs, bool) or not isinstance(logprobs, int)
                                 or not 0 <= logprobs <= MAX_LOGPROBS):
        raise InvalidRequestError(f"logprobs must be None or an integer in [0, {MAX_LOGPROBS}], got {logprobs!r}")


def check_logit_bias(bias: object, vocab_size: int | None = None) -> tuple[tuple[int, float], ...]:
    """GenerateRequest.logit_bias (a mapping token id -> bias, or its pairs) as Sampling carries it: (id, bias)
    pairs sorted by id. vocab_size: ids must be inside it (the controller knows it; the sampler checks the rest)."""
    if not bias:  # None or empty (every step's sampling rows pass here)
        return ()
    pairs = list(bias.items()) if isinstance(bias, dict) else bias
    if not isinstance(pairs, (list, tuple)) or len(pairs) > MAX_LOGIT_BIAS:
        raise InvalidRequestError(f"logit_bias must map at most {MAX_LOGIT_BIAS} token ids to numbers")
    out: dict[int, float] = {}
    for pair in pairs:
        t, b = pair if isinstance(pair, (list, tuple)) and len(pair) == 2 else (None, None)
        if isinstance(t, bool) or not isinstance(t, int) or t < 0 or (vocab_size is not None and t >= vocab_size):
            where = f"[0, {vocab_size})" if vocab_size is not None else "the vocabulary"
            raise InvalidRequestError(f"logit_bias: token id {t!r} outside {where}")
        if isinstance(b, bool) or not isinstance(b, (int, float)) or not math.isfinite(b) \
                or not -LOGIT_BIAS_RANGE <= b <= LOGIT_BIAS_RANGE:
            raise InvalidRequestError(f"logit_bias of token {t}: must be a number in [-{LOGIT_BIAS_RANGE:g}, "
                                      f"{LOGIT_BIAS_RANGE:g}], got {b!r}")
        out[t] = float(b)
    return tuple(sorted(out.items()))


@dataclass(eq=False)
class Request:
    client: bytes
    request_id: str
    prompt: list[int]
    max_new_tokens: int
    sampling: Sampling
    stop_ids: frozenset[int]
    detok: IncrementalDetokenizer | None
    submitted: float = field(default_factory=time.monotonic)
    generated: list[int] = field(default_factory=list)
    cached: int = 0  # tokens of prompt + generated present in the KV cache of the current epoch
    slot: int | None = None
    mb: int | None = None
    cancelled: bool = False
    cancel_reason: str = ""  # set when the server cancels it (the client is told why)
    done: bool = False
    replicated: dict[int, Any] = field(default_factory=dict)  # stage -> bus/replication.Held
    # disaggregated: its prompt's KV reached the token stages from the prompt stages, and no token step of it came
    # back yet: its steps tell the token stages to replicate [0, end) (StepRequest.joined)
    join_pending: bool = False
    # penalties: the epoch whose last stage was sent this request's generated tokens (Sampling.history); -1: none
    history_epoch: int = -1

    @property
    def penalized(self) -> bool:
        return self.sampling.penalized

    @property
    def key(self) -> tuple[bytes, str]:
        return (self.client, self.request_id)

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.generated

    @property
    def seq_len(self) -> int:
        return len(self.prompt) + len(self.generated)


def admit(
    client: bytes,
    req: GenerateRequest,
    *,
    vocab_size: int,
    max_seq_len: int,
    eos_ids: Collection[int],
    tokenizer: Any | None,
) -> Request:
    """Validate `req` and build its Request; raises InvalidRequestError naming the problem."""
    if not req.request_id or len(req.request_id) > MAX_REQUEST_ID:
        raise InvalidRequestError(f"request_id must be 1..{MAX_REQUEST_ID} characters")
    if (req.prompt is None) == (req.prompt_token_ids is None):
        raise InvalidRequestError("give exactly one of prompt (text) and prompt_token_ids")
    if req.prompt is not None:
        if tokenizer is None:
            raise InvalidRequestError("this model has no tokenizer: send prompt_token_ids")
        ids = list(tokenizer.encode(req.prompt))
    else:
        ids = list(req.prompt_token_ids or [])
    if not ids:
        raise InvalidRequestError("empty prompt: give at least one token")
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise InvalidRequestError(f"prompt token id(s) {bad[:5]} outside the vocabulary [0, {vocab_size})")
    if len(ids) >= max_seq_len:
        raise InvalidRequestError(
            f"prompt of {len(ids)} tokens is too long: the maximum sequence length is {max_seq_len} "
            "(prompt + at least one generated token)"
        )
    if not 1 <= req.max_new_tokens <= 1_000_000:
        raise InvalidRequestError(f"max_new_tokens must be in [1, 1000000], got {req.max_new_tokens}")
    if len(ids) + req.max_new_tokens > max_seq_len:  # refused, never cut short silently
        raise InvalidRequestError(
            f"prompt of {len(ids)} tokens + max_new_tokens {req.max_new_tokens} exceeds the maximum sequence "
            f"length {max_seq_len}: ask for at most {max_seq_len - len(ids)} new tokens (the server's "
            "--max-seq-len)"
        )
    check_sampling(req.temperature, req.top_k, req.top_p, req.seed)
    check_logprobs(req.logprobs)
    bias = check_logit_bias(req.logit_bias, vocab_size)
    check_penalties(req.presence_penalty, req.frequency_penalty)
    bad = [t for t in req.stop_token_ids if not 0 <= t < vocab_size]
    if bad:
        raise InvalidRequestError(f"stop token id(s) {bad[:5]} outside the vocabulary [0, {vocab_size})")
    resumed = list(req.resume_token_ids or [])
    if resumed:
        bad = [t for t in resumed if not 0 <= t < vocab_size]
        if bad:
            raise InvalidRequestError(f"resumed token id(s) {bad[:5]} outside the vocabulary [0, {vocab_size})")
        if len(resumed) > req.max_new_tokens or len(ids) + len(resumed) > max_seq_len:
            raise InvalidRequestError(f"resume of {len(resumed)} token(s) exceeds max_new_tokens or the maximum "
                                      "sequence length")
    detok = IncrementalDetokenizer(tokenizer) if tokenizer is not None else None
    if detok is not None:
        detok.prime(ids)
        detok.push(resumed)  # the client holds the text of these: only the detokenizer's state matters
    return Request(
        client=client,
        request_id=req.request_id,
        prompt=ids,
        max_new_tokens=req.max_new_tokens,
        sampling=Sampling(float(req.temperature), req.top_k, float(req.top_p), req.seed, req.logprobs, bias,
                          float(req.presence_penalty), float(req.frequency_penalty), len(ids)),
        stop_ids=(frozenset() if req.ignore_eos else frozenset(eos_ids)) | frozenset(req.stop_token_ids),
        detok=detok,
        generated=resumed,
    )
