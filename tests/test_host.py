"""The host stand-in runs the app like the Functions host: a worker process running the PyPI
runtime, routes and keys from the indexed metadata, timers, restarts, and the host's own answers."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path

import httpx
import pytest

from local.azurite import Azurite, free_port, wait_for_port
from local.host import Host, compile_route, next_firing, resolve_setting
from tests.harness import (
    FUNCTION_KEY,
    AppHost,
    EventSetup,
    Process,
    Simulator,
    StandIns,
    host_answer,
    host_with_standins,
    unique_prefix,
)

pytestmark = pytest.mark.e2e  # the host stand-in and the worker runtime themselves


def test_route_templates_match_like_the_functions_host() -> None:
    chat = compile_route("api", "openai/deployments/{deployment}/chat/completions")
    match = chat.match("/api/openai/deployments/gpt-4o/chat/completions")
    assert match and match["deployment"] == "gpt-4o"
    assert chat.match("/api/OpenAI/Deployments/gpt-4o/Chat/Completions")  # case-insensitive
    assert not chat.match("/api/openai/deployments/a/b/chat/completions")
    search = compile_route("api", "indexes('{index}')/docs/search.post.search")
    found = search.match("/api/indexes('hotels')/docs/search.post.search")
    assert found and found["index"] == "hotels"
    rest = compile_route("api", "files/{*path}")
    assert rest.match("/api/files/a/b/c")["path"] == "a/b/c"
    numbered = compile_route("api", "items/{id:int}/{name?}")
    assert numbered.match("/api/items/42/x") and numbered.match("/api/items/42/")
    assert not numbered.match("/api/items/abc/x")


@pytest.mark.parametrize(
    ("expression", "after", "expected"),
    [
        ("0 */5 * * * *", "2026-11-22T10:02:30", "2026-11-22T10:05:00"),
        ("30 0 9 * * 1-5", "2026-11-21T10:00:00", "2026-11-23T09:00:30"),  # Saturday -> Monday
        ("0 0 0 1 * *", "2026-12-15T00:00:00", "2027-01-01T00:00:00"),
        ("*/10 * * * * *", "2026-11-22T10:00:05", "2026-11-22T10:00:10"),
        ("0 15 10 * Jan,Jul Sun", "2026-11-22T11:00:00", "2027-01-03T10:15:00"),
    ],
)
def test_ncrontab_next_firing(expression: str, after: str, expected: str) -> None:
    fired = next_firing(expression, datetime.fromisoformat(after))
    assert fired == datetime.fromisoformat(expected)


def test_ncrontab_refuses_five_fields() -> None:
    with pytest.raises(ValueError, match="six fields"):
        next_firing("*/5 * * * *", datetime(2026, 1, 1))


def test_schedule_setting_reference_is_resolved(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIPROXY_ROLLUP_SCHEDULE", "*/2 * * * * *")
    assert resolve_setting("%AIPROXY_ROLLUP_SCHEDULE%") == "*/2 * * * * *"
    assert resolve_setting("0 0 * * * *") == "0 0 * * * *"


def test_the_worker_runs_the_pypi_runtime_on_python_3_13(host: AppHost) -> None:
    from importlib.metadata import version

    status = host.status()
    worker = status["worker"]
    assert worker["runtime_version"] == version("azure-functions-runtime")
    assert worker["pid"] != host.proc.process.pid
    assert worker["http_uri"].startswith("http://127.0.0.1:")
    assert worker["capabilities"]["RequiresRouteParameters"] == "true"
    assert "HandlesWorkerTerminateMessage" not in worker["capabilities"]
    exe = Path(f"/proc/{worker['pid']}/exe").resolve()
    cmdline = Path(f"/proc/{worker['pid']}/cmdline").read_bytes().split(b"\0")
    assert exe == Path(sys.executable).resolve() and sys.version_info[:2] == (3, 13)
    assert b"--functions-worker-id" in cmdline and b"--grpcMaxMessageLength" in cmdline
    names = {f["name"] for f in status["functions"]}
    assert {"chat_completions", "rollup_usage", "prune_usage"} <= names


def test_unknown_route_and_wrong_method_are_the_hosts_empty_404(host: AppHost) -> None:
    for response in (
        host.http.get("/no/such/route"),
        host.http.get("/openai/deployments/x/chat/completions"),
    ):
        assert response.status_code == 404
        assert response.content == b""


def tiny_app(root: Path, function_app: str) -> Path:
    """An app of its own beside this one's worker code: what the host stand-in serves."""
    source = Path(__file__).resolve().parent.parent
    app = root / "app"
    (app / "local").mkdir(parents=True)
    for name in ("worker.py", "protos.py", "__init__.py"):
        (app / "local" / name).write_bytes((source / "local" / name).read_bytes())
    (app / "host.json").write_text(json.dumps({"version": "2.0"}))
    (app / "function_app.py").write_text(function_app)
    return app


