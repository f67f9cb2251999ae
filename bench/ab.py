"""A/B: the proxy at another commit against the working tree, in alternating rounds.

This machine's speed drifts by up to a third within minutes, so two `make bench` runs cannot
show a change of a few percent. Here Azurite and nginx start once, then the app twice, once at
the given commit (from a temporary git worktree) and once from the working tree, both measured
the same way; wrk drives them in turns (A B, B A, A B, ...) and the medians are compared.

The target is the worker, as in `make bench`: each side is a host stand-in (on the harness's
core) and its Python worker process (on the proxy's core), and CPU/req is the worker's. A commit
from before the worker runtime (no local/host.py) cannot run that way: then both sides are
measured in-process instead, the commit with its own dev host (local/devhost.py) and the working
tree with the bench's in-process server (bench/inprocess.py), and the output says so.

Run: python -m bench.ab [COMMIT] (default HEAD), or make bench-ab COMMIT=...
BENCH_MODE json|stream (stream), BENCH_CONNECTIONS (1), BENCH_SECONDS per round (6),
BENCH_ROUNDS (5).
"""

from __future__ import annotations

import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench import run as bench
from bench.servers import EXAMPLE_SETTINGS, InProcessApp, Server, WorkerApp, app_env, pinned

WARM_UP = 5_000  # requests through each side before the rounds


class DevHostApp(Server):
    """An older commit's own in-process dev host (local/devhost.py), on `cpu`."""

    def __init__(self, work: Path, storage: str, cpu: int | None, prefix: str, root: Path) -> None:
        args = [sys.executable, "-m", "local.devhost", "--port", "{port}"]
        args += ["--settings", str(root / EXAMPLE_SETTINGS.name), "--log-level", "warning"]
        env = app_env(storage, prefix, work)
        super().__init__("dev host", pinned(cpu, args), env, work / "devhost.log", cwd=root)

    @property
    def measured_pid(self) -> int:
        return self.pid


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

    proxy_cpu, load_cpu = bench.pin_to_cores()
    work = Path(tempfile.mkdtemp(prefix="aiproxy-ab-"))
    tree = work / "a"
    problem = bench.checkout(commit, tree)
    if problem:
        print(f"bench.ab: no worktree for {commit!r}: {problem}", file=sys.stderr)
        return 2
    on_worker = (tree / "local" / "host.py").exists()
    label = {"A": f"A ({commit})", "B": "B (working tree)"}
    if not on_worker:
        print(
            f"bench.ab: {commit} predates the worker runtime (no local/host.py): both sides run "
            "in-process, A on its own dev host, B on bench/inprocess.py",
            flush=True,
        )
    azurite = upstream = None
    apps: dict[str, Any] = {}
    try:
        azurite = Azurite(free_port()).start()
        storage = azurite.connection_string
        upstream = FakeUpstream(work / "nginx", [free_port(), free_port()], load_cpu).start()
        for name, root in (("A", tree), ("B", bench.ROOT)):
            folder = work / name.lower()
            folder.mkdir(exist_ok=True)
            prefix = f"ab{name.lower()}"
            if on_worker:
                apps[name] = WorkerApp(
                    folder, storage, load_cpu, proxy_cpu, prefix, root=root, name=f"worker-{name}"
                )
            elif name == "A":
                apps[name] = DevHostApp(folder, storage, proxy_cpu, prefix, root)
            else:
                apps[name] = InProcessApp(folder, storage, proxy_cpu, prefix)
        targets = {}
        for name, app in apps.items():
            app.wait()
            _event, key = bench.set_up_event(app.base, upstream.urls)
            targets[name] = bench.Target("proxy", app.base, "/api", key)
            bench.warm_up(targets[name], app.measured_pid, WARM_UP)
        where = "worker" if on_worker else "in-process"
        print(f"bench.ab: {where}, {mode}, {connections} connection(s), {rounds} rounds of "
              f"{seconds} s")  # fmt: skip
        results: dict[str, list[tuple[float, float, float, float]]] = {"A": [], "B": []}
        errors = 0
        for round_ in range(rounds):
            for name in ("A", "B") if round_ % 2 == 0 else ("B", "A"):
                app = apps[name]
                if on_worker:
                    app.repin()
                run, cpu = bench.measured_run(
                    app.measured_pid, targets[name], mode, connections, seconds
                )
                errors += run.non_2xx + run.socket_errors
                results[name].append((run.rps, run.p50_ms, run.p99_ms, cpu))
                print(
                    f"  {label[name]:<22} {run.rps:>8,.0f} req/s  p50 {run.p50_ms:.3f} ms  "
                    f"p99 {run.p99_ms:.2f} ms  CPU/req {cpu:.3f} ms",
                    flush=True,
                )
        column = "worker CPU/req ms" if on_worker else "CPU/req ms"
        print(f"\n| side | req/s | p50 ms | p99 ms | {column} |\n|---|---:|---:|---:|---:|")
        for name, rows in results.items():
            rps, p50, p99, cpu = (statistics.median(r[i] for r in rows) for i in range(4))
            print(f"| {label[name]} | {rps:,.0f} | {p50:.3f} | {p99:.2f} | {cpu:.3f} |")
        print(f"\nMedians of {rounds} rounds each ({where}); non-2xx and socket errors: {errors}.")
        return 1 if errors else 0
    finally:
        bench.stop_all(*apps.values(), upstream, azurite)
        bench.remove_checkout(tree)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
