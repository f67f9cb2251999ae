"""Plugins through the worker: the shipped word filter refuses and masks, the shipped CSV and
webhook sinks get every usage record, and plugins that fail or stall lose no record, hold no
other call beyond their budget and are named in the log."""

from __future__ import annotations

import asyncio
import csv
import json
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import regex

from local.azurite import Azurite
from shared.errors import ProxyError
from shared.plugins import Plugin, Plugins, Refusal, RequestContext
from shared.plugins.csv_usage import FIELDS
from shared.plugins.wordfilter import WordFilter
from tests.harness import (
    API_VERSION,
    CHAT,
    ROOT,
    App,
    AppHost,
    EventSetup,
    Simulator,
    Storage,
    host_env,
    unique_prefix,
    wait_until,
)
from tests.inprocess import Configured

# AIPROXY_PLUGINS_REQUEST_BUDGET_MS below: room for the quick calls on a busy machine.
REQUEST_BUDGET = 1.0
STRICT_MAX_TEXT = 20_000  # the 'strict' word filter's max_text
# The e-mail pattern of docs/plugins.md: possessive, and starting only where a name can start.
EMAIL_PATTERN = r"(?<![\w.+-])[\w.+-]++@[\w-]++(?:\.[\w-]++)+"
USAGE_BUDGET = 1.0  # AIPROXY_PLUGINS_USAGE_BUDGET_SECONDS below
PLUGINS = ",".join(
    [
        "wordfilter",
        "pii=wordfilter",
        "ondemand=tests.plugin_samples:OnDemand",
        "lenient=tests.plugin_samples:Lenient",
        "stalling=tests.plugin_samples:Stalling",
        "holding=tests.plugin_samples:Holding",
        "strict=wordfilter",
        "csv_usage",
        "webhook_usage",
    ]
)


class Receiver:
    """A webhook receiver on loopback that answers 500 to its first `fail_first` POSTs."""

    def __init__(self, fail_first: int) -> None:
        self.fail_first = fail_first
        self.posts = 0
        self.records: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                with receiver.lock:
                    receiver.posts += 1
                    failing = receiver.posts <= receiver.fail_first
                    if not failing:
                        receiver.records += json.loads(body)["records"]
                self.send_response(500 if failing else 200)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/usage?token=secret"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def request_ids(self) -> set[str]:
        with self.lock:
            return {record["request_id"] for record in self.records}

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def eventually(condition: Callable[[], Any], timeout: float = 15.0) -> Any:
    """`condition()` once it is truthy, or its last value after `timeout` (polled)."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.05)


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    server = Receiver(fail_first=2)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def csv_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("csv") / "usage" / "records.csv"


@pytest.fixture(scope="module")
def plugin_sim(log_dir: Path) -> Iterator[Simulator]:
    server = Simulator(log_dir, name="plugins")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def plugin_prefix() -> str:
    return unique_prefix("plugins")


@pytest.fixture(scope="module")
def hold_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("hold")


@pytest.fixture(scope="module")
def plugin_host(
    configured: Configured,
    plugin_prefix: str,
    receiver: Receiver,
    csv_path: Path,
    hold_dir: Path,
) -> App:
    config = {
        "AIPROXY_PLUGINS": PLUGINS,
        "AIPROXY_PLUGIN_WORDFILTER": json.dumps({"words": ["falcon", "project kestrel"]}),
        "AIPROXY_PLUGIN_PII": json.dumps(
            {
                "patterns": [EMAIL_PATTERN],
                "action": "mask",
                "replacement": "[email]",
            }
        ),
        "AIPROXY_PLUGIN_HOLDING": json.dumps({"dir": str(hold_dir)}),
        # A pattern that backtracks without end on 'aaa…b' (the `re` module takes minutes).
        "AIPROXY_PLUGIN_STRICT": json.dumps(
            {"patterns": ["^(a|aa)+$"], "max_text": STRICT_MAX_TEXT}
        ),
        "AIPROXY_PLUGIN_CSV_USAGE": json.dumps({"path": str(csv_path)}),
        "AIPROXY_PLUGIN_WEBHOOK_USAGE": json.dumps(
            {"url": receiver.url, "attempts": 5, "retry_seconds": 0.2, "batch_seconds": 0.1}
        ),
        "AIPROXY_PLUGINS_REQUEST_BUDGET_MS": str(int(REQUEST_BUDGET * 1000)),
        "AIPROXY_PLUGINS_USAGE_BUDGET_SECONDS": str(USAGE_BUDGET),
    }
    return configured("plugins", prefix=plugin_prefix, **config)


@pytest.fixture(scope="module")
def plugin_storage(azurite: Azurite, plugin_prefix: str) -> Storage:
    return Storage(azurite.connection_string, plugin_prefix)


@pytest.fixture
def party(plugin_host: AppHost, plugin_sim: Simulator) -> EventSetup:
    """A fresh event on the plugins' app host."""
    return EventSetup(plugin_host, plugin_sim)


