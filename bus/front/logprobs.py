"""`logprobs` in the OpenAI shapes: each output token's log-probability (and its most likely alternatives') as the
stages computed them (bus/messages.TokenLogprob: the model's own distribution, before temperature, top-k and top-p),
written as /v1/completions' `choices[].logprobs` (`tokens`, `token_logprobs`, `top_logprobs`, `text_offset`) or
/v1/chat/completions' (`content[]`: `token`, `logprob`, `bytes`, `top_logprobs`).

Runs in the front process, on its loop: a token's string and bytes are worked out once per token id and kept (at
most the vocabulary's size). `text_offset` counts characters of the completion text (as the ZeroMQ client streams
it, before stop strings cut it), from 0: where each token's text begins - a token whose bytes end inside a UTF-8
character begins where the character does.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from bus.messages import TokenLogprob
from bus.text import byte_unicode

_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # SentencePiece's byte tokens
_SPIECE_SPACE = "\u2581"


class TokenTexts:
    """A token id's text and UTF-8 bytes, as the OpenAI API reports them: the bytes the token stands for (exact for
    byte-level BPE and SentencePiece byte tokens; a byte token in the middle of a character has a text of U+FFFD),
    special tokens by their name."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
        self.byte_level = type(decoder).__name__ == "ByteLevel"
        self.bytes_of = {c: b for b, c in byte_unicode().items()}  # printable character -> byte
        self.specials = set(getattr(tokenizer, "all_special_ids", ()))
        self.cache: dict[int, tuple[str, list[int]]] = {}

    def get(self, token_id: int) -> tuple[str, list[int]]:
        got = self.cache.get(token_id)
        if got is None:
            raw = self._bytes(token_id)
            got = self.cache[token_id] = (raw.decode("utf-8", "replace"), list(raw))
        return got

    def _bytes(self, i: int) -> bytes:
        tok = self.tokenizer.convert_ids_to_tokens(i)
        if i in self.specials or not isinstance(tok, str):
            return self.tokenizer.decode([i], skip_special_tokens=False).encode("utf-8")
        if self.byte_level and all(c in self.bytes_of for c in tok):
            return bytes(self.bytes_of[c] for c in tok)
        m = _BYTE_FALLBACK.fullmatch(tok)
        if m:
            return bytes([int(m.group(1), 16)])
        if _SPIECE_SPACE in tok:  # SentencePiece spells a leading space this way (and decode drops it)
            return tok.replace(_SPIECE_SPACE, " ").encode("utf-8")
        return self.tokenizer.decode([i], skip_special_tokens=False).encode("utf-8")


@dataclass
class LogprobsWriter:
    """One request's logprobs: `add` each TokenEvent's, `take` those added since the last take as the endpoint's
    `logprobs` object (None when none are pending)."""

    texts: TokenTexts
    chat: bool
    chars: int = 0  # characters of the completion text so far (text_offset)
    pending: list[tuple[int, TokenLogprob, int]] = field(default_factory=list)  # (token id, logprobs, offset)

    def add(self, token_ids: Iterable[int], logprobs: Iterable[TokenLogprob] | None, text: str | None) -> None:
        if logprobs is not None:
            self.pending.extend((t, lp, self.chars) for t, lp in zip(token_ids, logprobs))
        self.chars += len(text or "")

    def take(self) -> dict[str, Any] | None:
        if not self.pending:
            return None
        pending, self.pending = self.pending, []
        return self._chat(pending) if self.chat else self._completion(pending)

    def _chat(self, pending: list[tuple[int, TokenLogprob, int]]) -> dict[str, Any]:
        content = []
        for token_id, lp, _ in pending:
            text, raw = self.texts.get(token_id)
            top = []
            for alt, alt_lp in zip(lp.top_ids, lp.top_logprobs):
                alt_text, alt_raw = self.texts.get(alt)
                top.append({"token": alt_text, "logprob": alt_lp, "bytes": alt_raw})
            content.append({"token": text, "logprob": lp.logprob, "bytes": raw, "top_logprobs": top})
        return {"content": content}

    def _completion(self, pending: list[tuple[int, TokenLogprob, int]]) -> dict[str, Any]:
        tops = []
        for _, lp, _ in pending:
            # a map per token (the API's shape): alternatives whose texts coincide keep the likelier one
            top: dict[str, float] = {}
            for alt, alt_lp in zip(lp.top_ids, lp.top_logprobs):
                top.setdefault(self.texts.get(alt)[0], alt_lp)
            tops.append(top)
        return {
            "tokens": [self.texts.get(t)[0] for t, _, _ in pending],
            "token_logprobs": [lp.logprob for _, lp, _ in pending],
            "top_logprobs": tops,
            "text_offset": [offset for _, _, offset in pending],
        }
