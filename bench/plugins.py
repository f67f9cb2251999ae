"""The cost per call of the plugin hook points (shared/plugins), with none loaded and with the
shipped ones.

A micro-benchmark in one process, no storage and no HTTP: what the request path pays at the
request hook (Call.screen) and the usage hook (UsageWriter.append offering a record to the
sinks), plus what the CSV sink spends per record off the request path. Part of `make bench`;
writes bench/results/plugins.md.

Run: python -m bench.plugins [calls]
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from bench.cpu import per_call, per_call_async, report
from shared.plugins import Plugin, Plugins, RequestContext
from shared.plugins.csv_usage import CsvUsage
from shared.plugins.wordfilter import WordFilter

RESULTS = Path(__file__).resolve().parent / "results" / "plugins.md"
WORDS = [f"blocked{i}" for i in range(18)] + ["project falcon", "project kestrel"]
PATTERNS = [r"\b\d{3}-\d{2}-\d{4}\b", r"\b(?:\d[ -]?){13,16}\b"]  # ids and card numbers
EMAIL = r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+"
SYSTEM = "You are a helpful assistant for a hackathon. Answer briefly and cite the docs you use."
QUESTION = (
    "How do I stream a chat completion with the Python SDK, and how do I read the usage of the "
    "whole stream at the end? Show a short example that prints each token as it arrives."
)
RECORD = {
    "PartitionKey": "e1_2026-12-01",
    "RowKey": "20261201T120000000000_r1",
    "event_id": "e1",
    "attendee_id": "a1",
    "deployment": "gpt-4o-mini",
    "resource_id": "r1",
    "model_class": "openai-chat",
    "status": 200,
    "prompt_tokens": 42,
    "completion_tokens": 128,
    "total_tokens": 170,
    "streamed": True,
    "estimated": False,
    "latency_ms": 812.5,
    "time": "2026-12-01T12:00:00.000000+00:00",
    "local_date": "2026-12-01",
    "request_id": "r1",
    "outcome": "ok",
    "units": 0,
    "reasoning_tokens": 0,
}


def chat_body(question: str = QUESTION) -> dict[str, Any]:
    return {
        "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": question},
        ],
        "max_tokens": 256,
    }


class Nothing(Plugin):
    """An async request hook and a usage hook that do nothing: the framework's own cost."""

    queue_size = 10**9

    async def on_request(self, context: RequestContext, body: dict[str, Any]) -> None:
        return None

    async def on_usage(self, records: list[dict[str, Any]]) -> None:
        return None


def context() -> RequestContext:
    return RequestContext("r1", "e1", "a1", "ada@example.com", "chat/completions", "openai-chat",
                          "gpt-4o-mini")  # fmt: skip


def screening(plugins: Plugins, question: str = QUESTION) -> Callable[[int], Awaitable[None]]:
    """The request hook point as ProxyCall.parse has it: the check, the context, the hooks."""

    async def run(n: int) -> None:
        for _ in range(n):
            body = chat_body(question)  # a fresh body per call, as parsed from the request
            if plugins.requests:
                await plugins.screen(context(), body)

    return run


def offering(plugins: Plugins) -> Callable[[int], None]:
    """The usage hook point as UsageWriter.append has it."""
    observer = plugins.observer

    def run(n: int) -> None:
        for _ in range(n):
            if observer is not None:
                observer(RECORD)

    return run


def checking(plugins: Plugins) -> Callable[[int], None]:
    """Only the checks both hook points make when no plugin is loaded."""
    observer = plugins.observer

    def run(n: int) -> None:
        for _ in range(n):
            if plugins.requests or observer is not None:
                raise AssertionError("a plugin is loaded")

    return run


def looping(n: int) -> None:
    for _ in range(n):
        pass


async def _measure(calls: int) -> list[tuple[str, float]]:
    none = Plugins([])
    words = Plugins([("wordfilter", WordFilter({"words": WORDS}))])
    refuse = Plugins([("wordfilter", WordFilter({"words": WORDS, "patterns": PATTERNS}))])
    mask = Plugins([("pii", WordFilter({"patterns": [EMAIL], "action": "mask"}))])
    nothing = Plugins([("nothing", Nothing({}))])
    # A fresh body per call (masking changes it) and the check: what the loaded cases add to.
    base = await per_call_async(screening(none), calls)
    base_mail = await per_call_async(screening(none, QUESTION + " Mail ada@example.com."), calls)
    results = [
        ("both hook points, no plugin loaded (one check each)",
         per_call(checking(none), calls * 10) - per_call(looping, calls * 10)),
        ("request hook, an async hook that does nothing (the framework's cost)",
         await per_call_async(screening(nothing), calls) - base),
        ("request hook, wordfilter refuse: 20 words, no match",
         await per_call_async(screening(words), calls) - base),
        ("request hook, wordfilter refuse: 20 words and 2 patterns, no match",
         await per_call_async(screening(refuse), calls) - base),
        ("request hook, wordfilter mask: one e-mail address replaced",
         await per_call_async(screening(mask, QUESTION + " Mail ada@example.com."), calls)
         - base_mail),
        ("usage hook, one sink loaded (a copy of the record into its queue)",
         per_call(offering(nothing), calls)),
    ]  # fmt: skip
    await nothing.close(timeout=10)
    with tempfile.TemporaryDirectory() as folder:
        sink = CsvUsage({"path": str(Path(folder) / "usage.csv")})
        batch = [RECORD] * 100

        def writing(n: int) -> None:
            for _ in range(n // 100):
                sink.on_usage(batch)

        results.append(("csv_usage, per record, in batches of 100 (in its thread)",
                        per_call(writing, calls)))  # fmt: skip
    return results


def main() -> None:
    calls = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
    report(
        RESULTS, "Plugin hook points: CPU per call", calls, asyncio.run(_measure(calls)),
        machine=f", load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores",
        after=" Request hook cases exclude building the body. A proxied call costs 440 to "
        "1,400 µs of CPU (docs/performance.md).",
        digits=3,
    )  # fmt: skip


if __name__ == "__main__":
    main()