def azure(host: AppHost, key: str) -> openai.AzureOpenAI:
    return openai.AzureOpenAI(
        azure_endpoint=host.base, api_key=key, api_version=API_VERSION, max_retries=0
    )


def v1(host: AppHost, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{host.base}/openai/v1", api_key=key, max_retries=0)


def upstream_calls(sim: Simulator) -> int:
    return sim.stats()["total_requests"]


def last_upstream_body(sim: Simulator) -> dict[str, Any]:
    return sim.stats()["last_requests"][-1]["body"]


def chat(host: AppHost, key: str, text: str, timeout: float = 30, **extra: Any) -> httpx.Response:
    body = {"messages": [{"role": "user", "content": text}], "max_tokens": 5, **extra}
    return host.http.post(CHAT, json=body, headers={"api-key": key}, timeout=timeout)


# --- the word filter over HTTP ------------------------------------------------------------------

REFUSED_CALLS: dict[str, tuple[Callable[[AppHost, str], Any], str]] = {
    "chat": (
        lambda host, key: azure(host, key).chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "Tell me about FALCON."}]
        ),
        "messages[0].content",
    ),
    "completions": (
        lambda host, key: azure(host, key).completions.create(
            model="gpt-35-turbo-instruct", prompt=["fine", "the falcon flies"], max_tokens=5
        ),
        "prompt[1]",
    ),
    "embeddings": (
        lambda host, key: v1(host, key).embeddings.create(
            model="text-embedding-3-small", input="a falcon"
        ),
        "input",
    ),
    "responses": (
        lambda host, key: v1(host, key).responses.create(
            model="gpt-4o-mini",
            input=[
                {"role": "user", "content": [{"type": "input_text", "text": "Project Kestrel"}]}
            ],
        ),
        "input[0].content[0].text",
    ),
}


@pytest.mark.parametrize("kind", list(REFUSED_CALLS))
def test_a_filtered_word_is_refused_like_azures_content_filter_and_never_sent(
    kind: str, plugin_host: AppHost, party: EventSetup, plugin_sim: Simulator
) -> None:
    call, field = REFUSED_CALLS[kind]
    sent_before = upstream_calls(plugin_sim)
    with pytest.raises(openai.BadRequestError) as refused:
        call(plugin_host, party.key)
    assert refused.value.status_code == 400
    assert refused.value.code == "content_filter"
    error = refused.value.response.json()["error"]
    assert error["param"] == field and error["status"] == 400
    assert "Rephrase" in error["message"]
    assert refused.value.response.headers["x-aiproxy-request-id"]
    assert upstream_calls(plugin_sim) == sent_before


def test_words_are_matched_whole_so_other_words_pass(
    plugin_host: AppHost, party: EventSetup
) -> None:
    assert chat(plugin_host, party.key, "Falconry is an old craft.").status_code == 200


def test_masking_changes_what_the_upstream_receives(
    plugin_host: AppHost, party: EventSetup, plugin_sim: Simulator, plugin_storage: Storage
) -> None:
    reply = azure(plugin_host, party.key).chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "Write to ada@example.com and bob@example.org."}],
        max_tokens=5,
    )
    assert last_upstream_body(plugin_sim)["messages"][0]["content"] == (
        "Write to [email] and [email]."
    )
    v1(plugin_host, party.key).responses.create(
        model="gpt-4o-mini", input="Mail carol@example.net", max_output_tokens=16
    )
    assert last_upstream_body(plugin_sim)["input"] == "Mail [email]"
    first, _ = plugin_storage.usage(party.id, expect=2)
    assert reply.usage is not None and first["prompt_tokens"] == reply.usage.prompt_tokens


# --- what a request hook gets, and what becomes of the body it returns -------------------------


