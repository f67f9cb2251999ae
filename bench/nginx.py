"""A very fast fake Azure OpenAI upstream: nginx serving canned answers from memory.

nginx cannot branch on the request body, so the stream is served under its own deployment
name: `POST /openai/deployments/bench-stream/chat/completions` answers with an SSE stream of
35 events (`text/event-stream`, chunked), every other `POST /openai/deployments/{any}/chat/
completions` with a canned `chat.completion` JSON. Both carry Azure's shape: content filter
results, `system_fingerprint` and a `usage` object; the stream is what Azure sends when the
request asked for `stream_options.include_usage` (`"usage":null` in every chunk, then a final
`{"choices":[],"usage":{...}}` chunk, then `data: [DONE]`).

The answers are `return 200 '...'` literals. `return` would send a Content-Length; the SSI
filter (switched on for `text/event-stream` only, with nothing to include) clears it, so the
stream goes out with `Transfer-Encoding: chunked`, as Azure's does. nginx writes the whole
stream at once, so a proxy reads it in one or a few socket reads: the cheapest stream there is.
"""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path
from typing import Any

from local.azurite import wait_for_port
from local.process import stop
from local.simulator import CHOICE_FILTER_RESULTS, PROMPT_FILTER_RESULTS

API_KEY = "bench-upstream-key"
STREAM_DEPLOYMENT = "bench-stream"
JSON_DEPLOYMENT = "bench"
MODEL = "gpt-4o-mini-2024-07-18"
FINGERPRINT = "fp_5f2a9c1d0e"
CREATED = 1763800000
STREAM_EVENTS = 35  # prompt filter chunk, role chunk, 30 content chunks, finish, usage, [DONE]
PROMPT_TOKENS = 27

# The same content-filter results Azure attaches, as the simulator sends them.
_CHOICE_FILTERS = CHOICE_FILTER_RESULTS
_PROMPT_FILTERS = PROMPT_FILTER_RESULTS
# 30 pieces, one token each.
_TEXT = (
    "Rivers carry water from the mountains to the sea , shaping valleys , feeding "
    "farms and cities , and giving homes to fish , birds and people along the way"
)
_PIECES = _TEXT.split()


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


def _pieces() -> list[str]:
    out = []
    for i, piece in enumerate(_PIECES):
        out.append(piece if i == 0 or piece in (",", ".") else " " + piece)
    out[-1] += "."
    return out


