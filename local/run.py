"""`make run`: Azurite, the simulated upstream, a small MCP server and the app (host stand-in
and Python worker), plus a demo event to try: chat, completions, embeddings, images, audio,
search, realtime voice and MCP tools, all served by the simulator and the MCP server.

Data lives in .data/azurite, so a restart keeps events and keys. Ctrl-C stops everything.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
from cryptography.fernet import Fernet

from local.azurite import Azurite, wait_for_port

ROOT = Path(__file__).resolve().parent.parent
HOST_PORT = int(os.environ.get("AIPROXY_PORT", "7071"))
AZURITE_PORT = int(os.environ.get("AIPROXY_AZURITE_PORT", "10002"))
SIMULATOR_PORT = int(os.environ.get("AIPROXY_SIMULATOR_PORT", "7080"))
SIMULATOR_KEY = "simulated-upstream-key"
MCP_PORT = int(os.environ.get("AIPROXY_MCP_PORT", "7081"))
MCP_TOKEN = "demo-mcp-token"
DEMO_USER = "demo@example.com"
# Overridable so a test can run `make run` beside a developer's own instance.
SETTINGS_PATH = Path(os.environ.get("AIPROXY_LOCAL_SETTINGS", ROOT / "local.settings.json"))
DATA_DIR = Path(os.environ.get("AIPROXY_DATA_DIR", ROOT / ".data"))


def new_operator_key() -> str:
    return "local-op-" + secrets.token_urlsafe(24)


def ensure_local_settings() -> dict[str, str]:
    """local.settings.json from the example, with fresh secrets, written once; an operator key
    added to a file written before there was one."""
    path = SETTINGS_PATH
    if not path.exists():
        data = json.loads((ROOT / "local.settings.example.json").read_text())
        values = data["Values"]
        values["AIPROXY_ENCRYPTION_KEY"] = Fernet.generate_key().decode()
        values["AIPROXY_OPERATOR_KEY"] = new_operator_key()
        # The host stand-in's own admin API (/admin/host/status) still takes a function key.
        values["AIPROXY_FUNCTION_KEY"] = "local-" + os.urandom(12).hex()
        values["AIPROXY_STORAGE_CONNECTION_STRING"] = ""
        path.write_text(json.dumps(data, indent=2) + "\n")
        print(f"wrote {path.name} with a fresh encryption key, operator key and function key")
    data = json.loads(path.read_text())
    if not str(data["Values"].get("AIPROXY_OPERATOR_KEY", "")).strip():
        data["Values"]["AIPROXY_OPERATOR_KEY"] = new_operator_key()
        path.write_text(json.dumps(data, indent=2) + "\n")
        print(f"added a fresh operator key (AIPROXY_OPERATOR_KEY) to {path.name}")
    return data["Values"]


# The demo event's catalog: (deployment, model class, the resource's own fields over the
# simulator's defaults).
DEMO_CATALOG: tuple[tuple[str, str, dict[str, object]], ...] = (
    ("gpt-4o-mini", "openai-chat", {}),  # chat and the Responses API
    ("gpt-35-turbo-instruct", "openai-completions", {}),
    ("text-embedding-3-small", "openai-embeddings", {}),
    ("dall-e-3", "openai-images", {}),
    ("whisper", "openai-audio", {}),
    ("tts", "openai-audio", {"upstream_deployment": "tts-hd"}),
    ("hotels", "azure-ai-search", {}),
    ("gpt-realtime", "openai-realtime", {}),  # the playground's voice tab
    ("tools", "mcp", {  # the MCP server make run starts beside the simulator
        "name": "demo MCP tools", "endpoint": f"http://127.0.0.1:{MCP_PORT}/mcp",
        "auth": "bearer", "api_key": MCP_TOKEN, "allowed_tools": ["add", "slow", "spell", "ask"],
    }),
)  # fmt: skip


def seed_demo(base: str, operator_key: str) -> str:
    """Create the demo event once (wired to the simulator); return the demo attendee's key."""
    manage = httpx.Client(
        base_url=f"{base}/manage", headers={"x-aiproxy-operator-key": operator_key}
    )
    events = manage.get("/events").raise_for_status().json()
    demo = next((e for e in events if e["name"] == "AI Proxy demo"), None)
    if demo is None:
        today = datetime.now(UTC).date()
        demo = (
            manage.post(
                "/events",
                json={
                    "name": "AI Proxy demo",
                    "starts_at": f"{today - timedelta(days=1)}T00:00:00",
                    "ends_at": f"{today + timedelta(days=365)}T00:00:00",
                    "time_zone": "UTC",
                    "max_token_cap": 4096,
                    "daily_request_cap": 1000,
                    "daily_token_cap": 500_000,
                    "description_markdown": "A demo event served by the **simulated upstream**.",
                    "organizer_name": "AI Proxy",
                    "shared_code": "demo-event",
                },
            )
            .raise_for_status()
            .json()
        )
        simulator = f"http://127.0.0.1:{SIMULATOR_PORT}"
        for deployment, model_class, extra in DEMO_CATALOG:
            body = {
                "name": f"simulated {deployment}",
                "deployment": deployment,
                "model_class": model_class,
                "endpoint": simulator,
                "auth": "key",
                "api_key": SIMULATOR_KEY,
                **extra,
            }
            made = manage.post("/resources", json=body)
            if made.status_code != 201:
                raise SystemExit(f"the demo's {deployment} was refused: {made.text}")
            resource = made.json()
            manage.put(f"/events/{demo['id']}/resources/{resource['id']}").raise_for_status()
        print(f"created the demo event {demo['id']}")
    attendee = manage.post(f"/events/{demo['id']}/attendees", json={"user": DEMO_USER})
    return attendee.raise_for_status().json()["api_key"]


