"""The stream meter finds the usage event, hides it when asked, and never holds back events."""

from __future__ import annotations

import pytest

from shared.pipeline.streaming import StreamMeter

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


def _event(kind: str, data: str, separator: bytes = b"\n\n") -> bytes:
    return f"event: {kind}".encode() + separator[: len(separator) // 2] + b"data: " + data.encode()


RESPONSE_STREAM = [
    _event(
        "response.created", '{"type":"response.created","response":{"id":"resp_1","usage":null}}'
    ),
    *[
        _event(
            "response.output_text.delta", f'{{"type":"response.output_text.delta","delta":"w{i}"}}'
        )
        for i in range(3)
    ],
    _event(
        "response.output_item.done",
        '{"type":"response.output_item.done","item":{"type":"reasoning","encrypted_content":"E"}}',
    ),
    _event(
        "response.completed",
        '{"type":"response.completed","response":{"id":"resp_1","usage":{"input_tokens":4,'
        '"output_tokens":3,"total_tokens":7}}}',
    ),
]


def _rewrite(value: dict) -> None:
    if isinstance(value.get("response"), dict):
        value["response"]["id"] = "resp_SEALED"
    if isinstance(value.get("item"), dict):
        value["item"]["encrypted_content"] = "TAG." + value["item"]["encrypted_content"]


@pytest.mark.parametrize("size", [1, 7, 64, 10_000])
def test_a_responses_stream_is_rewritten_alike_however_it_is_cut(size: int) -> None:
    from shared.pipeline.streaming import ResponseStreamMeter

    stream = b"\n\n".join(RESPONSE_STREAM) + b"\n\n"
    meter = ResponseStreamMeter(_rewrite)
    out = b"".join(meter.feed(stream[i : i + size]) for i in range(0, len(stream), size))
    assert meter.rest() == b""
    assert meter.done and meter.usage == {"input_tokens": 4, "output_tokens": 3, "total_tokens": 7}
    assert b"resp_1" not in out and out.count(b"resp_SEALED") == 2
    assert b'"encrypted_content":"TAG.E"' in out
    for delta in RESPONSE_STREAM[1:4]:
        assert delta + b"\n\n" in out  # text deltas pass byte for byte
    assert out.count(b"event: ") == len(RESPONSE_STREAM)
    assert meter.estimate_output_tokens() > 0


def test_a_responses_stream_without_its_last_event_is_not_done() -> None:
    from shared.pipeline.streaming import ResponseStreamMeter

    meter = ResponseStreamMeter(_rewrite)
    meter.feed(b"\n\n".join(RESPONSE_STREAM[:3]) + b"\n\n")
    assert not meter.done and meter.usage is None
