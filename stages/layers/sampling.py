"""Token sampling on the last shard: greedy, temperature, top-k, top-p, reproducible per request.

Randomness never comes from a global or per-batch generator. Each request's noise for the token at
position p is a pure function of (seed, p, vocabulary index) — a counter-based hash evaluated with integer
tensor ops — and the sample is argmax(logits / T + Gumbel noise) over the tokens top-k/top-p keep. So a
request's tokens do not depend on which other requests share its batch, on the batch order, or on a
restart: recomputing position p after a failure draws the same token. The hash is computed identically on
CPU and CUDA.

Log-probabilities (`token_logprobs`, only for the rows that ask) are those of the model's own distribution:
log_softmax of the final logits in float32, before temperature, top-k and top-p - what vLLM reports by default
("raw" logprobs), and the same number whichever sampling settings drew the token (for greedy it is the
distribution the token was drawn from).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from bus.errors import InvalidRequestError
from bus.requests import check_logit_bias, check_logprobs, check_penalties, check_sampling

_M32 = 0xFFFFFFFF


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    seed: int = 0
    logprobs: int | None = None  # None: none; N: the sampled token's log-probability and the N most likely
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit) before anything else
    # OpenAI's penalties over the generated tokens (`penalize`: whoever holds those tokens applies them - the
    # offline generator, a stage from its slots' chunks; `sample` itself does not)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

    def __post_init__(self) -> None:
        check_sampling(self.temperature, self.top_k, self.top_p, self.seed)
        check_logprobs(self.logprobs)
        check_logit_bias(self.logit_bias)
        check_penalties(self.presence_penalty, self.frequency_penalty)

    @property
    def penalized(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def _mul32(a: torch.Tensor, c: int) -> torch.Tensor:
    """(a * c) mod 2^32 for a in [0, 2^32) held in int64, without int64 overflow."""
    lo, hi = a & 0xFFFF, a >> 16
    return (lo * c + (((hi * c) & 0xFFFF) << 16)) & _M32


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    """MurmurHash3's finaliser: a bijective avalanche mix of 32-bit values."""
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def uniform_noise(seeds: torch.Tensor, positions: torch.Tensor, vocab: int) -> torch.Tensor:
    """U(0,1) float32 [B, vocab], a pure function of (seed_b, position_b, token index)."""
    s_lo, s_hi = seeds & _M32, (seeds >> 32) & _M32
    key = _fmix32(_fmix32(s_lo ^ 0x9E3779B9) ^ s_hi)
    key = _fmix32(key ^ _mul32(positions & _M32, 0x27D4EB2F))  # [B]
    idx = torch.arange(vocab, device=seeds.device, dtype=torch.long)
    h = _fmix32(key[:, None] ^ _fmix32(idx[None, :] + 0x165667B1))  # [B, V]
    return ((h >> 8).float() + 0.5) * (1.0 / (1 << 24))


