"""wordfilter: refuse or mask words and patterns in what attendees send to the models.

Config (AIPROXY_PLUGIN_WORDFILTER, or the setting of its alias), a JSON object:

    words        whole words or phrases, any case: ["project falcon", "darn"]
    patterns     Python regular expressions, as written: ["[\\w.+-]+@[\\w-]+\\.[\\w.]+"]
    action       "refuse" (default): 400 content_filter, nothing is sent;
                 "mask": every match is replaced and the call goes on
    replacement  what a match becomes when masking (default "***")
    message      the refusal's message (default: a sentence saying to rephrase)

It reads the text a model gets: chat `messages[].content` (text and text parts), completions
`prompt`, embeddings `input`, Responses `instructions` and `input` (text, content parts and
tool outputs), image `prompt` and speech `input`; never token arrays, files or other fields.
Its hook is plain CPU work on the event loop: a few µs for a short chat call with words only,
more with each pattern (bench/results/plugins.md).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

from shared.plugins import Plugin, Refusal, RequestContext

KEYS = frozenset({"words", "patterns", "action", "replacement", "message"})
DEFAULT_MESSAGE = (
    "This request contains words or patterns this event does not allow. Rephrase it and send "
    "it again."
)
# A place in a body that holds text: (field path for the caller, container, key or index).
Place = tuple[str, Any, Any]


class WordFilter(Plugin):
    """Refuses or masks configured words and patterns in the text of a request."""

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__(config)
        unknown = sorted(set(config) - KEYS)
        if unknown:
            raise ValueError(f"unknown keys {unknown}; known: {sorted(KEYS)}")
        words = _strings(config, "words")
        patterns = _strings(config, "patterns")
        if not words and not patterns:
            raise ValueError("give 'words' or 'patterns' (lists of strings) to filter")
        self.action = config.get("action", "refuse")
        if self.action not in ("refuse", "mask"):
            raise ValueError(f"'action' is 'refuse' or 'mask', not {self.action!r}")
        self.replacement = config.get("replacement", "***")
        self.message = config.get("message", DEFAULT_MESSAGE)
        if not isinstance(self.replacement, str) or not isinstance(self.message, str):
            raise ValueError("'replacement' and 'message' are strings")
        self.words: re.Pattern[str] | None = None
        if words:
            longest_first = sorted(words, key=len, reverse=True)
            alternatives = "|".join(re.escape(word) for word in longest_first)
            self.words = re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)", re.I)
        # A quick look for the words in ASCII text before the expression (which tries every
        # word at every position); for ASCII, lower case is exactly what re.I compares.
        self.ascii_words = (
            tuple(word.lower() for word in words) if all(w.isascii() for w in words) else None
        )
        self.patterns: list[re.Pattern[str]] = []
        for pattern in patterns:
            try:
                self.patterns.append(re.compile(pattern))
            except re.error as exc:
                raise ValueError(f"pattern {pattern!r} is not a regular expression: {exc}") from exc

    def on_request(self, context: RequestContext, body: dict[str, Any]) -> dict[str, Any] | None:
        if self.action == "refuse":
            for path, holder, key in places(context.operation, body):
                text = holder[key]
                if self._has_words(text) or any(p.search(text) for p in self.patterns):
                    raise Refusal(self.message, param=path)
            return None
        changed = False
        for _, holder, key in places(context.operation, body):
            text = holder[key]
            if self.words is not None and self._may_have_words(text):
                text = self.words.sub(self.replacement, text)
            for pattern in self.patterns:
                text = pattern.sub(self.replacement, text)
            if text != holder[key]:
                holder[key] = text
                changed = True
        return body if changed else None

    def _may_have_words(self, text: str) -> bool:
        if self.ascii_words is None or not text.isascii():
            return True
        lowered = text.lower()
        for word in self.ascii_words:  # noqa: SIM110 - a quarter quicker than any() over a generator
            if word in lowered:
                return True
        return False

    def _has_words(self, text: str) -> bool:
        return (
            self.words is not None
            and self._may_have_words(text)
            and self.words.search(text) is not None
        )


def _strings(config: dict[str, Any], key: str) -> list[str]:
    value = config.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ValueError(f"'{key}' is a list of non-empty strings")
    return value


def places(operation: str, body: dict[str, Any]) -> Iterator[Place]:
    """Every place of a request body that holds text for the model."""
    if operation.endswith("chat/completions"):
        messages = body.get("messages")
        for i, message in enumerate(messages if isinstance(messages, list) else ()):
            if isinstance(message, dict):
                yield from _content(f"messages[{i}].content", message)
    elif operation in ("completions", "images/generations"):
        yield from _text_or_texts("prompt", body)
    elif operation in ("embeddings", "audio/speech"):
        yield from _text_or_texts("input", body)
    elif operation == "responses":
        if isinstance(body.get("instructions"), str):
            yield "instructions", body, "instructions"
        items = body.get("input")
        if isinstance(items, str):
            yield "input", body, "input"
        for i, item in enumerate(items if isinstance(items, list) else ()):
            if isinstance(item, dict):
                yield from _content(f"input[{i}].content", item)
                if isinstance(item.get("output"), str):
                    yield f"input[{i}].output", item, "output"


def _content(path: str, holder: dict[str, Any]) -> Iterator[Place]:
    """A message's `content`: a string, or parts of which those with `text` hold text."""
    content = holder.get("content")
    if isinstance(content, str):
        yield path, holder, "content"
    elif isinstance(content, list):
        for j, part in enumerate(content):
            if isinstance(part, dict) and isinstance(part.get("text"), str):
                yield f"{path}[{j}].text", part, "text"


def _text_or_texts(key: str, holder: dict[str, Any]) -> Iterator[Place]:
    """A field holding a string or a list of them (token arrays are left alone)."""
    value = holder.get(key)
    if isinstance(value, str):
        yield key, holder, key
    elif isinstance(value, list):
        for i, item in enumerate(value):
            if isinstance(item, str):
                yield f"{key}[{i}]", value, i