def test_function_level_routes_still_take_only_the_function_key(
    tmp_path: Path, log_dir: Path
) -> None:
    # manage/* is anonymous at the host now (the app is its gate); routes left at the FUNCTION
    # level keep the host's own check: its empty 401 without the key, the app's answer with it.
    app = tiny_app(
        tmp_path,
        "import azure.functions as func\n"
        "from azurefunctions.extensions.http.fastapi import Request, Response\n"
        "app = func.FunctionApp()\n"
        "@app.route(route='guarded', auth_level=func.AuthLevel.FUNCTION)\n"
        "async def guarded(req: Request) -> Response:\n"
        "    return Response('guarded ok')\n"
        "@app.route(route='open', auth_level=func.AuthLevel.ANONYMOUS)\n"
        "async def open_(req: Request) -> Response:\n"
        "    return Response('open ok')\n",
    )
    root = Path(__file__).resolve().parent.parent
    port = free_port()
    code = (
        "import sys, asyncio; sys.path.insert(0, sys.argv[2]); from pathlib import Path\n"
        "from local.host import Host\n"
        f"asyncio.run(Host(Path(sys.argv[1]), {FUNCTION_KEY!r}).serve({port}))\n"
    )
    server = Process(
        [sys.executable, "-c", code, str(app), str(root)],
        {**os.environ, "PYTHONPATH": str(root)},
        log_dir / f"tiny-host-{port}.log",
    )
    try:
        wait_for_port(port, timeout=90, process=server.process)
        base = f"http://127.0.0.1:{port}/api"
        for params, headers in (({}, {}), ({"code": "wrong"}, {}), ({}, {"x-functions-key": "x"})):
            host_answer(httpx.get(f"{base}/guarded", params=params, headers=headers), 401)
        for params, headers in (
            ({"code": FUNCTION_KEY}, {}),
            ({}, {"x-functions-key": FUNCTION_KEY}),
        ):
            answer = httpx.get(f"{base}/guarded", params=params, headers=headers, timeout=30)
            assert answer.status_code == 200 and answer.text == "guarded ok", answer.text
        assert httpx.get(f"{base}/open", timeout=30).text == "open ok"
    finally:
        server.stop()


def test_management_routes_are_anonymous_at_the_host(host: AppHost) -> None:
    manage = [f for f in host.status()["functions"] if (f["route"] or "").startswith("manage/")]
    assert len(manage) >= 9 and {f["auth_level"] for f in manage} == {"anonymous"}
    # So the host passes a call without any key to the app, which refuses it in its own words.
    response = host.http.get("/manage/events")
    assert response.status_code == 401 and response.json()["error"]["code"] == "unauthorized"


def test_health_reports_storage(host: AppHost) -> None:
    response = host.http.get("/health")
    assert response.status_code == 200
    assert response.json()["storage"] == "ok"


def test_admin_api_runs_a_timer_now(host: AppHost) -> None:
    url = f"http://127.0.0.1:{host.port}/admin/functions/rollup_usage"
    assert httpx.post(url, json={}).status_code == 401
    ran = httpx.post(url, json={}, headers={"x-functions-key": FUNCTION_KEY}, timeout=60)
    assert ran.status_code == 202
    missing = httpx.post(url + "x", json={}, headers={"x-functions-key": FUNCTION_KEY})
    assert missing.status_code == 404
    assert "Executed 'Functions.rollup_usage' (Succeeded" in host.log()


