"""The stream meter finds the usage event, hides it when asked, and never holds back events."""

from __future__ import annotations

import pytest

from shared.streaming import StreamMeter

CHUNK = b'data: {"choices":[{"delta":{"content":"Hi"}}],"usage":null}'
USAGE = b'data: {"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":2,"total_tokens":7}}'
DONE = b"data: [DONE]"


@pytest.mark.parametrize("separator", [b"\n\n", b"\r\n\r\n"])
def test_usage_event_is_read_and_hidden_for_a_client_that_did_not_ask(separator: bytes) -> None:
    meter = StreamMeter(hide_usage=True)
    stream = separator.join([CHUNK, CHUNK, USAGE, DONE]) + separator
    out = meter.feed(stream)
    assert meter.usage == {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}
    assert b"prompt_tokens" not in out
    assert b'"usage":null' not in out  # the injected nulls go too
    assert out.count(b"data: ") == 3 and out.endswith(DONE + separator)
    assert meter.done


def test_usage_event_is_kept_for_a_client_that_asked() -> None:
    meter = StreamMeter(hide_usage=False)
    stream = b"\n\n".join([CHUNK, USAGE, DONE]) + b"\n\n"
    assert meter.feed(stream) == stream
    assert meter.usage is not None and meter.usage["total_tokens"] == 7


def test_a_partial_event_waits_for_its_end_and_nothing_else_does() -> None:
    meter = StreamMeter(hide_usage=False)
    first = meter.feed(CHUNK + b"\n\n" + CHUNK[:20])
    assert first == CHUNK + b"\n\n"
    second = meter.feed(CHUNK[20:] + b"\n\n")
    assert second == CHUNK + b"\n\n"
    assert meter.rest() == b""


def test_completion_tokens_are_estimated_from_the_text_that_passed() -> None:
    meter = StreamMeter(hide_usage=False)
    meter.feed(b"\n\n".join([CHUNK] * 4) + b"\n\n")
    assert meter.usage is None
    assert meter.estimate_completion_tokens() == 4  # "HiHiHiHi" is 4 tokens in cl100k


@pytest.mark.parametrize("separator", [b"\n\n", b"\r\n\r\n"])
def test_a_stream_cut_into_small_pieces_passes_whole(separator: bytes) -> None:
    stream = separator.join([CHUNK, CHUNK, USAGE, DONE]) + separator
    meter = StreamMeter(hide_usage=False)
    out = b"".join(meter.feed(stream[i : i + 7]) for i in range(0, len(stream), 7))
    assert out + meter.rest() == stream
    assert meter.usage is not None and meter.usage["total_tokens"] == 7
    assert meter.done
