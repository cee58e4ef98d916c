"""Counters and a latency histogram for ``/slmigrate/metrics`` (Prometheus text format, no extra dependency)."""

from __future__ import annotations

import bisect
import threading
from typing import Any

BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class Metrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: dict[str, int] = {}
        self.errors: dict[str, int] = {}
        self._bucket_counts = [0] * (len(BUCKETS) + 1)
        self._latency_sum = 0.0
        self._latency_count = 0

    def observe(self, route: str, seconds: float, failed: bool) -> None:
        with self._lock:
            self.requests[route] = self.requests.get(route, 0) + 1
            if failed:
                self.errors[route] = self.errors.get(route, 0) + 1
            self._bucket_counts[bisect.bisect_left(BUCKETS, seconds)] += 1
            self._latency_sum += seconds
            self._latency_count += 1

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {"requests": dict(self.requests), "errors": dict(self.errors),
                    "latency_count": self._latency_count, "latency_sum_s": round(self._latency_sum, 6)}

    def render(self, writer_stats: dict[str, Any]) -> str:
        lines: list[str] = []

        def family(name: str, kind: str, help_text: str) -> None:
            lines.append(f"# HELP {name} {help_text}")
            lines.append(f"# TYPE {name} {kind}")

        with self._lock:
            family("slmigrate_proxy_requests_total", "counter", "Requests proxied, by route.")
            for route, n in sorted(self.requests.items()):
                lines.append(f'slmigrate_proxy_requests_total{{route="{route}"}} {n}')
            family("slmigrate_proxy_errors_total", "counter",
                   "Requests answered with an error (upstream 4xx/5xx, unreachable, timeout), by route.")
            for route, n in sorted(self.errors.items()):
                lines.append(f'slmigrate_proxy_errors_total{{route="{route}"}} {n}')
            family("slmigrate_proxy_request_duration_seconds", "histogram",
                   "Time from request to the end of the response, upstream included.")
            running = 0
            for bound, count in zip(BUCKETS, self._bucket_counts):
                running += count
                lines.append(f'slmigrate_proxy_request_duration_seconds_bucket{{le="{bound}"}} {running}')
            running += self._bucket_counts[-1]
            lines.append(f'slmigrate_proxy_request_duration_seconds_bucket{{le="+Inf"}} {running}')
            lines.append(f"slmigrate_proxy_request_duration_seconds_sum {self._latency_sum:.6f}")
            lines.append(f"slmigrate_proxy_request_duration_seconds_count {self._latency_count}")
        for key, kind, help_text in (
            ("logged", "counter", "Calls written to the store."),
            ("dropped", "counter", "Captured calls lost (queue full; the store and the dead-letter file both failed)."),
            ("deadlettered", "counter", "Captured calls kept in the dead-letter file because the store could not "
                                        "take them."),
            ("store_failures", "counter", "Failed store writes (each retried)."),
            ("pending", "gauge", "Captured calls not yet written."),
        ):
            name = f"slmigrate_capture_{key}" + ("_total" if kind == "counter" else "")
            family(name, kind, help_text)
            lines.append(f"{name} {writer_stats.get(key, 0)}")
        return "\n".join(lines) + "\n"