def sample(
    logits: torch.Tensor, params: Sequence[SamplingParams], positions: Sequence[int]
) -> torch.Tensor:
    """logits [B, V]; positions[b] = index in its sequence of the token being drawn. Returns tokens [B] long.
    A row's logit_bias is added first (to a copy: the caller's logits, which log-probabilities read, stay)."""
    b, vocab = logits.shape
    biased = [(i, t, v) for i, p in enumerate(params) for t, v in p.logit_bias]
    if biased:
        if max(t for _, t, _ in biased) >= vocab:
            raise InvalidRequestError(f"logit_bias names a token id outside the vocabulary [0, {vocab})")
        rows, ids, values = (torch.tensor(c, device=logits.device) for c in zip(*biased))
        logits = logits.float().index_put((rows, ids), values.float(), accumulate=True)
    out = logits.argmax(dim=-1)
    rows = [i for i, p in enumerate(params) if not p.greedy]
    if not rows:
        return out
    dev = logits.device
    idx = torch.tensor(rows, device=dev)
    x = logits.index_select(0, idx).float()
    temp = torch.tensor([params[i].temperature for i in rows], device=dev)
    x = x / temp[:, None]
    top_k = [params[i].top_k for i in rows]
    if any(0 < k < vocab for k in top_k):
        kk = torch.tensor([k if 0 < k < vocab else vocab for k in top_k], device=dev)
        sorted_x = x.sort(dim=-1, descending=True).values
        kth = sorted_x.gather(1, (kk - 1)[:, None])  # [R, 1] smallest kept value
        x = x.masked_fill(x < kth, float("-inf"))
    top_p = [params[i].top_p for i in rows]
    if any(p < 1.0 for p in top_p):
        pp = torch.tensor(top_p, device=dev)
        sorted_x, order = x.sort(dim=-1, descending=True)
        probs = sorted_x.softmax(dim=-1)
        before = probs.cumsum(dim=-1) - probs  # mass of strictly more likely tokens
        drop_sorted = before >= pp[:, None]
        drop_sorted[:, 0] = False  # always keep the most likely token
        drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
        x = x.masked_fill(drop, float("-inf"))
    seeds = torch.tensor([params[i].seed - (1 << 64) if params[i].seed >= (1 << 63) else params[i].seed
                          for i in rows], device=dev, dtype=torch.long)
    pos = torch.tensor([positions[i] for i in rows], device=dev, dtype=torch.long)
    u = uniform_noise(seeds, pos, vocab)
    gumbel = -torch.log(-torch.log(u))
    out[idx] = (x + gumbel).argmax(dim=-1)
    return out


def token_counts(outputs: Sequence[Sequence[int]], vocab: int, device: torch.device) -> torch.Tensor:
    """[len(outputs), vocab] float32: how often each token occurs in each of `outputs`."""
    counts = torch.zeros(len(outputs), vocab, device=device)
    flat = [t for out in outputs for t in out]
    if flat:
        which = torch.repeat_interleave(torch.arange(len(outputs)), torch.tensor([len(o) for o in outputs]))
        counts.index_put_((which.to(device), torch.tensor(flat).to(device)), torch.ones(len(flat), device=device),
                          accumulate=True)
    return counts


def penalize(logits: torch.Tensor, rows: Sequence[int], counts: torch.Tensor, presence: Sequence[float],
             frequency: Sequence[float]) -> torch.Tensor:
    """OpenAI's penalties, as vLLM applies them (over the generated tokens only): row rows[j]'s logit of token t
    drops by frequency[j] x counts[j, t] + presence[j] if t came at all. A float32 copy of `logits` (the caller's,
    which log-probabilities read, stay)."""
    dev = logits.device
    idx = torch.tensor(list(rows), device=dev)
    freq = torch.tensor(list(frequency), device=dev)[:, None]
    pres = torch.tensor(list(presence), device=dev)[:, None]
    penalized = logits.index_select(0, idx).float() - freq * counts - pres * (counts > 0).float()
    return logits.float().index_copy(0, idx, penalized)


TokenLogprobs = tuple[float, list[int], list[float]]  # (sampled token's, top ids, their log-probabilities)


def token_logprobs(
    logits: torch.Tensor, tokens: torch.Tensor, asks: Sequence[int | None]
) -> list[TokenLogprobs | None]:
    """logits [B, V], tokens [B] the sampled ones, asks[b]: None, or how many top alternatives row b wants.
    Rows that ask nothing cost nothing; the rest take one log_softmax over the rows that ask and one top-k."""
    rows = [i for i, k in enumerate(asks) if k is not None]
    out: list[TokenLogprobs | None] = [None] * len(asks)
    if not rows:
        return out
    idx = torch.tensor(rows, device=logits.device)
    logp = torch.log_softmax(logits.index_select(0, idx).float(), dim=-1)  # [R, V]
    chosen = logp.gather(1, tokens.index_select(0, idx)[:, None]).squeeze(1).tolist()  # [R]
    k = min(max(asks[i] or 0 for i in rows), logp.shape[1])
    top_lp, top_ids = logp.topk(k, dim=-1) if k else (logp[:, :0], logp[:, :0].long())  # [R, k], sorted
    top_lp_l, top_ids_l = top_lp.tolist(), top_ids.tolist()
    for r, i in enumerate(rows):
        n = min(asks[i] or 0, k)
        out[i] = (chosen[r], top_ids_l[r][:n], top_lp_l[r][:n])
    return out