def test_a_request_hook_gets_the_calls_context(
    plugin_host: AppHost, party: EventSetup, plugin_sim: Simulator
) -> None:
    answer = chat(plugin_host, party.key, "[context]")
    assert answer.status_code == 200, answer.text
    note = last_upstream_body(plugin_sim)["messages"][-1]
    assert note["role"] == "system"
    assert json.loads(note["content"]) == {
        "request_id": answer.headers["x-aiproxy-request-id"],
        "event_id": party.id,
        "attendee_id": party.attendee["id"],
        "user": "attendee@example.com",
        "operation": "chat/completions",
        "model_class": "openai-chat",
        "deployment": "gpt-4o-mini",
    }


def test_a_changed_body_is_capped_and_counted_as_it_is_forwarded(
    plugin_host: AppHost, plugin_sim: Simulator
) -> None:
    party = EventSetup(plugin_host, plugin_sim, max_token_cap=100, tokens_per_minute=1500)
    sent_before = upstream_calls(plugin_sim)
    lifted = chat(plugin_host, party.key, "[lift-cap]")
    assert lifted.status_code == 400 and lifted.json()["error"]["code"] == "max_tokens_exceeds_cap"
    assert upstream_calls(plugin_sim) == sent_before
    # The caller's body is small (its worst case about 120 tokens); the body the plugin returns
    # carries 8000 more characters, so the per-minute limit counts about 2100.
    assert chat(plugin_host, party.key, "A short question.").status_code == 200
    padded = chat(plugin_host, party.key, "[pad]")
    assert padded.status_code == 429, padded.text
    message = padded.json()["error"]["message"]
    worst_case = int(message.split("may use up to ")[1].split()[0])
    assert worst_case > 2000, message


# --- usage sinks ------------------------------------------------------------------------------


def make_calls(host: AppHost, key: str, count: int) -> list[str]:
    """`count` calls of several kinds, one streamed; their request ids."""
    client = azure(host, key)
    ids = []
    for i in range(count):
        if i % 3 == 1:
            answer = client.embeddings.with_raw_response.create(
                model="text-embedding-3-small", input=f"text {i}"
            )
        else:
            answer = client.chat.completions.with_raw_response.create(
                model="gpt-4o-mini",
                messages=[{"role": "user", "content": f"call {i}"}],
                max_tokens=4,
                stream=i % 3 == 2,
            )
        ids.append(answer.headers["x-aiproxy-request-id"])
        answer.parse()
    return ids


def logged(host: AppHost, needle: str) -> str:
    """The host's log once it holds `needle` (the worker's lines reach it a moment later)."""
    return eventually(lambda: next((log for log in [host.log()] if needle in log), ""), 5)


def csv_rows(path: Path) -> list[dict[str, str]]:
    if not path.exists():
        return []
    with path.open(newline="") as source:
        return list(csv.DictReader(source))


def test_usage_records_reach_the_csv_file_and_the_webhook_after_its_failures(
    plugin_host: AppHost, party: EventSetup, plugin_storage: Storage, receiver: Receiver,
    csv_path: Path,
) -> None:  # fmt: skip
    ids = make_calls(plugin_host, party.key, 6)
    stored = plugin_storage.usage(party.id, expect=6)
    assert sorted(r["request_id"] for r in stored) == sorted(ids)

    def csv_records() -> dict[str, dict[str, str]]:
        rows = {r["request_id"]: r for r in csv_rows(csv_path) if r["event_id"] == party.id}
        return rows if len(rows) == len(ids) else {}

    rows = eventually(csv_records)
    assert sorted(rows) == sorted(ids)
    assert csv_path.read_text().splitlines()[0] == ",".join(FIELDS)
    for record in stored:
        row = rows[record["request_id"]]
        assert int(row["total_tokens"]) == record["total_tokens"]
        assert row["deployment"] == record["deployment"] and row["streamed"] in ("True", "False")

    assert eventually(lambda: set(ids) <= receiver.request_ids()), receiver.request_ids()
    assert receiver.posts > receiver.fail_first
    sent = {r["request_id"]: r for r in receiver.records if r["event_id"] == party.id}
    assert sent[ids[0]]["total_tokens"] == next(
        r["total_tokens"] for r in stored if r["request_id"] == ids[0]
    )
    assert "PartitionKey" not in sent[ids[0]]
    log = plugin_host.log()
    assert "plugin webhook_usage: " in log and "answered 500" in log
    assert "token=secret" not in log


