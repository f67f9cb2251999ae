"""The `aiproxy` command line sets up an event from nothing, issues keys and reports usage, as the
operator (the operator key) or as an organiser (an Entra token, pasted or fetched)."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import re
import stat
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from unittest import mock

import httpx
import pytest

import cli.main as cli_main
from local.azurite import free_port
from tests.entra_issuer import LocalIssuer
from tests.harness import (
    FUNCTION_KEY,
    OPERATOR_KEY,
    SIM_KEY,
    AppHost,
    Simulator,
    unique_prefix,
    wait_until,
    window,
)

AIPROXY = Path(sys.executable).with_name("aiproxy")
ROOT = Path(__file__).resolve().parent.parent
NUMBERS = ("requests", "prompt_tokens", "completion_tokens", "total_tokens", "units")
KEY = re.compile(r"^aip-[A-Za-z0-9]{32}$")


def environment(host: AppHost | None, env: dict[str, str] | None) -> dict[str, str]:
    """The environment a command sees: the endpoint and the operator key of `host`, then `env`
    (none of the caller's own AIPROXY_ or AZURE_ settings)."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("AIPROXY_", "AZURE_"))}
    if host is not None:
        environ |= {"AIPROXY_ENDPOINT": host.base, "AIPROXY_OPERATOR_KEY": OPERATOR_KEY}
    return environ | (env or {})


def cli(
    host: AppHost | None,
    *args: str,
    env: dict[str, str] | None = None,
    stdin: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run one `aiproxy` command in this process (what the script runs, `cli.main.run`), with
    its own environment, stdin and captured stdout and stderr; the exit code as a process's."""
    out, err = io.StringIO(), io.StringIO()
    try:
        with (
            mock.patch("sys.stdin", io.StringIO(stdin or "")),
            contextlib.redirect_stdout(out),
            contextlib.redirect_stderr(err),
        ):
            code = cli_main.run(list(args), environment(host, env))
    except SystemExit as stop:  # argparse: --help, or a command line it cannot parse
        code = stop.code if isinstance(stop.code, int) else 1 if stop.code else 0
    return subprocess.CompletedProcess(["aiproxy", *args], code, out.getvalue(), err.getvalue())


def process(
    host: AppHost | None,
    *args: str,
    env: dict[str, str] | None = None,
    stdout: int = subprocess.PIPE,
) -> subprocess.CompletedProcess[str]:
    """Run the installed `aiproxy` script as a process of its own: for what only a process shows
    (its entry point, a closed pipe, a PATH of its own for the Azure CLI)."""
    assert AIPROXY.exists(), "the aiproxy script is not installed: run `make setup`"
    environ = environment(host, env)
    # The script imports `cli` from where the package was installed: run this checkout's.
    environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), environ.get("PYTHONPATH")]))
    return subprocess.run(
        [str(AIPROXY), *args],
        env=environ,
        stdout=stdout,
        stderr=subprocess.PIPE,
        text=True,
        timeout=120,
    )


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, (result.args, result.stdout, result.stderr)
    return result.stdout


def failed(result: subprocess.CompletedProcess[str], code: int) -> str:
    """The one-line error of a failed command."""
    assert result.returncode == code, (result.args, result.returncode, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.startswith("aiproxy: error:")]
    assert len(lines) == 1, result.stderr
    return lines[0]


def parse_table(text: str) -> tuple[list[dict[str, str]], dict[str, str] | None]:
    """Rows of a printed table (columns cut where the dashes under the header are), and its
    totals line when it has one."""
    lines = text.rstrip("\n").splitlines()
    spans = [m.span() for m in re.finditer(r"-+", lines[1])]
    header = [lines[0][a:b].strip() for a, b in spans]
    body = [line for line in lines[2:] if line.strip() and not set(line) <= {"-", " "}]
    rows = [
        {h: line[a:b].strip() for h, (a, b) in zip(header, spans, strict=True)} for line in body
    ]
    if rows == [] or body == ["(none)"]:
        return [], None
    total = rows.pop() if rows[-1][header[0]] == "total" else None
    return rows, total


def chat(base: str, key: str, content: str) -> dict[str, Any]:
    path = "/openai/deployments/gpt-4o-mini/chat/completions?api-version=2024-10-21"
    body = {"messages": [{"role": "user", "content": content}], "max_tokens": 20}
    response = httpx.post(base + path, json=body, headers={"api-key": key}, timeout=30)
    assert response.status_code == 200, response.text
    return response.json()["usage"]


