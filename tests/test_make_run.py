"""`make run` starts everything, prints a key, the operator key and examples that work, and
keeps its data."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from local.azurite import free_port
from tests.harness import ROOT

pytestmark = pytest.mark.e2e  # `make run`'s processes


def start_make_run(tmp: Path, ports: dict[str, int]) -> tuple[subprocess.Popen[str], str]:
    env = {
        **os.environ,
        "AIPROXY_LOCAL_SETTINGS": str(tmp / "local.settings.json"),
        "AIPROXY_DATA_DIR": str(tmp / "data"),
        "AIPROXY_PORT": str(ports["devhost"]),
        "AIPROXY_AZURITE_PORT": str(ports["azurite"]),
        "AIPROXY_SIMULATOR_PORT": str(ports["simulator"]),
        "AIPROXY_MCP_PORT": str(ports["mcp"]),
    }
    process = subprocess.Popen(
        ["make", "--no-print-directory", "run"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    assert process.stdout is not None
    output, deadline = [], time.monotonic() + 120
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        output.append(line)
        if "Press Ctrl-C to stop." in line:
            return process, "".join(output)
    stop(process)
    raise AssertionError("make run did not become ready:\n" + "".join(output))


def stop(process: subprocess.Popen[str]) -> None:
    os.killpg(process.pid, signal.SIGINT)
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


@pytest.fixture
def ports() -> Iterator[dict[str, int]]:
    yield {name: free_port() for name in ("devhost", "azurite", "simulator", "mcp")}


def test_make_run_prints_a_key_whose_examples_work_and_survives_a_restart(
    tmp_path: Path, ports: dict[str, int]
) -> None:
    process, output = start_make_run(tmp_path, ports)
    try:
        key = re.search(r"demo key: (aip-\w+)", output).group(1)  # type: ignore[union-attr]
        curl = output.split("Try it with curl:")[1].split("Or with the OpenAI")[0].strip()
        answer = subprocess.run(["bash", "-c", curl], capture_output=True, text=True, timeout=30)
        assert '"usage"' in answer.stdout and '"choices"' in answer.stdout, answer.stdout

        snippet = output.split("pip install openai):")[1].split("Press Ctrl-C")[0]
        snippet = "\n".join(line[2:] for line in snippet.strip("\n").splitlines())
        ran = subprocess.run(
            [sys.executable, "-c", snippet], capture_output=True, text=True, timeout=60
        )
        assert ran.returncode == 0, ran.stderr
        assert len(ran.stdout.split()) >= 5  # the simulated answer, printed

        # The demo catalog beyond chat: the MCP tools behind the demo key, and the playground.
        base = re.search(r"running at (\S+)", output).group(1)  # type: ignore[union-attr]
        assert f"{base}/playground" in output
        mcp_url = re.search(r"bearer token: (\S+)", output).group(1)  # type: ignore[union-attr]
        assert asyncio.run(mcp_tools(mcp_url, key)) == ["add", "ask", "slow", "spell"]
        models = httpx.get(f"{base}/openai/v1/models", headers={"api-key": key}).json()
        assert {"gpt-realtime", "dall-e-3", "whisper", "tts"} <= {m["id"] for m in models["data"]}

        operator_key = operator_key_of(output, tmp_path)
        assert "AI Proxy demo" in cli_snippet(output)
        assert f"{base}/console" in output and httpx.get(f"{base}/console").status_code == 200
        # The function key in the same file opens nothing under manage/*.
        settings = json.loads((tmp_path / "local.settings.json").read_text())["Values"]
        function_key = {"x-functions-key": settings["AIPROXY_FUNCTION_KEY"]}
        assert httpx.get(f"{base}/manage/events", headers=function_key).status_code == 401
    finally:
        stop(process)
    assert process.returncode is not None

    # A local.settings.json from before the operator key gets one; nothing else changes.
    path = tmp_path / "local.settings.json"
    data = json.loads(path.read_text())
    del data["Values"]["AIPROXY_OPERATOR_KEY"]
    path.write_text(json.dumps(data))
    again, output = start_make_run(tmp_path, ports)
    try:
        assert "created the demo event" not in output  # the event was kept
        assert f"demo key: {key}" in output  # and so was the key
        assert "added a fresh operator key" in output
        assert operator_key_of(output, tmp_path) != operator_key
        assert "AI Proxy demo" in cli_snippet(output)
        kept = json.loads(path.read_text())["Values"]
        assert {k: v for k, v in kept.items() if k != "AIPROXY_OPERATOR_KEY"} == data["Values"]
    finally:
        stop(again)


async def mcp_tools(url: str, key: str) -> list[str]:
    """The tools the official MCP client sees through the proxy with the attendee's key."""
    import httpx2
    from mcp import Client
    from mcp.client.streamable_http import streamable_http_client

    headers = {"Authorization": f"Bearer {key}"}
    async with httpx2.AsyncClient(headers=headers, timeout=30) as http:
        transport = streamable_http_client(url, http_client=http)
        async with Client(transport, mode="legacy") as mcp:
            return sorted(tool.name for tool in (await mcp.list_tools()).tools)


def operator_key_of(output: str, tmp: Path) -> str:
    """The printed operator key, which is the one in local.settings.json."""
    key = re.search(r"operator key: (\S+)", output).group(1)  # type: ignore[union-attr]
    values = json.loads((tmp / "local.settings.json").read_text())["Values"]
    assert values["AIPROXY_OPERATOR_KEY"] == key and len(key) >= 32
    return key


def cli_snippet(output: str) -> str:
    """What the printed CLI lines print, run as printed from the checkout."""
    lines = [line.strip() for line in output.splitlines()]
    start = next(i for i, line in enumerate(lines) if line.startswith("export AIPROXY_ENDPOINT="))
    script = "\n".join(lines[start : start + 2])
    assert script.endswith("aiproxy events list"), script
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIPROXY_")}
    env["PYTHONPATH"] = str(ROOT)  # the installed script imports `cli` from this checkout
    ran = subprocess.run(
        ["bash", "-euc", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert ran.returncode == 0, ran.stderr
    return ran.stdout