def test_a_failing_or_stalling_sink_delays_no_call_and_loses_no_record(
    plugin_host: AppHost, party: EventSetup, plugin_storage: Storage
) -> None:
    client = azure(plugin_host, party.key)
    took = []
    for i in range(5):
        started = time.perf_counter()
        client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": f"n {i}"}], max_tokens=3
        )
        took.append(time.perf_counter() - started)
    assert max(took) < USAGE_BUDGET, took  # no call waited for a sink
    assert len(plugin_storage.usage(party.id, expect=5)) == 5

    def logged() -> str:
        log = plugin_host.log()
        failed = "plugin ondemand: " in log and "RuntimeError: refuses every batch" in log
        stalled = "plugin stalling: " in log and f"within its budget of {USAGE_BUDGET:g} s" in log
        return log if failed and stalled else ""

    assert eventually(logged, timeout=USAGE_BUDGET * 5 + 10)


# --- request hooks that fail --------------------------------------------------------------------


def test_a_failing_request_plugin_refuses_the_call_naming_it(
    plugin_host: AppHost, party: EventSetup, plugin_sim: Simulator
) -> None:
    sent_before = upstream_calls(plugin_sim)
    with pytest.raises(openai.InternalServerError) as failed:
        azure(plugin_host, party.key).chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "[raise]"}]
        )
    assert failed.value.status_code == 503 and failed.value.code == "plugin_failed"
    assert "'ondemand' failed" in failed.value.message
    assert failed.value.response.headers["retry-after"] == "1"
    assert upstream_calls(plugin_sim) == sent_before
    request_id = failed.value.response.headers["x-aiproxy-request-id"]
    log = logged(plugin_host, request_id)
    assert f"plugin ondemand: request hook failed on request {request_id}" in log
    assert "RuntimeError: asked to fail" in log


def test_a_stalled_request_plugin_is_cut_at_its_budget_and_holds_no_other_call(
    plugin_host: AppHost, party: EventSetup
) -> None:
    async def timed(client: httpx.AsyncClient, text: str) -> tuple[httpx.Response, float]:
        body = {"messages": [{"role": "user", "content": text}], "max_tokens": 3}
        answer = await client.post(CHAT, json=body, headers={"api-key": party.key})
        return answer, time.perf_counter()

    async def race() -> tuple[float, list[tuple[httpx.Response, float]]]:
        async with httpx.AsyncClient(base_url=plugin_host.base, timeout=30) as client:
            started = time.perf_counter()
            calls = [timed(client, "[stall]")] + [timed(client, f"quick {i}") for i in range(4)]
            return started, await asyncio.gather(*calls)

    started, [(stalled, stalled_end), *quick] = asyncio.run(race())
    assert stalled.status_code == 503, stalled.text
    error = stalled.json()["error"]
    assert error["code"] == "plugin_failed"
    assert f"'ondemand' did not finish within {REQUEST_BUDGET * 1000:.0f} ms" in error["message"]
    assert REQUEST_BUDGET <= stalled_end - started < REQUEST_BUDGET + 3
    for answer, ended in quick:
        assert answer.status_code == 200, answer.text
        assert ended < stalled_end  # none waited for the stalled hook
    request_id = stalled.headers["x-aiproxy-request-id"]
    log = logged(plugin_host, request_id)
    assert (
        f"plugin ondemand: request hook did not finish within {REQUEST_BUDGET * 1000:.0f} ms"
        f" on request {request_id}" in log
    )


def test_a_slow_plain_hook_holds_no_other_call_while_it_runs(
    plugin_host: AppHost, party: EventSetup, hold_dir: Path
) -> None:
    with ThreadPoolExecutor(1) as pool:
        held = pool.submit(chat, plugin_host, party.key, "[hold] this one")
        try:
            assert wait_until(lambda: (hold_dir / "started").exists(), 30)
            quick = chat(plugin_host, party.key, "quick", timeout=10)
            assert quick.status_code == 200, quick.text
            answer = held.result(timeout=30)  # refused at its budget ...
            assert not (hold_dir / "done").exists()  # ... while its hook is still at work
        finally:
            (hold_dir / "release").write_text("")
    assert answer.status_code == 503, answer.text
    assert answer.json()["error"]["code"] == "plugin_failed"
    message = answer.json()["error"]["message"]
    assert f"'holding' did not finish within {REQUEST_BUDGET * 1000:.0f} ms" in message
    assert wait_until(lambda: (hold_dir / "done").exists(), 30)