def test_an_event_from_nothing_to_a_usage_report(
    host: AppHost, sim: Simulator, tmp_path: Path
) -> None:
    resource = ok(
        cli(
            host,
            *("resources", "add", "--name", "simulated gpt-4o-mini", "--deployment"),
            *("gpt-4o-mini", "--model-class", "openai-chat", "--url", sim.url, "--api-key", "-"),
            stdin=SIM_KEY + "\n",
        )
    ).strip()
    assert re.fullmatch(r"[0-9a-f]{16}", resource)
    span = window(zone="UTC")
    event_id = ok(
        cli(
            host,
            *("events", "create", "--name", "CLI workshop", "--starts-at", span["starts_at"]),
            *("--ends-at", span["ends_at"], "--time-zone", "UTC", "--max-token-cap", "256"),
            *("--daily-request-cap", "100", "--shared-code", "cli-code"),
        )
    ).strip()
    event = host.manage.get(f"/events/{event_id}").json()
    assert (event["name"], event["max_token_cap"], event["shared_code"]) == (
        "CLI workshop",
        256,
        "cli-code",
    )
    attach = cli(host, "catalog", "attach", "--event", event_id, "--resource", resource)
    ok(attach)
    assert "attached" in attach.stderr
    catalog, _ = parse_table(ok(cli(host, "catalog", "list", "--event", event_id)))
    assert [(r["id"], r["deployment"]) for r in catalog] == [(resource, "gpt-4o-mini")]

    # 50 users from a CSV with a header, a blank line and one repeat.
    users = [f"user{i:02d}@example.com" for i in range(50)]
    lines = [
        "email,team",
        *(f"{u},team{i % 5}" for i, u in enumerate(users)),
        "",
        "USER07@example.com,x",
    ]
    (tmp_path / "users.csv").write_text("\n".join(lines) + "\n")
    keys_csv = tmp_path / "keys.csv"
    bulk = cli(
        host,
        *("attendees", "bulk", "--event", event_id),
        *("--input", str(tmp_path / "users.csv"), "--output", str(keys_csv)),
    )
    ok(bulk)
    assert "50/50" in bulk.stderr and "50 keys (50 new, 0 existing)" in bulk.stderr
    with keys_csv.open() as handle:
        issued = list(csv.DictReader(handle))
    assert [row["user"] for row in issued] == users
    assert all(KEY.match(row["api_key"]) for row in issued)
    assert len({row["api_key"] for row in issued}) == 50
    assert stat.S_IMODE(keys_csv.stat().st_mode) == 0o600
    listed = host.manage.get(f"/events/{event_id}/attendees").json()
    assert {a["id"]: a["user"] for a in listed} == {r["attendee_id"]: r["user"] for r in issued}

    # Again: the same keys, none new.
    again = cli(
        host,
        *("attendees", "bulk", "--event", event_id, "--quiet"),
        *("--input", str(tmp_path / "users.csv"), "--output", "-"),
    )
    assert list(csv.DictReader(io.StringIO(ok(again)))) == issued
    assert "0 new, 50 existing" in again.stderr

    # Some proxied calls with some of the keys.
    plan = {0: 3, 1: 2, 17: 1}
    expected: dict[str, dict[str, int]] = {}
    for index, calls in plan.items():
        totals = Counter({name: 0 for name in NUMBERS})
        for n in range(calls):
            usage = chat(host.base, issued[index]["api_key"], f"question {n} " * (index + 1))
            totals.update({k: usage[k] for k in ("prompt_tokens", "completion_tokens")})
            totals.update(total_tokens=usage["total_tokens"], requests=1)
        expected[issued[index]["attendee_id"]] = dict(totals)
    grand = {name: sum(e[name] for e in expected.values()) for name in NUMBERS}
    assert grand["requests"] == 6 and grand["total_tokens"] > 0

    report = f"/events/{event_id}/usage"
    wait_until(lambda: host.manage.get(report).json()["totals"]["requests"] >= 6, timeout=30)

    table = ok(cli(host, "usage", "--event", event_id, "--group-by", "attendee"))
    rows, total = parse_table(table)
    used = {r["attendee_id"]: r for r in rows if int(r["requests"])}
    assert set(used) == set(expected)
    for attendee_id, numbers in expected.items():
        assert {n: int(used[attendee_id][n]) for n in NUMBERS} == numbers
        assert used[attendee_id]["user"] == next(
            r["user"] for r in issued if r["attendee_id"] == attendee_id
        )
    assert total is not None and {n: int(total[n]) for n in NUMBERS} == grand
    assert int(total["refused"]) == 0

    as_csv = ok(
        cli(host, "usage", "--event", event_id, "--group-by", "attendee", "--format", "csv")
    )
    assert as_csv.splitlines()[0].startswith("attendee_id,user," + ",".join(NUMBERS) + ",")
    assert "refused_requests_per_minute" in as_csv.splitlines()[0]
    csv_rows = {r["attendee_id"]: r for r in csv.DictReader(io.StringIO(as_csv))}
    for attendee_id, numbers in expected.items():
        assert {n: int(csv_rows[attendee_id][n]) for n in NUMBERS} == numbers
    assert sum(int(r["requests"]) for r in csv_rows.values()) == 6

    by_deployment, total = parse_table(
        ok(cli(host, "usage", "--event", event_id, "--group-by", "deployment"))
    )
    assert [(r["deployment"], int(r["requests"])) for r in by_deployment] == [("gpt-4o-mini", 6)]
    assert total is not None and int(total["total_tokens"]) == grand["total_tokens"]
    by_day = ok(cli(host, "usage", "--event", event_id, "--group-by", "day", "--format", "csv"))
    days = list(csv.DictReader(io.StringIO(by_day)))
    assert sum(int(d["requests"]) for d in days) == 6
    assert datetime.now(UTC).strftime("%Y-%m-%d") in {d["day"] for d in days}
    by_hour, total = parse_table(ok(cli(host, "usage", "--event", event_id, "--group-by", "hour")))
    assert sum(int(r["requests"]) for r in by_hour) == 6
    assert total is not None and int(total["new_attendees"]) == len(expected)


