"""Text in, text out: the model directory's own tokenizer (local files only), and incremental decoding for
streams (a byte-level token can end in the middle of a UTF-8 character; such text is held back until the
character completes)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


def has_tokenizer(model_dir: Path) -> bool:
    return any((Path(model_dir) / f).is_file() for f in TOKENIZER_FILES)


def load_tokenizer(model_dir: Path) -> Any | None:
    """A transformers tokenizer from the directory, or None where the directory has none.

    Where tokenizer_config.json names PreTrainedTokenizerFast (Llama 3, our default model, ...), that class is
    what AutoTokenizer would build, and loading it directly skips AutoTokenizer's import of torch and the model
    registry: ~1.4 s instead of ~5.8 s on the CI box, on the controller's path to its first request."""
    if not has_tokenizer(model_dir):
        return None
    try:
        if _configured_class(model_dir) == "PreTrainedTokenizerFast" and (Path(model_dir) / "tokenizer.json").is_file():
            from transformers import PreTrainedTokenizerFast as Tokenizer
        else:
            from transformers import AutoTokenizer as Tokenizer
        return Tokenizer.from_pretrained(str(model_dir), local_files_only=True)
    except Exception as e:  # a broken tokenizer must not stop token-id serving
        log.warning("[text] %s: tokenizer present but unloadable (%s); serving token ids only", model_dir, e)
        return None


def _configured_class(model_dir: Path) -> str:
    try:
        cfg = json.loads((Path(model_dir) / "tokenizer_config.json").read_text())
    except (OSError, ValueError):
        return ""
    return cfg.get("tokenizer_class", "") if isinstance(cfg, dict) else ""


def longest_token_bytes(tokenizer: Any) -> int:
    """UTF-8 bytes of the vocabulary's longest token string: a text has at least len(bytes) / this many tokens."""
    return max((len(t.encode("utf-8", "surrogatepass")) for t in tokenizer.get_vocab()), default=1) or 1


class IncrementalDetokenizer:
    """Feed token ids one step at a time; get back only the newly completed text."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.emitted = 0  # characters of the full decode already handed out

    def prime(self, prompt_ids: list[int]) -> None:
        """Decode outputs in the context of the prompt's last tokens (so word-joining tokenizers space
        correctly); only text after the prompt is ever returned."""
        self.ids = list(prompt_ids[-4:])
        self.emitted = len(self.tokenizer.decode(self.ids, skip_special_tokens=True))

    def push(self, token_ids: list[int]) -> str:
        self.ids.extend(token_ids)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return ""  # incomplete character: wait for the rest of its bytes
        new, self.emitted = text[self.emitted :], len(text)
        return new

    def flush(self) -> str:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        new, self.emitted = text[self.emitted :], len(text)
        return new