@pytest.fixture(scope="module")
def own_host(azurite: Azurite, log_dir: Path) -> Iterator[tuple[AppHost, StandIns]]:
    """One app host of this module's own (its tables, its log, a worker that can be killed),
    whose worker carries the stand-ins and fires the rollup timer every second: the tests that
    need a host to themselves share it, since starting one is most of their time."""
    with host_with_standins(
        log_dir,
        azurite.connection_string,
        unique_prefix("own"),
        "own",
        AIPROXY_ROLLUP_SCHEDULE="* * * * * *",
    ) as started:
        yield started


def test_timers_fire_on_their_schedule(own_host: tuple[AppHost, StandIns]) -> None:
    host, _ = own_host
    deadline = time.monotonic() + 30
    while host.log().count("Executed 'Functions.rollup_usage' (Succeeded") < 2:
        assert time.monotonic() < deadline, host.log()[-2000:]
        time.sleep(0.1)


def test_route_parameters_reach_the_app(host: AppHost, event: EventSetup) -> None:
    info = host.http.get(f"/events/{event.id}")
    assert info.status_code == 200 and info.json()["id"] == event.id


def test_a_broken_function_stops_start_up_with_the_runtimes_message(tmp_path: Path) -> None:
    root = Path(__file__).resolve().parent.parent
    app = tmp_path / "app"
    (app / "local").mkdir(parents=True)
    for name in ("worker.py", "protos.py", "__init__.py"):
        (app / "local" / name).write_bytes((root / "local" / name).read_bytes())
    (app / "host.json").write_text(json.dumps({"version": "2.0"}))
    (app / "function_app.py").write_text(
        "import azure.functions as func\n"
        "from azurefunctions.extensions.http.fastapi import Request, Response\n"
        "app = func.FunctionApp()\n"
        "@app.route(route='ok')\n"
        "async def ok(req: Request) -> Response:\n"
        "    return Response('ok')\n"
        "@app.route(route='broken')\n"
        "async def broken(req: Request, missing) -> Response:\n"
        "    return Response('never')\n"
    )
    code = (
        "import sys; sys.path.insert(0, sys.argv[2]); from pathlib import Path;"
        "import asyncio; from local.host import Host, StartupError\n"
        "async def main():\n"
        "    host = Host(Path(sys.argv[1]), 'k')\n"
        "    await host.start_grpc()\n"
        "    try:\n"
        "        await host.start_worker()\n"
        "    except StartupError as error:\n"
        "        print('STARTUP ERROR:', error)\n"
        "    finally:\n"
        "        await host.stop()\n"
        "asyncio.run(main())\n"
    )
    import subprocess

    result = subprocess.run(
        [sys.executable, "-c", code, str(app), str(root)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(root)},
    )
    assert "STARTUP ERROR: the worker could not start the app" in result.stdout, result
    # The runtime's own words: the parameter without a binding is named.
    assert "missing" in result.stdout, result.stdout


def test_a_worker_that_dies_is_reported_and_started_again(
    own_host: tuple[AppHost, StandIns], sim: Simulator
) -> None:
    host, _ = own_host
    setup = EventSetup(host, sim)
    first = host.status()["worker"]["pid"]
    os.kill(first, signal.SIGKILL)
    deadline = time.monotonic() + 60
    while True:
        try:
            status = host.status()
            if status["worker"]["pid"] != first and status["state"] == "Running":
                break
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, host.log()[-2000:]
        time.sleep(0.1)
    assert status["worker"]["restarts"] == 1
    assert "the worker exited with code -9; starting a new one" in host.log()
    body = {"messages": [{"role": "user", "content": "back?"}], "max_tokens": 5}
    answer = host.http.post(
        "/openai/deployments/gpt-4o-mini/chat/completions",
        params={"api-version": "2024-10-21"},
        json=body,
        headers={"api-key": setup.key},
    )
    assert answer.status_code == 200, answer.text