def test_everyday_commands(host: AppHost, sim: Simulator) -> None:
    span = window()
    event_id = ok(
        cli(
            host,
            *("events", "create", "--name", "Everyday", "--starts-at", span["starts_at"]),
            *("--ends-at", span["ends_at"], "--time-zone", "UTC", "--max-token-cap", "64"),
            *("--daily-request-cap", "5", "--requests-per-minute", "12"),
        )
    ).strip()
    assert host.manage.get(f"/events/{event_id}").json()["requests_per_minute"] == 12
    listed, _ = parse_table(ok(cli(host, "events", "list")))
    assert event_id in {r["id"] for r in listed}
    updated = ok(
        cli(host, "events", "update", event_id, "--daily-request-cap", "7", "--inactive",
            "--tokens-per-minute", "5000")
    )  # fmt: skip
    assert '"daily_request_cap": 7' in updated and '"active": false' in updated
    assert '"tokens_per_minute": 5000' in updated and '"requests_per_minute": 12' in updated
    assert '"id": "' + event_id in ok(cli(host, "events", "show", event_id))
    # The proxy makes a registration code on request, and the answer shows it.
    coded = ok(
        cli(host, "events", "update", event_id, "--shared-code", "generate",
            "--self-registration", "code")
    )  # fmt: skip
    code = re.search(r'"shared_code": "([^"]*)"', coded).group(1)
    assert re.fullmatch(r"[A-Z2-9]{4}-[A-Z2-9]{4}-[A-Z2-9]{4}", code)
    assert '"self_registration": "code"' in coded
    # A yes-or-no field is a switch pair; left out, it stays as it is.
    on = ok(cli(host, "events", "update", event_id, "--realtime-client-secrets"))
    assert '"realtime_client_secrets": true' in on
    kept = ok(cli(host, "events", "update", event_id, "--daily-request-cap", "8"))
    assert '"realtime_client_secrets": true' in kept
    off = ok(cli(host, "events", "update", event_id, "--no-realtime-client-secrets"))
    assert '"realtime_client_secrets": false' in off

    resource = ok(
        cli(
            host,
            *("resources", "add", "--name", "r", "--deployment", "gpt-4o-mini", "--json"),
            *("--model-class", "openai-chat", "--url", sim.url, "--api-key", SIM_KEY),
        )
    )
    resource_id = re.search(r'"id": "([0-9a-f]{16})"', resource).group(1)
    assert SIM_KEY not in resource
    assert '"weight": 4' in ok(cli(host, "resources", "update", resource_id, "--weight", "4"))
    quota = ok(cli(host, "resources", "update", resource_id, "--quota-requests-per-minute", "60",
                   "--quota-tokens-per-minute", "9000"))  # fmt: skip
    assert '"quota_requests_per_minute": 60' in quota and '"quota_tokens_per_minute": 9000' in quota
    resources, _ = parse_table(ok(cli(host, "resources", "list")))
    assert resource_id in {r["id"] for r in resources}
    ok(cli(host, "catalog", "attach", "--event", event_id, "--resource", resource_id))

    key = ok(cli(host, "attendees", "add", "--event", event_id, "--user", "Sam@Example.com"))
    assert KEY.match(key.strip())
    same = cli(host, "attendees", "add", "--event", event_id, "--user", "sam@example.com")
    assert ok(same) == key and "already had a key" in same.stderr
    rotated = ok(cli(host, "attendees", "rotate", "--event", event_id, "--user", "sam@example.com"))
    assert KEY.match(rotated.strip()) and rotated != key
    revoke = cli(host, "attendees", "revoke", "--event", event_id, "--user", "SAM@example.com")
    assert "revoked Sam@Example.com" in revoke.stderr and revoke.returncode == 0
    attendees, _ = parse_table(ok(cli(host, "attendees", "list", "--event", event_id)))
    assert [(a["user"], a["active"]) for a in attendees] == [("Sam@Example.com", "no")]

    conflict = failed(cli(host, "events", "delete", event_id), 1)
    assert "409 conflict" in conflict and "force=true" in conflict
    in_use = failed(cli(host, "resources", "delete", resource_id), 1)
    assert "409 conflict" in in_use
    ok(cli(host, "catalog", "detach", "--event", event_id, "--resource", resource_id))
    ok(cli(host, "resources", "delete", resource_id))
    ok(cli(host, "events", "delete", event_id, "--force"))
    assert host.manage.get(f"/events/{event_id}").status_code == 404


