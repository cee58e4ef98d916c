"""Router overhead per request on CPU: assigning a request to a cluster and validating an answer (no generation).

Builds a clustered workspace from the examples generator (import -> curate without PII -> cluster with the real
MiniLM), then times, per request of a held-out log (other seed, so latest turns are new to the embedder cache):
  - assign: the saved cluster model on the request alone (what `slmigrate serve` does before answering);
  - validate: the answer checks (tool offered, arguments parse and fit the schema, JSON, non-empty);
  - total = assign + validate.
Side by side in the same run: the same assignment with the turn's embedding already cached (a repeated
request), which isolates the one MiniLM encode that dominates. Prints one JSON line.

    .venv/bin/python tests/benchmarks/router_overhead.py [--requests 300]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def percentile(values, q):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=300)
    args = parser.parse_args()

    from slmigrate.cluster import cluster
    from slmigrate.collect import import_calls
    from slmigrate.config import load_config
    from slmigrate.curate import curate
    from slmigrate.serve.assign import request_assigner
    from slmigrate.serve.validation import validate_answer
    from slmigrate.workspace import Workspace

    tmp = Path(tempfile.mkdtemp(prefix="router-bench-"))
    train_log, live_log = tmp / "train.jsonl", tmp / "live.jsonl"
    for path, seed, n in ((train_log, 0, 600), (live_log, 1, args.requests)):
        subprocess.run([sys.executable, str(ROOT / "examples" / "agent_log.py"), "--out", str(path), "--calls",
                        str(n), "--seed", str(seed)], check=True, capture_output=True)
    ws = Workspace.open(tmp / "ws")
    import_calls(ws, [train_log])
    config = load_config(None, {"curate": {"pii": "off"}})
    curate(ws, config.curate)
    cluster(ws, config)
    assign = request_assigner(ws)

    live = [json.loads(line) for line in live_log.read_text().splitlines()]
    assign(live[0]["request"])  # load MiniLM once, outside the timings

    assign_ms, cached_ms, validate_ms, hits = [], [], [], 0
    for rec in live:
        request, answer = rec["request"], rec["response"]["choices"][0]["message"]
        t0 = time.perf_counter()
        cid, _ = assign(request)
        t1 = time.perf_counter()
        validate_answer(answer, request.get("tools"), "tool_call" if answer.get("tool_calls") else "text")
        t2 = time.perf_counter()
        assign(request)  # same request again: every block's embedding is cached now
        t3 = time.perf_counter()
        assign_ms.append((t1 - t0) * 1000)
        validate_ms.append((t2 - t1) * 1000)
        cached_ms.append((t3 - t2) * 1000)
        hits += cid is not None
    total = [a + v for a, v in zip(assign_ms, validate_ms)]
    print(json.dumps({
        "benchmark": "router_overhead", "requests": len(live), "assigned_share": round(hits / len(live), 3),
        "assign_p50_ms": round(statistics.median(assign_ms), 3), "assign_p95_ms": round(percentile(assign_ms, 95), 3),
        "assign_cached_p50_ms": round(statistics.median(cached_ms), 3),
        "validate_p50_ms": round(statistics.median(validate_ms), 3),
        "total_p50_ms": round(statistics.median(total), 3), "total_p95_ms": round(percentile(total, 95), 3),
        "target_p50_ms": 5.0,
    }))


if __name__ == "__main__":
    main()
