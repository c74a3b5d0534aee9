"""Chat messages to prompt text with the model's own chat template (its tokenizer config's `chat_template`,
rendered by transformers' apply_chat_template), and text to token ids - in the front, so the controller never
spends its loop on either.

A model without a chat template cannot serve /v1/chat/completions: that is a 400 saying so (guessing a template
would produce text the model was never trained on)."""

from __future__ import annotations

from typing import Any

from bus.front.errors import bad_request


def has_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render(tokenizer: Any, messages: list[dict[str, str]], model: str) -> list[int]:
    """Token ids of the conversation, ending where the assistant's reply begins."""
    if not has_template(tokenizer):
        raise bad_request(f"the model {model!r} has no chat template (no chat_template in its tokenizer config): "
                          "use /v1/completions with a prompt", "messages", "no_chat_template")
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as e:  # the template refused the conversation (jinja raise_exception: roles out of order, ...)
        raise bad_request(f"the model's chat template refused the messages: {e}", "messages") from None
    # the template writes the special tokens it wants (BOS, ...): none are added again
    return list(tokenizer.encode(text, add_special_tokens=False))


def encode(tokenizer: Any, prompt: str) -> list[int]:
    """A completion prompt's token ids, as the controller would encode it."""
    return list(tokenizer.encode(prompt))