async def test_a_closed_worker_stream_takes_no_invocation_until_the_next_worker() -> None:
    """A worker's stream can end before its process's exit is seen. An invocation sent in
    between (a queue message taken again at once) went down the closed stream and waited for
    an answer for good, its lease renewed; it now fails at once, and new ones wait for the
    next worker (`ready`)."""
    host = Host(Path(__file__).resolve().parent.parent, FUNCTION_KEY)
    host.ready.set()
    protos = host.protos

    def invocation(invocation_id: str) -> dict[str, object]:
        return {"invocation_request": protos.InvocationRequest(invocation_id=invocation_id)}

    in_flight = asyncio.ensure_future(host.ask("invocation_response:a", **invocation("a")))
    await asyncio.sleep(0)  # sent: waiting for its answer
    written: list[object] = []

    class Context:
        async def write(self, message: object) -> None:
            written.append(message)

    async def the_worker_is_gone() -> AsyncIterator[object]:
        for _ in ():
            yield _

    await asyncio.wait_for(host._serve_stream(the_worker_is_gone(), Context()), 10)
    with pytest.raises(ConnectionError, match="stream closed"):
        await asyncio.wait_for(in_flight, 10)
    assert not host.ready.is_set()  # new invocations wait for the next worker
    with pytest.raises(ConnectionError, match="stream closed"):  # and none waits here for good
        await asyncio.wait_for(host.ask("invocation_response:b", **invocation("b")), 10)
    assert host.channel.waiting == {}


def test_logs_carry_the_apps_lines_not_per_call_library_chatter(
    own_host: tuple[AppHost, StandIns], sim: Simulator
) -> None:
    host, _ = own_host
    setup = EventSetup(host, sim)
    for n in range(3):
        answer = host.http.post(
            "/openai/deployments/gpt-4o-mini/chat/completions",
            params={"api-version": "2024-10-21"},
            json={"messages": [{"role": "user", "content": f"n{n}"}], "max_tokens": 3},
            headers={"api-key": setup.key},
        )
        assert answer.status_code == 200
    refused = host.http.post(
        "/openai/deployments/gpt-4o-mini/chat/completions",
        params={"api-version": "2024-10-21"},
        json={"messages": [{"role": "user", "content": "x"}]},
        headers={"api-key": "aip-" + "0" * 32},
    )
    assert refused.status_code == 401
    deadline = time.monotonic() + 10
    while "invalid_api_key" not in host.log():  # the app's line, sent as an RpcLog
        assert time.monotonic() < deadline, host.log()[-2000:]
        time.sleep(0.05)
    log = host.log()
    assert "worker INFO aiproxy.request" in log
    assert 'HTTP/1.1" 200' not in log  # uvicorn's access line
    assert "Received HTTP request for invocation" not in log  # the runtime's per-call lines
    assert "Request URL:" not in log and "Response status:" not in log  # the Azure SDK's


def test_the_runtimes_finished_invocations_do_not_pile_up(
    own_host: tuple[AppHost, StandIns], sim: Simulator
) -> None:
    """azure-functions-runtime keeps an entry per HTTP invocation for ever (about 2 KiB); the
    app drops the finished ones every few seconds."""
    host, standins = own_host
    setup = EventSetup(host, sim)
    # The stand-ins serve from inside the worker, which an earlier test may have restarted.
    wait_for_port(standins.http.base_url.port, timeout=30)

    def one(n: int) -> int:
        return host.http.get(f"/events/{setup.id}").status_code

    with ThreadPoolExecutor(8) as pool:
        assert set(pool.map(one, range(300))) == {200}
    deadline = time.monotonic() + 30
    while (held := standins.invocations_held()) > 20:
        assert time.monotonic() < deadline, f"{held} finished invocations still held"
        time.sleep(0.2)


def test_free_ports_are_bindable_and_outside_the_ephemeral_range() -> None:
    # A port chosen for a server that binds it later must not be one the system hands to
    # another socket meanwhile (binding port 0, an outgoing connection's own end).
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    ports = [free_port() for _ in range(50)]
    assert all(15_000 <= port < low for port in ports), ports
    assert len(set(ports)) > 40  # spread, not one port over and over
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", ports[-1]))  # free as promised


def test_an_azurite_that_cannot_listen_says_why() -> None:
    # Its port taken (bound, not listening): the service exits, and the error carries what it
    # wrote to stderr (a file, not a pipe nobody reads, which would stop it once full).
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", free_port()))
        storage = Azurite(taken.getsockname()[1])
        try:
            with pytest.raises(RuntimeError, match=r"table service.*EADDRINUSE"):
                storage.start()
        finally:
            storage.stop()
