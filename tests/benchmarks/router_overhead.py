"""Router overhead per request on CPU: assigning a request to a cluster and validating an answer (no generation).

Builds a clustered workspace from the examples generator (import -> curate without PII -> cluster with the real
MiniLM), then times, per request of a held-out log (another seed, so latest turns are new to every cache):
  - assign: what `slmigrate serve` does before answering - the signature fast path, else the embedding path;
  - validate: the answer checks (tool offered, arguments parse and fit the schema, JSON, non-empty);
  - total = assign + validate.
Side by side in the same run, each with its own embedder so no cache is shared:
  - the embedding path alone (fast path off), with the direct transformer encode, as before the fast path;
  - SentenceTransformer.encode of the same latest turn (what the embedding path used to call);
  - the embedding path again on the same request (everything cached).
Quality: the share of requests assigned, the share taking the fast path, and how often the fast path's cluster
is the one the embedding path gives. Prints one JSON line.

    .venv/bin/python tests/benchmarks/router_overhead.py [--requests 300]
"""

from __future__ import annotations

import argparse
import json
import os
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
    parser.add_argument("--train", type=int, default=600)
    args = parser.parse_args()

    from slmigrate.cluster import cluster
    from slmigrate.cluster.views import latest_turn, mask, TURN_CHARS
    from slmigrate.collect.importer import import_calls
    from slmigrate.config import load_config
    from slmigrate.curate.run import curate
    from slmigrate.record import CallRecord
    from slmigrate.serve.assign import request_assigner
    from slmigrate.serve.validation import validate_answer
    from slmigrate.workspace import Workspace

    load_before = os.getloadavg()
    tmp = Path(tempfile.mkdtemp(prefix="router-bench-"))
    train_log, live_log = tmp / "train.jsonl", tmp / "live.jsonl"
    for path, seed, n in ((train_log, 0, args.train), (live_log, 1, args.requests)):
        subprocess.run([sys.executable, str(ROOT / "examples" / "agent_log.py"), "--out", str(path), "--calls",
                        str(n), "--seed", str(seed)], check=True, capture_output=True)
    ws = Workspace.open(tmp / "ws")
    import_calls(ws, [train_log])
    config = load_config(None, {"curate": {"pii": "off"}, "cluster": {"map": False}})
    curate(ws, config.curate)
    t0 = time.perf_counter()
    cluster(ws, config)
    cluster_s = time.perf_counter() - t0
    assign = request_assigner(ws)  # what serve uses: fast path, else embeddings
    full = request_assigner(ws, fast=False)  # embedding path only, its own embedder and cache
    st_model = request_assigner(ws, fast=False).model.embedder._load()  # a third model for the encode() timing

    live = [json.loads(line) for line in live_log.read_text().splitlines()]
    warm = {"model": "x", "messages": [{"role": "user", "content": "warm up"}]}
    for fn in (assign, full):
        fn(warm)  # load MiniLM once, outside the timings
    st_model.encode(["warm up"], show_progress_bar=False)

    assign_ms, full_ms, st_ms, cached_ms, validate_ms = [], [], [], [], []
    fast_ms, slow_ms = [], []
    hits = fast_hits = agree = fast_agree = 0
    for rec in live:
        request, answer = rec["request"], rec["response"]["choices"][0]["message"]

        took_fast = assign.model.fast_assign(CallRecord(request=request)) is not None
        t0 = time.perf_counter()
        cid, _ = assign(request)
        t1 = time.perf_counter()
        validate_answer(answer, request.get("tools"), "tool_call" if answer.get("tool_calls") else "text")
        t2 = time.perf_counter()
        reference, _ = full(request)  # embedding path, new turn: one direct MiniLM encode
        t3 = time.perf_counter()
        full(request)  # same request again: every block's embedding is cached now
        t4 = time.perf_counter()
        turn = mask(latest_turn(request["messages"]))[:TURN_CHARS]
        t5 = time.perf_counter()
        st_model.encode([turn], show_progress_bar=False, convert_to_numpy=True)
        t6 = time.perf_counter()
        assign_ms.append((t1 - t0) * 1000)
        (fast_ms if took_fast else slow_ms).append((t1 - t0) * 1000)
        validate_ms.append((t2 - t1) * 1000)
        full_ms.append((t3 - t2) * 1000)
        cached_ms.append((t4 - t3) * 1000)
        st_ms.append((t6 - t5) * 1000)
        hits += cid is not None
        fast_hits += took_fast
        agree += cid == reference
        fast_agree += took_fast and cid == reference
    total = [a + v for a, v in zip(assign_ms, validate_ms)]
    n = len(live)
    print(json.dumps({
        "benchmark": "router_overhead", "requests": n, "train_calls": args.train,
        "signatures": len(assign.model.signatures), "clusters": len(assign.model.ids),
        "assigned_share": round(hits / n, 3), "fast_path_share": round(fast_hits / n, 3),
        "same_cluster_as_embedding_path": round(agree / n, 3),
        "fast_path_same_cluster": round(fast_agree / max(fast_hits, 1), 3),
        "assign_p50_ms": round(statistics.median(assign_ms), 3), "assign_p95_ms": round(percentile(assign_ms, 95), 3),
        "assign_fast_p50_ms": round(statistics.median(fast_ms), 3) if fast_ms else None,
        "assign_fallback_p50_ms": round(statistics.median(slow_ms), 3) if slow_ms else None,
        "embedding_path_p50_ms": round(statistics.median(full_ms), 3),
        "st_encode_turn_p50_ms": round(statistics.median(st_ms), 3),
        "embedding_path_cached_p50_ms": round(statistics.median(cached_ms), 3),
        "validate_p50_ms": round(statistics.median(validate_ms), 3),
        "total_p50_ms": round(statistics.median(total), 3), "total_p95_ms": round(percentile(total, 95), 3),
        "target_p50_ms": 5.0, "cluster_s": round(cluster_s, 1),
        "loadavg_before": [round(x, 2) for x in load_before], "loadavg_after": [round(x, 2) for x in os.getloadavg()],
    }))


if __name__ == "__main__":
    main()