def test_a_backtracking_filter_pattern_fails_its_call_within_the_budget_only(
    plugin_host: AppHost, party: EventSetup, plugin_sim: Simulator
) -> None:
    sent = upstream_calls(plugin_sim)
    with ThreadPoolExecutor(1) as pool:
        started = time.perf_counter()
        crafted = pool.submit(chat, plugin_host, party.key, "a" * 60 + "b", timeout=20)
        quick = chat(plugin_host, party.key, "quick", timeout=10)
        answer = crafted.result(timeout=30)
        took = time.perf_counter() - started
    assert quick.status_code == 200, quick.text
    assert answer.status_code == 503, answer.text
    assert answer.json()["error"]["code"] == "plugin_failed"
    assert "'strict'" in answer.json()["error"]["message"]
    assert took < REQUEST_BUDGET + 5
    assert upstream_calls(plugin_sim) == sent + 1  # the quick call only
    request_id = answer.headers["x-aiproxy-request-id"]
    assert "plugin strict: request hook" in logged(plugin_host, request_id)


@pytest.mark.e2e
def test_a_catastrophic_pattern_in_the_worker_stalls_no_other_call(
    app_hosts: Callable[..., AppHost], plugin_sim: Simulator
) -> None:
    """Through the host stand-in and the worker, attendees on the official SDK: while one call's
    text keeps a backtracking pattern busy for the whole budget, other calls go on being
    answered, and the busy one is refused at its budget without reaching the upstream."""
    budget = 3.0
    host = app_hosts(
        "plugins-worker",
        prefix=unique_prefix("plugw"),
        AIPROXY_PLUGINS="strict=wordfilter",
        AIPROXY_PLUGIN_STRICT=json.dumps({"patterns": ["^(a|aa)+$"]}),
        AIPROXY_PLUGINS_REQUEST_BUDGET_MS=str(int(budget * 1000)),
    )
    party = EventSetup(host, plugin_sim)
    crafted_client, quick_client = azure(host, party.key), azure(host, party.key)
    messages = [{"role": "user", "content": "a" * 60 + "b"}]
    sent = upstream_calls(plugin_sim)
    quick: list[float] = []  # when each other call was answered
    refused_at: list[float] = []

    def crafted_call() -> Any:
        try:
            return crafted_client.chat.completions.create(
                model="gpt-4o-mini", messages=messages, max_tokens=5
            )
        finally:
            refused_at.append(time.monotonic())

    with ThreadPoolExecutor(1) as pool:
        crafted = pool.submit(crafted_call)
        for _ in range(500):  # bounded: a frozen worker would end the loop by its timeouts
            if crafted.done():
                break
            answer = quick_client.with_options(timeout=10).chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], max_tokens=5
            )
            assert answer.choices
            quick.append(time.monotonic())
        with pytest.raises(openai.APIStatusError) as refused:
            crafted.result(timeout=30)
    assert refused.value.status_code == 503 and refused.value.code == "plugin_failed"
    assert "'strict'" in refused.value.message
    # The pattern ran the whole budget, so calls answered in its second half were answered
    # while it ran (a frozen worker answers none until it ends, then one at most).
    during = [when for when in quick if refused_at[0] - budget / 2 < when < refused_at[0]]
    assert len(during) >= 3, (len(quick), [round(refused_at[0] - when, 3) for when in quick])
    assert upstream_calls(plugin_sim) == sent + len(quick)  # the crafted call was never sent


def test_more_text_than_the_filter_checks_is_refused_naming_the_field(
    plugin_host: AppHost, party: EventSetup, plugin_sim: Simulator
) -> None:
    sent = upstream_calls(plugin_sim)
    body = {
        "messages": [
            {"role": "user", "content": "x" * 10},
            {"role": "user", "content": "y" * STRICT_MAX_TEXT},
        ],
        "max_tokens": 5,
    }
    answer = plugin_host.http.post(CHAT, json=body, headers={"api-key": party.key})
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["code"] == "invalid_request" and error["param"] == "messages[1].content"
    assert f"({STRICT_MAX_TEXT} characters in all)" in error["message"]
    assert upstream_calls(plugin_sim) == sent
    fits = {"messages": [{"role": "user", "content": "y" * STRICT_MAX_TEXT}], "max_tokens": 5}
    assert plugin_host.http.post(CHAT, json=fits, headers={"api-key": party.key}).status_code == 200


