"""The worker's CPU per proxied call: the app against the relay function, in one run.

Issue 26's figure: the app's worker CPU per call over the relay function's (bench/relay_function.py:
the same worker runtime and host stand-in, serving only a bare relay), plain and streamed, at 1
and 16 connections. Azurite and nginx start once; the app (the working tree), the relay function
and, given a commit, the app at that commit (from a temporary git worktree) each run as a host
stand-in (on the load core) with its worker (on the proxy's core). wrk drives them in turns,
the order rotating each round, and the medians of the rounds are compared: the machine's speed
drifts, so only figures of one run are set side by side.

PERCALL_PROFILE=1 then samples each worker with py-spy through one more run per mode at 16
connections and prints the functions with the largest share of the samples (self and
inclusive), the app's against the relay function's: where the app's own CPU goes.

Run: python -m bench.percall [COMMIT]. BENCH_SECONDS per round (5), BENCH_ROUNDS (3).
Writes bench/results/cpu-per-call.md and cpu-per-call.json (…-journal-off.* with
PERCALL_JOURNAL_OFF=1, which adds the app without its journal as a third target).
"""

from __future__ import annotations

import collections
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import run as bench
from bench.servers import WorkerApp, pinned

CASES = (("json", 1), ("json", 16), ("stream", 1), ("stream", 16))
WARM_UP = 3_000  # requests through each target before the rounds
FLOOR = "relay function"
APP = "app"
PROFILE = os.environ.get("PERCALL_PROFILE", "") not in ("", "0")
PROFILE_SECONDS = int(os.environ.get("PERCALL_PROFILE_SECONDS", "10") or 10)
# PERCALL_PROFILE_CONNECTIONS: the connections of the profiled runs (16); PERCALL_GIL=1 samples
# only the thread holding the GIL (Python's own CPU, without threads waiting for it).
PROFILE_CONNECTIONS = int(os.environ.get("PERCALL_PROFILE_CONNECTIONS", "16") or 16)
GIL = os.environ.get("PERCALL_GIL", "") not in ("", "0")
# PERCALL_CASES: which cases to measure, e.g. "json,1 stream,16" (all four by default).
ONLY = os.environ.get("PERCALL_CASES", "").split()
# PERCALL_JOURNAL_OFF=1: the app a second time, without its journal of calls in flight
# (AIPROXY_CALL_EXPIRY_SECONDS=0), measured in the same rounds: what that guarantee costs.
JOURNAL_OFF = os.environ.get("PERCALL_JOURNAL_OFF", "") not in ("", "0")
NO_JOURNAL = "app, journal off"
RATE = 250  # py-spy samples per second
TOP = 25
# The parts of a call the profile's samples are put in: the first part whose prefix a frame of
# the sample's stack starts with (most specific first); the rest is the runtime's.
PARTS = (
    ("the journal of calls in flight (entry written, deleted)",
     ("shared/governance/journal.py", "shared/platform/tablewire.py",
      "shared/platform/tables.py")),
    ("the usage record (ledger, usage writer, prices)",
     ("shared/pipeline/ledger.py:Ledger.record", "shared/governance/usage.py",
      "shared/governance/prices.py")),
    ("the upstream request (forwarding, pooled client)",
     ("shared/pipeline/forwarding.py", "shared/upstreams/")),
    ("the relay and the stream's meter", ("shared/pipeline/relays.py",
                                         "shared/pipeline/streaming.py")),
    ("the gate (key, event)", ("shared/access/",)),
    ("admission (caps, limits, fair share, budgets)",
     ("shared/pipeline/ledger.py:Ledger.admit", "shared/governance/")),
    ("the rest of the app's call (body, rewrite, answer)", ("shared/", "function_app.py")),
)  # fmt: skip
RUNTIME = "the runtime: worker, HTTP server, event loop, gRPC (no frame of the app)"