def test_api_errors_exit_1_with_the_apis_message(host: AppHost) -> None:
    missing = failed(cli(host, "events", "show", "nosuchevent"), 1)
    assert missing == "aiproxy: error: No event with id 'nosuchevent'. (404 not_found)"
    wrong_key = cli(host, "events", "list", env={"AIPROXY_OPERATOR_KEY": "wrong"})
    assert "401 unauthorized" in failed(wrong_key, 1)
    # What to check on this side, after the app's own message.
    assert "aiproxy: check: the operator key from AIPROXY_OPERATOR_KEY must equal the app " in (
        wrong_key.stderr
    )
    span = window()
    bad = cli(
        host,
        *("events", "create", "--name", "x", "--starts-at", span["starts_at"]),
        *("--ends-at", span["ends_at"], "--time-zone", "Mars/Olympus"),
        *("--max-token-cap", "1", "--daily-request-cap", "1"),
    )
    assert "time_zone" in failed(bad, 1) and "400 invalid_request" in bad.stderr
    several = cli(
        host,
        *("events", "create", "--name", "x", "--starts-at", span["starts_at"]),
        *("--ends-at", span["ends_at"], "--time-zone", "UTC", "--max-token-cap", "0"),
        *("--daily-request-cap", "1", "--requests-per-minute", "-1"),
    )
    line = failed(several, 1)
    assert "'max_token_cap'" in line and "'requests_per_minute'" in line
    usage = failed(cli(host, "usage", "--event", "nosuchevent"), 1)
    assert "404 not_found" in usage


def test_every_field_of_the_bodies_has_a_flag_and_lists_take_commas(host: AppHost) -> None:
    from shared.directory.models import EventCreate, ResourceCreate

    named = {"description_markdown": "--description", "endpoint": "--url", "active": "--active"}
    for command, model in (("events", EventCreate), ("resources", ResourceCreate)):
        shown = ok(cli(None, command, "update", "--help"))
        for name in model.model_fields:
            assert named.get(name, "--" + name.replace("_", "-")) + " " in shown, (command, name)
    tenants = [str(uuid.uuid4()), str(uuid.uuid4())]
    span = window()
    event_id = ok(
        cli(
            host,
            *("events", "create", "--name", "Entra lab", "--starts-at", span["starts_at"]),
            *("--ends-at", span["ends_at"], "--time-zone", "UTC", "--max-token-cap", "8"),
            *("--daily-request-cap", "5", "--entra-tenants", f"{tenants[0].upper()}, {tenants[1]}"),
        )
    ).strip()
    assert host.manage.get(f"/events/{event_id}").json()["entra_tenants"] == tenants
    ok(cli(host, "events", "update", event_id, "--entra-tenants", ""))
    assert host.manage.get(f"/events/{event_id}").json()["entra_tenants"] == []


