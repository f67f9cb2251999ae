"""A/B: the proxy at another commit against the working tree, in alternating rounds.

This machine's speed drifts by up to a third within minutes, so two `make bench` runs cannot
show a change of a few percent. Here Azurite and nginx start once, then two dev hosts, one
running the given commit (from a temporary git worktree) and one the working tree, both pinned
to the proxy's core; wrk drives them in turns (A B, B A, A B, ...) and the medians are compared.

Run: python -m bench.ab [COMMIT] (default HEAD), or make bench-ab COMMIT=...
BENCH_MODE json|stream (stream), BENCH_CONNECTIONS (1), BENCH_SECONDS per round (6),
BENCH_ROUNDS (5).
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench import run as bench

WARM_UP = 5_000  # requests through each host before the rounds


def main(argv: list[str]) -> int:
    commit = argv[0] if argv else "HEAD"
    mode = os.environ.get("BENCH_MODE", "stream")
    connections = bench.env_int("BENCH_CONNECTIONS", 1)
    seconds = bench.env_int("BENCH_SECONDS", 6)
    rounds = bench.env_int("BENCH_ROUNDS", 5)
    if mode not in bench.MODES:
        print(f"bench.ab: BENCH_MODE must be one of {', '.join(bench.MODES)}", file=sys.stderr)
        return 2
    bench.ensure_tools()
    from bench.nginx import FakeUpstream
    from local.azurite import Azurite, free_port

    two_cores = bench.CPUS >= 2
    if two_cores:
        os.sched_setaffinity(0, {bench.LOAD_CPU})
    proxy_cpu = bench.PROXY_CPU if two_cores else None
    work = Path(tempfile.mkdtemp(prefix="aiproxy-ab-"))
    tree = work / "a"
    added = subprocess.run(
        ["git", "worktree", "add", "--detach", str(tree), commit],
        cwd=bench.ROOT, capture_output=True, text=True,
    )  # fmt: skip
    if added.returncode:
        print(f"bench.ab: no worktree for {commit!r}: {added.stderr.strip()}", file=sys.stderr)
        return 2
    label = {"A": f"A ({commit})", "B": "B (working tree)"}
    azurite = upstream = None
    hosts: dict[str, bench.AppHost] = {}
    try:
        azurite = Azurite(free_port()).start()
        upstream = FakeUpstream(
            work / "nginx", [free_port(), free_port()], bench.LOAD_CPU if two_cores else None
        ).start()
        targets = {}
        for name, root in (("A", tree), ("B", bench.ROOT)):
            (work / name.lower()).mkdir(exist_ok=True)
            hosts[name] = bench.AppHost(
                work / name.lower(), azurite.connection_string, proxy_cpu, root=root
            )
        for name, host in hosts.items():
            host.wait()
            _event, key = bench.set_up_event(host.base, upstream.urls)
            targets[name] = bench.Target("proxy", host.base, "/api", key)
            bench.smoke(targets[name])
            bench.wrk(targets[name], "json", 16, 120, stop_after=WARM_UP, mix=True)
            bench.settle(host.pid)
        print(f"bench.ab: {mode}, {connections} connection(s), {rounds} rounds of {seconds} s")
        results: dict[str, list[tuple[float, float, float, float]]] = {"A": [], "B": []}
        errors = 0
        for round_ in range(rounds):
            for name in ("A", "B") if round_ % 2 == 0 else ("B", "A"):
                host = hosts[name]
                before = bench.cpu_seconds(host.pid)
                run = bench.to_run(
                    targets[name], mode, connections,
                    bench.wrk(targets[name], mode, connections, seconds),
                )  # fmt: skip
                bench.settle(host.pid)
                cpu = (bench.cpu_seconds(host.pid) - before) * 1000 / max(run.requests, 1)
                errors += run.non_2xx + run.socket_errors
                results[name].append((run.rps, run.p50_ms, run.p99_ms, cpu))
                print(
                    f"  {label[name]:<22} {run.rps:>8,.0f} req/s  p50 {run.p50_ms:.3f} ms  "
                    f"p99 {run.p99_ms:.2f} ms  CPU/req {cpu:.3f} ms",
                    flush=True,
                )
        print("\n| host | req/s | p50 ms | p99 ms | CPU/req ms |\n|---|---:|---:|---:|---:|")
        for name, rows in results.items():
            rps, p50, p99, cpu = (statistics.median(r[i] for r in rows) for i in range(4))
            print(f"| {label[name]} | {rps:,.0f} | {p50:.3f} | {p99:.2f} | {cpu:.3f} |")
        print(f"\nMedians of {rounds} rounds each; non-2xx and socket errors: {errors}.")
        return 1 if errors else 0
    finally:
        for host in hosts.values():
            host.stop()
        if upstream is not None:
            upstream.stop()
        if azurite is not None:
            azurite.stop()
        subprocess.run(
            ["git", "worktree", "remove", "--force", str(tree)],
            cwd=bench.ROOT, capture_output=True,
        )  # fmt: skip


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