def main(argv: list[str]) -> int:
    commit = argv[0] if argv else ""
    seconds = bench.env_int("BENCH_SECONDS", 5)
    rounds = bench.env_int("BENCH_ROUNDS", 3)
    bench.ensure_tools()
    from bench.nginx import API_KEY, FakeUpstream
    from local.azurite import Azurite, free_port

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    proxy_cpu, load_cpu = bench.pin_to_cores()
    work = Path(tempfile.mkdtemp(prefix="aiproxy-percall-"))
    tree = work / "before"
    older = f"app at {commit}" if commit else ""
    if commit:
        problem = bench.checkout(commit, tree)
        if problem:
            print(f"bench.percall: no worktree for {commit!r}: {problem}", file=sys.stderr)
            return 2
    azurite = upstream = None
    apps: dict[str, WorkerApp] = {}
    try:
        azurite = Azurite(free_port()).start()
        storage = azurite.connection_string
        upstream = FakeUpstream(work / "nginx", [free_port(), free_port()], load_cpu).start()
        apps[FLOOR] = WorkerApp(
            work, storage, load_cpu, proxy_cpu, "pcfloor", name="relay-function",
            AIPROXY_WORKER_PRELOAD="bench.relay_function", BENCH_RELAY_UPSTREAM=upstream.urls[0],
        )  # fmt: skip
        apps[APP] = WorkerApp(work, storage, load_cpu, proxy_cpu, "pcapp", name="app")
        if JOURNAL_OFF:
            apps[NO_JOURNAL] = WorkerApp(
                work, storage, load_cpu, proxy_cpu, "pcnojournal", name="app-no-journal",
                AIPROXY_CALL_EXPIRY_SECONDS="0",
            )  # fmt: skip
        if commit:
            apps[older] = WorkerApp(
                work, storage, load_cpu, proxy_cpu, "pcbefore", root=tree, name="app-before"
            )
        targets: dict[str, bench.Target] = {}
        for name, app in apps.items():
            app.wait()
            if name == FLOOR:
                targets[name] = bench.Target(name, app.base, "/api", API_KEY)
            else:
                _event, key = bench.set_up_event(app.base, upstream.urls)
                targets[name] = bench.Target(name, app.base, "/api", key)
            bench.warm_up(targets[name], app.measured_pid, WARM_UP)
        names = list(apps)
        results: dict[str, dict[str, list[float]]] = {}
        errors = 0
        for mode, connections in CASES:
            if ONLY and f"{mode},{connections}" not in ONLY:
                continue
            case = f"{mode}, c{connections}"
            results[case] = {name: [] for name in names}
            for round_ in range(rounds):
                order = names[round_ % len(names) :] + names[: round_ % len(names)]
                for name in order:
                    app = apps[name]
                    app.repin()
                    run, cpu = bench.measured_run(
                        app.measured_pid, targets[name], mode, connections, seconds
                    )
                    errors += run.non_2xx + run.socket_errors
                    results[case][name].append(cpu)
                    print(f"  {case:<11} {name:<24} {run.rps:>7,.0f} req/s  "
                          f"CPU/call {cpu:.3f} ms", flush=True)  # fmt: skip
        profiles = profile_all(apps, targets) if PROFILE else {}
        results = {case: by for case, by in results.items() if any(by.values())}
        write(results, names, older, rounds, seconds, errors, profiles)
        return 1 if errors else 0
    finally:
        bench.stop_all(*apps.values(), upstream, azurite)
        if commit:
            bench.remove_checkout(tree)
        shutil.rmtree(work, ignore_errors=True)