def _usage(completion: int) -> dict[str, Any]:
    return {
        "completion_tokens": completion,
        "completion_tokens_details": {
            "accepted_prediction_tokens": 0,
            "audio_tokens": 0,
            "reasoning_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
        "prompt_tokens": PROMPT_TOKENS,
        "prompt_tokens_details": {"audio_tokens": 0, "cached_tokens": 0},
        "total_tokens": PROMPT_TOKENS + completion,
    }


def completion_body() -> str:
    """A chat.completion as Azure OpenAI answers it."""
    pieces = _pieces()
    return _dumps(
        {
            "choices": [
                {
                    "content_filter_results": _CHOICE_FILTERS,
                    "finish_reason": "stop",
                    "index": 0,
                    "logprobs": None,
                    "message": {
                        "annotations": [],
                        "content": "".join(pieces),
                        "refusal": None,
                        "role": "assistant",
                    },
                }
            ],
            "created": CREATED,
            "id": "chatcmpl-BENCH0000000000000000000000001",
            "model": MODEL,
            "object": "chat.completion",
            "prompt_filter_results": _PROMPT_FILTERS,
            "system_fingerprint": FINGERPRINT,
            "usage": _usage(len(pieces)),
        }
    )


def stream_events() -> list[str]:
    """The `data:` payloads of the stream, in order (the last is `[DONE]`)."""
    pieces = _pieces()
    base = {
        "created": CREATED,
        "id": "chatcmpl-BENCH0000000000000000000000002",
        "model": MODEL,
        "object": "chat.completion.chunk",
        "system_fingerprint": FINGERPRINT,
    }

    def chunk(delta: dict[str, Any], finish: str | None = None, filters: bool = True) -> str:
        choice = {
            "content_filter_results": _CHOICE_FILTERS if filters else {},
            "delta": delta,
            "finish_reason": finish,
            "index": 0,
            "logprobs": None,
        }
        return _dumps({"choices": [choice], **base, "usage": None})

    events = [
        _dumps(
            {
                "choices": [],
                "created": 0,
                "id": "",
                "model": "",
                "object": "",
                "prompt_filter_results": _PROMPT_FILTERS,
            }
        ),
        chunk({"content": "", "refusal": None, "role": "assistant"}, filters=False),
    ]
    events += [chunk({"content": piece}) for piece in pieces]
    events.append(chunk({}, "stop", filters=False))
    events.append(_dumps({"choices": [], **base, "usage": _usage(len(pieces))}))
    events.append("[DONE]")
    assert len(events) == STREAM_EVENTS, len(events)
    return events


def stream_body() -> str:
    return "".join(f"data: {event}\n\n" for event in stream_events())


def _literal(text: str) -> str:
    """A single-quoted nginx string; the canned bodies hold no quote, backslash or `$`."""
    assert not any(c in text for c in "'\\$"), "canned body not safe for an nginx literal"
    return f"'{text}'"


def _answer(name: str, text: str) -> str:
    """`return 200 <text>`; nginx takes at most 4 KiB in one config token, so longer bodies
    are `set` into variables in pieces and joined by the `return`."""
    if len(text) < 3000:
        return f"return 200 {_literal(text)};"
    parts = [text[i : i + 3000] for i in range(0, len(text), 3000)]
    lines = [f"set ${name}{i} {_literal(part)};" for i, part in enumerate(parts)]
    joined = "".join(f"${name}{i}" for i in range(len(parts)))
    return "\n            ".join([*lines, f'return 200 "{joined}";'])


def config(directory: Path, ports: list[int]) -> str:
    listens = "\n".join(f"        listen 127.0.0.1:{port};" for port in ports)
    unauthorized = _dumps(
        {"error": {"code": "401", "message": "Access denied due to invalid subscription key."}}
    )
    not_found = _dumps({"error": {"code": "404", "message": "Resource not found"}})
    common = f"""
            if ($request_method != POST) {{ return 405; }}
            if ($http_api_key != "{API_KEY}") {{ return 401 {_literal(unauthorized)}; }}
            add_header apim-request-id "00000000-0000-4000-8000-000000000000" always;
            add_header x-ratelimit-remaining-requests "999" always;
            add_header x-ratelimit-remaining-tokens "999000" always;
            add_header x-ms-region "Sweden Central" always;"""
    return f"""worker_processes 1;
pid {directory}/nginx.pid;
error_log {directory}/error.log warn;
events {{
    worker_connections 8192;
    multi_accept on;
}}
http {{
    access_log off;
    server_tokens off;
    keepalive_timeout 75s;
    keepalive_requests 10000000;
    client_body_buffer_size 64k;
    client_body_temp_path {directory}/client_body;
    proxy_temp_path {directory}/proxy;
    fastcgi_temp_path {directory}/fastcgi;
    uwsgi_temp_path {directory}/uwsgi;
    scgi_temp_path {directory}/scgi;
    server {{
{listens}
        default_type application/json;
        location ^~ /openai/deployments/{STREAM_DEPLOYMENT}/chat/completions {{
            {common}
            types {{ }}
            default_type text/event-stream;
            chunked_transfer_encoding on;
            ssi on;
            ssi_types text/event-stream;
            add_header cache-control "no-cache, must-revalidate" always;
            {_answer("sse", stream_body())}
        }}
        location ~ ^/openai/deployments/[^/]+/chat/completions$ {{
            {common}
            {_answer("json", completion_body())}
        }}
        location / {{
            return 404 {_literal(not_found)};
        }}
    }}
}}
"""


class FakeUpstream:
    """nginx in the foreground (`daemon off`), with its prefix, pid and logs in `directory`."""

    def __init__(self, directory: Path, ports: list[int], cpu: int | None = None) -> None:
        self.directory = directory
        self.ports = ports
        self.cpu = cpu
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def urls(self) -> list[str]:
        return [f"http://127.0.0.1:{port}" for port in self.ports]

    def start(self) -> FakeUpstream:
        self.directory.mkdir(parents=True, exist_ok=True)
        conf = self.directory / "nginx.conf"
        conf.write_text(config(self.directory, self.ports))
        args = ["nginx", "-p", str(self.directory), "-c", str(conf), "-g", "daemon off;"]
        if self.cpu is not None:
            args = ["taskset", "-c", str(self.cpu), *args]
        check = subprocess.run([*args[:-2], "-t"], capture_output=True, text=True)
        if check.returncode != 0:
            raise RuntimeError(f"nginx rejected the generated config:\n{check.stderr}")
        self.process = subprocess.Popen(
            args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
        )
        for port in self.ports:
            wait_for_port(port, process=self.process)
        return self

    def error_log(self) -> str:
        path = self.directory / "error.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        if self.process is not None:
            stop(self.process, signal.SIGQUIT)  # graceful: workers finish, master exits
        self.process = None


def request_body(stream: bool) -> bytes:
    """The same request as bench/chat.lua sends."""
    body: dict[str, Any] = {
        "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "Write one sentence about rivers."},
        ],
        "max_tokens": 128,
    }
    if stream:
        body["stream"] = True
    return json.dumps(body, separators=(",", ":")).encode()