def test_usage_errors_exit_2(host: AppHost, tmp_path: Path) -> None:
    incomplete = cli(host, "events", "create", "--name", "x")
    assert incomplete.returncode == 2 and "--starts-at" in incomplete.stderr
    no_endpoint = failed(cli(None, "events", "list"), 2)
    assert "AIPROXY_ENDPOINT" in no_endpoint
    no_key = failed(cli(None, "events", "list", "--endpoint", host.base), 2)
    assert "no credential" in no_key
    for named in ("--operator-key", "AIPROXY_OPERATOR_KEY", "--entra-scope", "--token"):
        assert named in no_key, named
    assert "nothing to change" in failed(cli(host, "events", "update", "someid"), 2)
    absent = cli(
        host,
        *("attendees", "bulk", "--event", "e", "--input", str(tmp_path / "none.csv")),
        *("--output", str(tmp_path / "keys.csv")),
    )
    assert "cannot read" in failed(absent, 2)
    (tmp_path / "empty.csv").write_text("user\n\n")
    empty = cli(
        host,
        *("attendees", "bulk", "--event", "e", "--input", str(tmp_path / "empty.csv")),
        *("--output", str(tmp_path / "keys.csv")),
    )
    assert "no users" in failed(empty, 2)
    assert cli(host, "attendees").returncode == 2
    assert cli(host, "usage", "--event", "e", "--group-by", "week").returncode == 2


def test_the_function_key_no_longer_manages_and_one_credential_is_chosen(host: AppHost) -> None:
    # What opened manage/* before: a usage error that says what to set instead.
    for how in ({"env": {"AIPROXY_FUNCTION_KEY": FUNCTION_KEY}}, {"args": ("--key", "k")}):
        old = cli(None, "events", "list", "--endpoint", host.base, *how.get("args", ()),
                  env=how.get("env"))  # fmt: skip
        line = failed(old, 2)
        assert "no longer opens manage/*" in line, line
        assert "AIPROXY_OPERATOR_KEY" in line and "--entra-scope" in line
    # Two credentials: the flag wins over the environment; two of either kind is an error.
    chosen = cli(host, "events", "list", "--operator-key", OPERATOR_KEY,
                 env={"AIPROXY_OPERATOR_KEY": "", "AIPROXY_TOKEN": "not.a.token"})  # fmt: skip
    ok(chosen)
    both = cli(host, "events", "list", env={"AIPROXY_TOKEN": "a.b.c"})
    assert "AIPROXY_OPERATOR_KEY and AIPROXY_TOKEN are all set" in failed(both, 2)
    flags = cli(host, "events", "list", "--operator-key", "x", "--token", "a.b.c")
    assert "--operator-key and --token were both given" in failed(flags, 2)


def test_a_closed_output_pipe_ends_quietly_with_141(host: AppHost) -> None:
    """`aiproxy events list | head`: the reader leaves; no traceback, the shell's SIGPIPE status."""
    host.manage.post("/events", json={"name": "piped", **window(), "max_token_cap": 8,
                                       "daily_request_cap": 1})  # fmt: skip
    for args in (("events", "list"), ("events", "list", "--json"), ("resources", "list")):
        reader, writer = os.pipe()
        os.close(reader)  # gone before the command writes: its first write finds the pipe broken
        try:
            result = process(host, *args, stdout=writer)
        finally:
            os.close(writer)
        assert (result.returncode, result.stderr) == (141, ""), (args, result.stderr)
    # Through a shell pipeline, as typed: head's line, and nothing on stderr either way.
    script = f"{AIPROXY} events list --json | head -n 1"
    environ = {k: v for k, v in os.environ.items() if not k.startswith("AIPROXY_")}
    environ |= {"AIPROXY_ENDPOINT": host.base, "AIPROXY_OPERATOR_KEY": OPERATOR_KEY,
                "PYTHONPATH": str(ROOT)}  # fmt: skip
    piped = subprocess.run(["bash", "-c", script], env=environ, capture_output=True, text=True,
                           timeout=60)  # fmt: skip
    assert piped.stdout == "[\n" and "Traceback" not in piped.stderr, piped.stderr


