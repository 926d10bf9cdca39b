"""Per-request cost of `RouteMetrics.observe` (issue 11): a timeit micro-benchmark.

Run: `.venv/bin/python bench/observe_cost.py`. Three records, as the proxy sees them: a
healthy request with one attempt, a retried one (two attempts, one retry), and a breaker
rejection served from the fallback store. Prints microseconds per `observe()` call, best
of 5 repeats.
"""

from __future__ import annotations

import sys
import timeit
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from proxy.observe.metrics import Metrics, RequestRecord


def records() -> dict[str, RequestRecord]:
    healthy = RequestRecord("GET")
    healthy.code = 200
    healthy.attempts.append(("ok", 0.004))
    retried = RequestRecord("POST")
    retried.code = 200
    retried.attempts.extend((("status", 0.02), ("ok", 0.01)))
    retried.retries.append("503")
    rejected = RequestRecord("GET")
    rejected.code, rejected.outcome = 200, "fallback-stale"
    if hasattr(rejected, "breaker_rejected"):
        rejected.breaker_rejected = 1
    return {"healthy": healthy, "retried": retried, "rejected+stale": rejected}


def main(number: int = 200_000) -> None:
    metrics = Metrics()
    route = metrics.route("bench", "upstream")
    for name, rec in records().items():
        best = min(
            timeit.repeat(
                lambda rec=rec: route.observe(rec, 0.005, True, 1000.0), number=number, repeat=5
            )
        )
        print(f"{name:16s} {best / number * 1e6:6.2f} µs per observe()")


if __name__ == "__main__":
    main()