def test_a_failing_fail_open_plugin_lets_the_call_through_unchanged(
    plugin_host: AppHost, party: EventSetup, plugin_sim: Simulator
) -> None:
    answer = chat(plugin_host, party.key, "[lenient] hello")
    assert answer.status_code == 200, answer.text
    assert last_upstream_body(plugin_sim)["messages"][0]["content"] == "[lenient] hello"
    request_id = answer.headers["x-aiproxy-request-id"]
    line = next(line for line in logged(plugin_host, request_id).splitlines() if request_id in line)
    assert f"plugin lenient: request hook failed on request {request_id}" in line
    assert "the call goes on without it" in line


# --- loading ------------------------------------------------------------------------------------


@pytest.mark.e2e
def test_a_plugin_that_cannot_load_stops_start_up_naming_it(
    azurite: Azurite, log_dir: Path
) -> None:
    env = host_env(
        azurite.connection_string,
        unique_prefix("badplugin"),
        AIPROXY_PLUGINS="strict=wordfilter",
        AIPROXY_PLUGIN_STRICT=json.dumps({"patterns": ["(unclosed"]}),
    )
    with pytest.raises(RuntimeError, match="exited"):
        AppHost(log_dir, env, name="badplugin")
    [log] = log_dir.glob("badplugin-*.log")
    text = log.read_text()
    assert "plugin 'strict': AIPROXY_PLUGIN_STRICT: pattern '(unclosed' is not a regular" in text


# --- in one process: the parts the HTTP tests cannot reach -----------------------------------


def test_the_documented_email_pattern_stays_linear_on_hostile_text() -> None:
    """The docs' example is the pattern tested here, and on the most text a call may carry it
    ends far within a budget that the textbook pattern runs out of."""
    line = next(
        line
        for line in (ROOT / "docs" / "plugins.md").read_text().splitlines()
        if line.startswith("AIPROXY_PLUGIN_PII=")
    )
    (documented,) = json.loads(line.split("=", 1)[1].strip("'"))["patterns"]
    assert documented == EMAIL_PATTERN
    masker = WordFilter({"patterns": [documented], "action": "mask", "replacement": "[email]"})
    masker.seconds = REQUEST_BUDGET
    context = RequestContext("r", "e", "a", "u", "chat/completions", "openai-chat", "d")
    hostile = "a" * 32_768 + "@" + "a-" * 16_383  # 65,536 characters: the default max_text
    textbook = regex.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+")
    with pytest.raises(TimeoutError):  # quadratic: every start runs to the end
        textbook.sub("[email]", hostile, timeout=REQUEST_BUDGET)
    for text in (hostile, "a@" * 32_768, "a@a." * 16_384, "x." * 32_768):
        body = {"messages": [{"role": "user", "content": text}]}
        masker.on_request(context, body)  # within the budget, else TimeoutError
    body = {"messages": [{"role": "user", "content": "write to ada.l@ex-ample.co.uk today"}]}
    assert masker.on_request(context, body) is body
    assert body["messages"][0]["content"] == "write to [email] today"


def test_the_word_filter_reads_only_the_text_a_model_gets() -> None:
    masking = WordFilter({"words": ["secret"], "action": "mask", "replacement": "#"})
    context = RequestContext("r", "e", "a", "u", "chat/completions", "openai-chat", "d")
    body = {
        "messages": [
            {"role": "system", "content": "A SECRET plan; secretive is fine."},
            {"role": "user", "content": [{"type": "text", "text": "secret"}, {"type": "image"}]},
        ],
        "user": "secret",
    }
    assert masking.on_request(context, body) is body
    assert body["messages"][0]["content"] == "A # plan; secretive is fine."
    assert body["messages"][1]["content"] == [{"type": "text", "text": "#"}, {"type": "image"}]
    assert body["user"] == "secret"  # not text for the model
    completions = RequestContext("r", "e", "a", "u", "completions", "openai-completions", "d")
    tokens = {"prompt": [[1, 2, 3]]}
    assert masking.on_request(completions, tokens) is None
    with pytest.raises(ValueError, match="unknown keys"):
        WordFilter({"word": ["typo"]})