def test_unreachable_proxy_exits_3(tmp_path: Path) -> None:
    endpoint = f"http://127.0.0.1:{free_port()}/api"
    env = {"AIPROXY_ENDPOINT": endpoint, "AIPROXY_OPERATOR_KEY": "k"}
    down = failed(cli(None, "events", "list", env=env), 3)
    assert "cannot reach " + endpoint in down
    (tmp_path / "users.csv").write_text("user\nada\n")
    bulk = cli(
        None,
        *("attendees", "bulk", "--event", "e", "--input", str(tmp_path / "users.csv")),
        *("--output", str(tmp_path / "keys.csv")),
        env=env,
    )
    assert "cannot reach" in failed(bulk, 3)
    assert not (tmp_path / "keys.csv").exists()


def test_the_bulk_input_may_use_a_user_column_or_no_header(
    host: AppHost, sim: Simulator, tmp_path: Path
) -> None:
    span = window()
    event = host.manage.post(
        "/events", json={"name": "csv", **span, "max_token_cap": 8, "daily_request_cap": 1}
    ).json()
    for name, text, expected in (
        ("user.csv", "team,user\na,octocat\nb,hubot\n", ["octocat", "hubot"]),
        ("plain.csv", "ann@example.com\nbo@example.com\n", ["ann@example.com", "bo@example.com"]),
        ("first.csv", "name,team\nzoe,a\n", ["zoe"]),
    ):
        (tmp_path / name).write_text(text)
        out = cli(
            host,
            *("attendees", "bulk", "--event", event["id"], "--quiet"),
            *("--input", str(tmp_path / name), "--output", "-"),
        )
        assert [r["user"] for r in csv.DictReader(io.StringIO(ok(out)))] == expected


COMMANDS = [
    (),
    ("events",),
    ("events", "list"),
    ("events", "create"),
    ("events", "show"),
    ("events", "update"),
    ("events", "delete"),
    ("resources",),
    ("resources", "list"),
    ("resources", "add"),
    ("resources", "update"),
    ("resources", "delete"),
    ("catalog",),
    ("catalog", "attach"),
    ("catalog", "detach"),
    ("catalog", "list"),
    ("attendees",),
    ("attendees", "add"),
    ("attendees", "list"),
    ("attendees", "revoke"),
    ("attendees", "rotate"),
    ("attendees", "bulk"),
    ("usage",),
]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "aiproxy")
def test_every_command_has_help(command: tuple[str, ...]) -> None:
    shown = cli(None, *command, "--help")
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.startswith("usage: aiproxy " + " ".join(command))
    for option in ("--endpoint", "--operator-key", "--token", "--entra-scope"):
        assert option in shown.stdout, option
    assert "--key" not in shown.stdout and "function key" not in shown.stdout
    description = shown.stdout.split("\n\n")[1]
    assert len(description) > 15


BULK_CONCURRENCY = 8


