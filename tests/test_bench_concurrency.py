"""The concurrency sweep's verdicts (bench/concurrency.py): what the performance page and the
default of AIPROXY_HTTP_CONCURRENCY are read from. Built from made-up summaries, no servers."""

from __future__ import annotations

from typing import Any

from bench import concurrency


def summary(target: str, *, first: float, whole: float, whole_p50: float = 1_000.0,
            failed: int = 0, rss: float = 100.0, cpu1: float = 0.5) -> dict[str, Any]:  # fmt: skip
    return {
        "target": target,
        "clients": 64,
        "failed": failed,
        "first_byte_p50_ms": first / 4,
        "first_byte_p99_ms": first,
        "whole_p50_ms": whole_p50,
        "whole_p99_ms": whole,
        "worker_cpu_ms_per_call": 5.0 if target == "worker" else 4.0,
        "worker_rss_peak_mib": rss,
        "cpu1_busy": cpu1,
        "cpu1_other": 0.0,
    }


def level(app_first: float, floor_whole_p50: float = 1_050.0) -> dict[str, Any]:
    direct = summary("direct", first=3.0, whole=1_030.0)
    floor = summary("floor", first=30.0, whole=1_100.0, whole_p50=floor_whole_p50)
    worker = summary("worker", first=30.0 + app_first, whole=1_101.0, whole_p50=floor_whole_p50)
    return {"direct": direct, "floor": floor, "worker": worker, "app_first": False,
            "judged": concurrency.judge(floor, worker, direct)}  # fmt: skip


def test_a_level_is_judged_on_what_the_app_adds_over_the_relay_function() -> None:
    passing = level(app_first=5.0)["judged"]
    assert passing["added_first_byte_p99_ms"] == 5.0
    assert passing["added_whole_p99_ms"] == 1.0
    assert passing["cpu_per_call_over_floor"] == 1.25
    assert passing["verdict"] == "passes"

    failing = level(app_first=25.0)["judged"]
    assert failing["verdict"] == "fails"
    assert "first_byte_p99_ms added 25.0 ms" in failing["why_not"]


def test_a_level_whose_relay_function_streams_slow_down_gets_no_verdict() -> None:
    # The relay function's streams took 40% longer than direct ones at the median: the
    # harness, not the app, sets that level's tail, whatever the app adds.
    limited = level(app_first=0.0, floor_whole_p50=1_400.0)["judged"]
    assert limited["harness_slowed"] == 0.4
    assert limited["verdict"] == "harness-limited"
    assert not limited["passes"]
    assert "40% longer" in limited["why_not"]


def test_rounds_are_judged_on_their_medians() -> None:
    rounds = [level(app_first=value) for value in (30.0, 2.0, 4.0)]
    row = concurrency.combined(rounds)
    assert row["judged"]["added_first_byte_p99_ms"] == 4.0
    assert row["judged"]["verdict"] == "passes"
    assert [r["added_first_byte_p99_ms"] for r in row["judged"]["rounds"]] == [30.0, 2.0, 4.0]

    limited = [level(app_first=0.0, floor_whole_p50=1_400.0) for _ in range(3)]
    assert concurrency.combined(limited)["judged"]["verdict"] == "harness-limited"


def test_the_answer_is_the_highest_level_below_the_first_that_fails_or_cannot_be_carried() -> None:
    def row(clients: int, verdict: str) -> dict[str, Any]:
        return {"judged": {"clients": clients, "verdict": verdict, "passes": verdict == "passes"}}

    assert concurrency.highest_passing(
        [row(16, "passes"), row(32, "passes"), row(64, "passes"), row(128, "harness-limited"),
         row(256, "passes")]
    ) == 64  # fmt: skip
    assert concurrency.highest_passing(
        [row(16, "passes"), row(32, "inconclusive"), row(64, "fails"), row(128, "passes")]
    ) == 16  # fmt: skip
    assert concurrency.highest_passing([row(16, "fails")]) is None