def profile_all(
    apps: dict[str, WorkerApp], targets: dict[str, bench.Target]
) -> dict[str, dict[str, Any]]:
    """Per mode and target: py-spy's samples of the worker through one run at 16 connections."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    out: dict[str, dict[str, Any]] = {}
    if not Path(spy).exists():
        print("bench.percall: py-spy is missing; no profiles", file=sys.stderr)
        return out
    folder = bench.RESULTS / "profiles"
    folder.mkdir(parents=True, exist_ok=True)
    for mode in ("json", "stream"):
        for name, app in apps.items():
            pid = app.repin()
            path = folder / f"percall-{name.replace(' ', '-')}-{mode}.txt"
            args = [spy, "record", "--pid", str(pid), "--rate", str(RATE), "--format", "raw",
                    "--output", str(path), "--nonblocking", *(["--gil"] if GIL else [])]  # fmt: skip
            spying = subprocess.Popen(
                pinned(bench.LOAD_CPU if bench.CPUS >= 2 else None, args),
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            found = bench.wrk(targets[name], mode, PROFILE_CONNECTIONS, PROFILE_SECONDS)
            spying.send_signal(signal.SIGINT)
            try:
                spying.wait(60)
            except subprocess.TimeoutExpired:
                spying.kill()
            bench.settle(app.measured_pid)
            out.setdefault(mode, {})[name] = {
                "requests": found["requests"],
                **(shares(path) if path.exists() else {}),
            }
    return out


def shares(path: Path) -> dict[str, Any]:
    """Samples per function (self: the innermost frame; inclusive: anywhere on the stack)."""
    own: collections.Counter[str] = collections.Counter()
    within: collections.Counter[str] = collections.Counter()
    parts: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        samples = int(count)
        frames = [frame_name(f) for f in stack.split(";")]
        frames = [f for f in frames if f]
        if not frames:
            continue
        total += samples
        own[frames[-1]] += samples
        for frame in set(frames):
            within[frame] += samples
        parts[part_of(frames)] += samples
    return {"samples": total, "self": own.most_common(60), "inclusive": within.most_common(60),
            "parts": parts.most_common()}  # fmt: skip


def part_of(frames: list[str]) -> str:
    for name, prefixes in PARTS:
        if any(frame.startswith(prefixes) for frame in frames):
            return name
    return RUNTIME


def frame_name(frame: str) -> str:
    """`function (path/to/module.py:line)` as `module.py:function`, the thread's name dropped."""
    if frame.startswith(("process ", "thread ")) or " (" not in frame:
        return ""
    function, _, where = frame.partition(" (")
    file = where.rsplit(":", 1)[0]
    parts = Path(file).parts
    for anchor in ("site-packages", "lib", "shared", "local", "bench"):
        if anchor in parts:
            i = len(parts) - 1 - parts[::-1].index(anchor)
            tail = parts[i + 1 :] if anchor in ("site-packages", "lib") else parts[i:]
            if tail and tail[0].startswith("python3"):
                tail = tail[1:]
            file = "/".join(tail)
            break
    return f"{file}:{function}"