class CountingApi(ThreadingHTTPServer):
    """A stand-in management API that counts how many key requests are in flight at once."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), CountingHandler)
        self.lock = threading.Lock()
        self.arrived = threading.Condition(self.lock)
        self.holding = True  # until one held call has waited in vain: then none waits
        self.in_flight = 0
        self.most = 0
        self.posts: Counter[str] = Counter()


class CountingHandler(BaseHTTPRequestHandler):
    server: CountingApi

    def log_message(self, *args: Any) -> None:
        pass

    def _answer(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        self._answer(200, {"id": "e"})

    def do_POST(self) -> None:
        user = json.loads(self.rfile.read(int(self.headers["content-length"])))["user"]
        with self.server.lock:
            self.server.posts[user] += 1
            first_try = self.server.posts[user] == 1
            self.server.in_flight += 1
            self.server.most = max(self.server.most, self.server.in_flight)
            self.server.arrived.notify_all()
            # The first calls are held until as many are in flight as the command may send at
            # once, however slowly this machine starts them: the most in flight is then its
            # concurrency, not how many happened to overlap.
            full = self.server.arrived.wait_for(
                lambda: self.server.most >= BULK_CONCURRENCY or not self.server.holding, 10
            )
            if not full:
                self.server.holding = False
                self.server.arrived.notify_all()
        time.sleep(0.2)  # a slow API: the command's calls overlap, as its concurrency allows
        with self.server.lock:
            self.server.in_flight -= 1
        if user == "flaky" and first_try:
            error = {"code": "storage_unavailable", "message": "later", "status": 503}
            return self._answer(503, {"error": error})
        self._answer(201, {"id": f"id-{user}", "api_key": f"key-{user}"})


def test_bulk_keeps_at_most_the_concurrency_in_flight_and_retries(tmp_path: Path) -> None:
    server = CountingApi()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        users = [f"u{i}" for i in range(40)] + ["flaky"]
        (tmp_path / "users.csv").write_text("user\n" + "\n".join(users) + "\n")
        env = {
            "AIPROXY_ENDPOINT": f"http://127.0.0.1:{server.server_port}/api",
            "AIPROXY_OPERATOR_KEY": "k",
        }
        result = cli(
            None,
            *("attendees", "bulk", "--event", "e", "--concurrency", str(BULK_CONCURRENCY)),
            *("--input", str(tmp_path / "users.csv"), "--output", "-"),
            env=env,
        )
        rows = list(csv.DictReader(io.StringIO(ok(result))))
    finally:
        server.shutdown()
        server.server_close()
    assert [r["user"] for r in rows] == users
    assert rows[-1] == {"user": "flaky", "attendee_id": "id-flaky", "api_key": "key-flaky"}
    assert server.posts["flaky"] == 2  # retried after the 503
    assert server.most == BULK_CONCURRENCY


# --- organisers: an Entra token, pasted or fetched ---------------------------------------------

ORGANISERS = str(uuid.uuid4())  # the organisers' tenant
AUDIENCE = "api://aiproxy-cli-test"
ORGANISER_GROUP = str(uuid.uuid4())


@pytest.fixture(scope="module")
def organised(app_hosts: Callable[..., AppHost], issuer: LocalIssuer) -> AppHost:
    """An app that takes organisers' tokens from the local issuer."""
    return app_hosts(
        "cli-organisers",
        prefix=unique_prefix("cliorg"),
        AIPROXY_ENTRA_AUTHORITY=issuer.authority,
        AIPROXY_ENTRA_ORGANIZER_TENANTS=ORGANISERS,
        AIPROXY_ENTRA_ORGANIZER_AUDIENCE=AUDIENCE,
        AIPROXY_ENTRA_ORGANIZER_GROUPS=ORGANISER_GROUP,
    )


def organiser_token(issuer: LocalIssuer, oid: str, **claims: Any) -> str:
    return issuer.token(ORGANISERS, oid=oid, audience=AUDIENCE, groups=[ORGANISER_GROUP], **claims)


def stand_in_az(folder: Path, answer: str, status: int = 0) -> dict[str, str]:
    """An `az` first on the PATH that logs its arguments and prints `answer` (the Azure CLI's
    `account get-access-token` JSON, or an error); the environment that finds it."""
    folder.mkdir()
    (folder / "answer").write_text(answer)
    script = folder / "az"
    stream = ">&2" if status else ""
    script.write_text(
        f'#!/bin/sh\necho "$@" >> "{folder}/calls"\ncat "{folder}/answer" {stream}\nexit {status}\n'
    )
    script.chmod(0o755)
    return {"PATH": f"{folder}{os.pathsep}/usr/bin{os.pathsep}/bin"}


