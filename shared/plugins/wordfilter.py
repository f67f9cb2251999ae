"""wordfilter: refuse or mask words and patterns in what attendees send to the models.

Config (AIPROXY_PLUGIN_WORDFILTER, or the setting of its alias), a JSON object:

    words        whole words or phrases, any case: ["project falcon", "darn"]
    patterns     Python regular expressions, as written: ["[\\w.+-]+@[\\w-]+\\.[\\w.]+"]
    action       "refuse" (default): 400 content_filter, nothing is sent;
                 "mask": every match is replaced and the call goes on
    replacement  what a match becomes when masking (default "***")
    message      the refusal's message (default: a sentence saying to rephrase)
    max_text     the most characters of text one call may hold (default 65536): a call with
                 more is refused (400 invalid_request), never passed on partly checked

It reads the text a model gets: chat `messages[].content` (text and text parts), completions
`prompt`, embeddings `input`, Responses `instructions` and `input` (text, content parts and
tool outputs), image `prompt` and speech `input`; never token arrays, files or other fields.
Its hook is plain CPU work in a thread: a few µs for a short chat call with words only, more
with each pattern (bench/results/plugins.md). Expressions are matched by the `regex` module,
which lets go of the GIL while it matches and stops at the request budget
(AIPROXY_PLUGINS_REQUEST_BUDGET_MS): a pattern that backtracks without end on some text fails
that call (503 plugin_failed) and holds no other.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import regex

from shared.platform import settings
from shared.plugins import Plugin, Refusal, RequestContext

KEYS = frozenset({"words", "patterns", "action", "replacement", "message", "max_text"})
MAX_TEXT = 65_536
DEFAULT_MESSAGE = (
    "This request contains words or patterns this event does not allow. Rephrase it and send "
    "it again."
)
# A place in a body that holds text: (field path for the caller, container, key or index).
Place = tuple[str, Any, Any]


class WordFilter(Plugin):
    """Refuses or masks configured words and patterns in the text of a request."""

    keys = KEYS

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__(config)
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
        self.max_text = config.get("max_text", MAX_TEXT)
        if isinstance(self.max_text, bool) or not isinstance(self.max_text, int):
            raise ValueError("'max_text' is a whole number of characters")
        if self.max_text < 1:
            raise ValueError("'max_text' is a whole number of characters above 0")
        # How long one call's matching may take: past the budget its call is refused anyway.
        self.seconds = settings.get().plugins_request_budget_ms / 1000
        self.words: regex.Pattern[str] | None = None
        if words:
            longest_first = sorted(words, key=len, reverse=True)
            alternatives = "|".join(regex.escape(word) for word in longest_first)
            self.words = regex.compile(rf"(?<!\w)(?:{alternatives})(?!\w)", regex.I)
        # A quick look for the words in ASCII text before the expression (which tries every
        # word at every position); for ASCII, lower case is exactly what re.I compares.
        self.ascii_words = (
            tuple(word.lower() for word in words) if all(w.isascii() for w in words) else None
        )
        self.patterns: list[regex.Pattern[str]] = []
        for pattern in patterns:
            try:
                self.patterns.append(regex.compile(pattern))
            except regex.error as exc:
                raise ValueError(f"pattern {pattern!r} is not a regular expression: {exc}") from exc

    def on_request(self, context: RequestContext, body: dict[str, Any]) -> dict[str, Any] | None:
        found = list(places(context.operation, body))
        self._check_size(found)
        deadline = time.monotonic() + self.seconds
        if self.action == "refuse":
            for path, holder, key in found:
                text = holder[key]
                if self._has_words(text, deadline) or any(
                    p.search(text, concurrent=True, timeout=_left(deadline)) for p in self.patterns
                ):
                    raise Refusal(self.message, param=path)
            return None
        changed = False
        for _, holder, key in found:
            text = holder[key]
            if self.words is not None and self._may_have_words(text):
                text = self.words.sub(
                    self.replacement, text, concurrent=True, timeout=_left(deadline)
                )
            for pattern in self.patterns:
                text = pattern.sub(self.replacement, text, concurrent=True, timeout=_left(deadline))
            if text != holder[key]:
                holder[key] = text
                changed = True
        return body if changed else None

    def _check_size(self, found: list[Place]) -> None:
        """Refuses a call with more text than `max_text`: unchecked text is never sent."""
        total = 0
        for path, holder, key in found:
            total += len(holder[key])
            if total > self.max_text:
                raise Refusal(
                    f"This request holds more text than this event's word filter checks "
                    f"({self.max_text} characters in all). Send less text.",
                    code="invalid_request",
                    param=path,
                )

    def _may_have_words(self, text: str) -> bool:
        if self.ascii_words is None or not text.isascii():
            return True
        lowered = text.lower()
        for word in self.ascii_words:  # noqa: SIM110 - a quarter quicker than any() over a generator
            if word in lowered:
                return True
        return False

    def _has_words(self, text: str, deadline: float) -> bool:
        return (
            self.words is not None
            and self._may_have_words(text)
            and self.words.search(text, concurrent=True, timeout=_left(deadline)) is not None
        )


def _left(deadline: float) -> float:
    """Seconds until `deadline`; the regex module takes 0 as no timeout, so at least 1 ms."""
    return max(deadline - time.monotonic(), 0.001)


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