def examples(base: str, key: str, operator_key: str) -> str:
    return f"""
AI Proxy is running at {base}

  demo key: {key}
  operator key: {operator_key}

Manage events and resources as the operator (the key is in {SETTINGS_PATH.name}), with the CLI:

  export AIPROXY_ENDPOINT={base} AIPROXY_OPERATOR_KEY={operator_key}
  .venv/bin/aiproxy events list

or in the console, {base}/console, signed in with the operator key.

Attendees' playground (chat, images, voice) with the demo key: {base}/playground
MCP tools for agents, the demo key as a bearer token: {base}/mcp/tools

Try it with curl:

  curl -s {base}/openai/deployments/gpt-4o-mini/chat/completions?api-version=2024-10-21 \\
    -H "api-key: {key}" -H "content-type: application/json" \\
    -d '{{"messages": [{{"role": "user", "content": "Say hello"}}]}}'

Or with the OpenAI Python SDK (pip install openai):

  from openai import AzureOpenAI
  client = AzureOpenAI(azure_endpoint="{base.removesuffix("/api")}/api", api_key="{key}",
                       api_version="2024-10-21")
  reply = client.chat.completions.create(
      model="gpt-4o-mini", messages=[{{"role": "user", "content": "Say hello"}}])
  print(reply.choices[0].message.content)

Press Ctrl-C to stop.
"""


def _stop(*_: object) -> None:
    raise KeyboardInterrupt


def main() -> None:
    # Both signals stop everything cleanly, even when started with SIGINT ignored (nohup, &).
    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)
    values = ensure_local_settings()
    env = {**os.environ}
    for name, value in values.items():
        env.setdefault(name, str(value))
    # Azurite's usual queue port beside its usual table port; any free one otherwise.
    queue_port = 10001 if AZURITE_PORT == 10002 else None
    azurite = Azurite(AZURITE_PORT, DATA_DIR / "azurite", queue_port=queue_port).start()
    env["AIPROXY_STORAGE_CONNECTION_STRING"] = azurite.connection_string
    env["AzureWebJobsStorage"] = azurite.connection_string  # the queue triggers' storage
    # The demo's upstream is the simulator on 127.0.0.1 (settings written before it was needed).
    env.setdefault("AIPROXY_ALLOW_LOOPBACK_UPSTREAMS", "true")
    children = []
    try:
        simulator = subprocess.Popen(
            [sys.executable, "-m", "local.simulator", "--port", str(SIMULATOR_PORT),
             "--api-key", SIMULATOR_KEY, "--latency-ms-per-token", "15"],
            cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
        )  # fmt: skip
        children.append(simulator)
        mcp = subprocess.Popen(
            [sys.executable, "-m", "local.mcpserver", "--port", str(MCP_PORT),
             "--token", MCP_TOKEN],
            cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
        )  # fmt: skip
        children.append(mcp)
        host = subprocess.Popen(
            [sys.executable, "-m", "local.host", "--port", str(HOST_PORT),
             "--settings", str(SETTINGS_PATH)],
            cwd=ROOT, env=env,
        )  # fmt: skip
        children.append(host)
        wait_for_port(SIMULATOR_PORT, process=simulator)
        wait_for_port(MCP_PORT, process=mcp)
        wait_for_port(HOST_PORT, timeout=90, process=host)
        base = f"http://127.0.0.1:{HOST_PORT}/api"
        key = seed_demo(base, env["AIPROXY_OPERATOR_KEY"])
        print(examples(base, key, env["AIPROXY_OPERATOR_KEY"]), flush=True)
        while all(child.poll() is None for child in children):
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        for child in children:
            if child.poll() is None:
                child.terminate()
        for child in children:
            try:
                child.wait(15)
            except subprocess.TimeoutExpired:
                child.kill()
        azurite.stop()


if __name__ == "__main__":
    main()