def write(
    results: dict[str, dict[str, list[float]]],
    names: list[str],
    older: str,
    rounds: int,
    seconds: int,
    errors: int,
    profiles: dict[str, dict[str, Any]],
) -> None:
    medians = {
        case: {name: statistics.median(values) for name, values in by.items()}
        for case, by in results.items()
    }
    head = "| case | " + " | ".join(f"{n} ms" for n in names) + f" | {APP} / {FLOOR} |"
    if NO_JOURNAL in names:
        head += f" {NO_JOURNAL} / {FLOOR} |"
    if older:
        head += f" {older} / {FLOOR} |"
    extra = (NO_JOURNAL in names) + bool(older)
    lines = [
        "# Worker CPU per proxied call: the app against the relay function",
        "",
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC, Python {platform.python_version()}, "
        f"{platform.machine()}, {bench.CPUS} CPUs. Each target is a host stand-in with its "
        "worker (the relay function: bench/relay_function.py in the same runtime); the worker "
        "alone on the proxy's core, wrk, nginx, Azurite and the stand-ins on the other. "
        f"{rounds} rounds of {seconds} s per case and target, the order rotating each round; "
        "the worker's CPU per call, median of the rounds. Journal and usage records on "
        "(the defaults)"
        + (
            f"; '{NO_JOURNAL}' is the app with AIPROXY_CALL_EXPIRY_SECONDS=0"
            if NO_JOURNAL in names
            else ""
        )
        + f". Non-2xx and socket errors: {errors}. `python -m bench.percall`.",
        "",
        head,
        "|---|" + "---:|" * (len(names) + 1 + extra),
    ]
    for case, by in medians.items():
        row = f"| {case} | " + " | ".join(f"{by[n]:.3f}" for n in names)
        row += f" | {by[APP] / by[FLOOR]:.2f}× |"
        if NO_JOURNAL in by:
            row += f" {by[NO_JOURNAL] / by[FLOOR]:.2f}× |"
        if older:
            row += f" {by[older] / by[FLOOR]:.2f}× |"
        lines.append(row)
    for mode, by in profiles.items():
        where = f"{mode}, {PROFILE_CONNECTIONS} connection(s)" + (
            ", GIL holder only" if GIL else ""
        )
        lines += ["", f"## Where the worker's CPU goes: {where} (py-spy)", ""]
        lines.append(
            "Microseconds per call of each worker's samples (py-spy, 250 a second, idle threads "
            "left out, over one run): inclusive is anywhere on the stack, self the innermost "
            "frame. The top by the app's inclusive figure over the relay function's."
        )
        lines += [
            "",
            "By part of the call (µs per call):",
            "",
            "| part | " + " | ".join(by) + " |",
            "|---|" + "---:|" * len(by),
        ]
        per_call = {
            n: {k: v * 1e6 / RATE / max(p["requests"], 1) for k, v in p.get("parts", [])}
            for n, p in by.items()
        }
        for part in [name for name, _ in PARTS] + [RUNTIME]:
            lines.append(f"| {part} | " + " | ".join(
                f"{per_call[n].get(part, 0):.0f}" for n in by) + " |")  # fmt: skip
        lines += ["", "| function | " + " | ".join(f"{n} incl. | self" for n in by) + " |",
                  "|---|" + "---:|---:|" * len(by)]  # fmt: skip
        us = {
            n: (
                {k: v * 1e6 / RATE / max(p["requests"], 1) for k, v in p.get("inclusive", [])},
                {k: v * 1e6 / RATE / max(p["requests"], 1) for k, v in p.get("self", [])},
            )
            for n, p in by.items()
        }
        lines.append(
            "| all samples | "
            + " | ".join(
                f"{by[n].get('samples', 0) * 1e6 / RATE / max(by[n]['requests'], 1):.0f} | "
                for n in by
            )
            + " |"
        )
        app_incl = us.get(APP, ({}, {}))[0]
        floor_incl = us.get(FLOOR, ({}, {}))[0]
        ranked = sorted(app_incl, key=lambda k: app_incl[k] - floor_incl.get(k, 0), reverse=True)
        for key in ranked[:TOP]:
            cells = " | ".join(
                f"{us[n][0].get(key, 0):.0f} | {us[n][1].get(key, 0):.0f}" for n in by
            )
            lines.append(f"| `{key}` | {cells} |")
        own = us.get(APP, ({}, {}))[1]
        lines += ["", f"The app's top functions by self time, {mode}:", ""]
        lines += [f"- `{k}`: {v:.0f} µs" for k, v in sorted(own.items(), key=lambda i: -i[1])[:TOP]]
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    bench.RESULTS.mkdir(parents=True, exist_ok=True)
    name = "cpu-per-call" + ("-journal-off" if NO_JOURNAL in names else "")
    (bench.RESULTS / f"{name}.md").write_text(text)
    data = {"medians": medians, "rounds": results, "profiles": profiles}
    (bench.RESULTS / f"{name}.json").write_text(json.dumps(data, indent=1) + "\n")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