@pytest.mark.e2e
def test_organisers_manage_their_own_events_with_a_token_or_the_azure_cli(
    organised: AppHost, issuer: LocalIssuer, tmp_path: Path
) -> None:
    endpoint = {"AIPROXY_ENDPOINT": organised.base}
    alice, bob = str(uuid.uuid4()), str(uuid.uuid4())
    span = window()
    create = ("events", "create", "--name", "Alice's lab", "--starts-at", span["starts_at"],
              "--ends-at", span["ends_at"], "--time-zone", "UTC", "--max-token-cap", "64",
              "--daily-request-cap", "5")  # fmt: skip
    alices = ok(cli(None, *create, "--token", organiser_token(issuer, alice), env=endpoint))
    alices = alices.strip()
    assert organised.manage.get(f"/events/{alices}").json()["owner"] == f"aad:{alice}"
    bobs = httpx.post(
        f"{organised.base}/manage/events",
        json={"name": "Bob's lab", **span, "max_token_cap": 8, "daily_request_cap": 1},
        headers={"authorization": "Bearer " + organiser_token(issuer, bob)},
    ).json()["id"]

    # A token pasted with its scheme, from the environment: Alice sees her event only.
    pasted = {**endpoint, "AIPROXY_TOKEN": "Bearer " + organiser_token(issuer, alice)}
    listed, _ = parse_table(ok(cli(None, "events", "list", env=pasted)))
    assert [row["id"] for row in listed] == [alices]
    assert "404 not_found" in failed(cli(None, "events", "show", bobs, env=pasted), 1)

    # An expired token: the app's reason, then what to do about it here.
    expired = {**endpoint, "AIPROXY_TOKEN": organiser_token(issuer, alice, lifetime=-600)}
    refused = cli(None, "events", "list", env=expired)
    assert "expired" in failed(refused, 1) and "401 invalid_token" in refused.stderr
    assert "aiproxy: check: the token from AIPROXY_TOKEN was refused" in refused.stderr

    # --entra-scope: DefaultAzureCredential gets Alice's token from the Azure CLI.
    answer = json.dumps(
        {"accessToken": organiser_token(issuer, alice), "expires_on": int(time.time()) + 3600}
    )
    az = stand_in_az(tmp_path / "signed-in", answer)
    scoped = {**endpoint, **az, "AIPROXY_ENTRA_SCOPE": f"{AUDIENCE}/.default"}
    listed, _ = parse_table(ok(process(None, "events", "list", env=scoped)))
    assert [row["id"] for row in listed] == [alices]
    calls = (tmp_path / "signed-in" / "calls").read_text().splitlines()
    assert calls == [f"account get-access-token --output json --resource {AUDIENCE}"]

    # Not signed in, or a scope that is not one: exit 2, saying how to sign in.
    signed_out = stand_in_az(
        tmp_path / "signed-out", "ERROR: Please run 'az login' to setup account.", 1
    )
    line = failed(process(None, "events", "list", env={**scoped, **signed_out}), 2)
    assert f"cannot get an Entra token for {AUDIENCE}/.default" in line and "az login" in line
    line = failed(cli(None, "events", "list", "--entra-scope", AUDIENCE, env={**endpoint, **az}), 2)
    assert "api://<client id>/.default" in line


def test_prices_budgets_and_the_cost_report(host: AppHost, sim: Simulator) -> None:
    resource = ok(
        cli(
            host,
            *("resources", "add", "--name", "priced", "--deployment", "gpt-4o-mini"),
            *("--model-class", "openai-chat", "--url", sim.url, "--api-key", "-"),
            *("--prices", "input=2, output=4"),
            stdin=SIM_KEY + "\n",
        )
    ).strip()
    assert host.manage.get(f"/resources/{resource}").json()["prices"] == "input=2,output=4"
    span = window(zone="UTC")
    event_id = ok(
        cli(
            host,
            *("events", "create", "--name", "Costed", "--starts-at", span["starts_at"]),
            *("--ends-at", span["ends_at"], "--time-zone", "UTC", "--max-token-cap", "256"),
            *("--daily-request-cap", "100", "--currency", "EUR", "--budget", "25"),
            *("--attendee-daily-budget", "0.5"),
        )
    ).strip()
    event = host.manage.get(f"/events/{event_id}").json()
    assert (event["currency"], event["budget"], event["attendee_daily_budget"]) == (
        "EUR", "25", "0.5",
    )  # fmt: skip
    ok(cli(host, "catalog", "attach", "--event", event_id, "--resource", resource))
    key = host.manage.post(f"/events/{event_id}/attendees", json={"user": "c@example.com"})
    usage = chat(host.base, key.json()["api_key"], "what does it cost")
    cost = Decimal(usage["prompt_tokens"] * 2 + usage["completion_tokens"] * 4) / 10**6
    report = f"/events/{event_id}/usage"
    wait_until(lambda: host.manage.get(report).json()["totals"]["requests"] >= 1, timeout=30)
    plain, _ = parse_table(ok(cli(host, "usage", "--event", event_id)))
    assert "cost" not in plain[0]
    rows, total = parse_table(ok(cli(host, "usage", "--event", event_id, "--cost")))
    assert total is not None and Decimal(total["cost"]) == cost and total["unpriced"] == "0"
    assert [Decimal(r["cost"]) for r in rows if int(r["requests"])] == [cost]

    secret = ok(cli(host, "alerts", "secret", "--event", event_id)).strip()
    assert secret.startswith("whsec_")
    assert "threshold_percent" in ok(cli(host, "alerts", "list", "--event", event_id))