@pytest.mark.parametrize(
    ("text", "refused"),
    [
        ("The FALCON lands.", True),
        ("Über den Falcon-Plan", True),  # not ASCII: the expression alone decides
        ("Falconry is old.", False),
        ("Ünïcode falconry", False),
        ("our project  kestrel", False),  # a phrase matches as written
        ("Project Kestrel!", True),
    ],
)
def test_words_match_whole_in_any_case(text: str, refused: bool) -> None:
    refusing = WordFilter({"words": ["falcon", "project kestrel"]})
    context = RequestContext("r", "e", "a", "u", "embeddings", "openai-embeddings", "d")
    try:
        refusing.on_request(context, {"input": text})
    except Refusal as refusal:
        assert refused and refusal.param == "input" and refusal.code == "content_filter"
    else:
        assert not refused


class Misbehaving(Plugin):
    """Plain request hooks that break the rules in the way the body's `how` says."""

    def on_request(self, context: RequestContext, body: dict[str, Any]) -> Any:
        if body["how"] == "slow":
            time.sleep(1.0)  # in its thread, far past a 50 ms budget
            return None
        if body["how"] == "text":
            return "not a body"
        if body["how"] == "set":
            return {"input": {"a", "set"}}
        raise Refusal("Not you.", code="upstream_error")  # a 5xx is no refusal


@pytest.mark.parametrize("how", ["text", "set", "upstream_error"])
def test_a_hook_that_breaks_the_rules_fails_the_call_and_is_named_in_the_log(
    how: str, caplog: pytest.LogCaptureFixture
) -> None:
    plugins = Plugins([("odd", Misbehaving({}))], request_budget_seconds=0.05)
    context = RequestContext("r7", "e", "a", "u", "chat/completions", "openai-chat", "d")
    with pytest.raises(ProxyError) as failed:
        asyncio.run(plugins.screen(context, {"how": how}))
    assert failed.value.code == "plugin_failed" and failed.value.status == 503
    expected = {
        "text": "not a dict or None",
        "set": "returned a body that is not JSON",
        "upstream_error": "not a 4xx code of the contract",
    }[how]
    assert "plugin odd: request hook failed on request r7" in caplog.text
    assert expected in caplog.text


def test_a_slow_plain_hook_is_cut_at_its_budget_like_an_async_one(
    caplog: pytest.LogCaptureFixture,
) -> None:
    plugins = Plugins([("odd", Misbehaving({}))], request_budget_seconds=0.05)
    context = RequestContext("r8", "e", "a", "u", "chat/completions", "openai-chat", "d")
    started = time.perf_counter()
    with pytest.raises(ProxyError) as failed:
        asyncio.run(plugins.screen(context, {"how": "slow"}))
    assert time.perf_counter() - started < 0.5  # not the hook's 1 s
    assert failed.value.code == "plugin_failed"
    assert "'odd' did not finish within 50 ms" in failed.value.message
    assert "plugin odd: request hook did not finish within 50 ms on request r8" in caplog.text


class Blocked(Plugin):
    """A sink stuck on its first batch until released."""

    queue_size = 3
    batch_size = 1

    def __init__(self) -> None:
        super().__init__({})
        self.release = asyncio.Event()

    async def on_usage(self, records: list[dict[str, Any]]) -> None:
        await self.release.wait()


def test_a_full_sink_queue_counts_what_it_skips_and_shutdown_counts_what_is_left(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def run() -> dict[str, int]:
        plugins = Plugins([("stuck", Blocked())], usage_budget_seconds=30)
        assert plugins.observer is not None
        for i in range(10):
            plugins.observer({"PartitionKey": "p", "RowKey": str(i), "request_id": str(i)})
            await asyncio.sleep(0)  # the sink takes its first batch
        await plugins.close(timeout=0.1)
        return plugins.stats()["stuck"]

    assert asyncio.run(run()) == {
        "queued": 0, "delivered": 0, "undelivered": 4, "skipped": 6, "failed_attempts": 0,
    }  # fmt: skip
    assert "plugin stuck: usage records skipped, its queue being full: 5 (6 in all)" in caplog.text
    assert "plugin stuck: usage records not delivered: 4 (4 in all)" in caplog.text


def test_without_plugins_the_hot_path_has_nothing_to_call() -> None:
    plugins = Plugins([])
    assert plugins.requests == () and plugins.observer is None
