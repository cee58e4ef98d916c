"""Several capture proxies logging into one store: PostgreSQL, and one SQLite file for comparison, in one run.

    .venv/bin/python tests/benchmarks/pg_proxies.py [--calls 20000] [--proxies 4] [--concurrency 16]
                                                   [--backends postgresql,sqlite]

Each backend gets the same setup (tests/pg_server.py ``run_proxies``): the stub LLM (tests/stub_llm.py) and N
`slmigrate collect proxy` processes on 127.0.0.1, all with ``--store`` pointing at one database; an asyncio httpx
client sends the calls spread evenly over the proxies, ``concurrency`` in flight per proxy, and checks every
answer; then the proxies are stopped with SIGTERM (they drain) and the stored rows are counted. Then, without
proxies, 10,000 pre-encoded calls are inserted in batches of 500 (the database's own write rate). The PostgreSQL
server is a throwaway local cluster with fsync on. Prints one JSON line: per backend the wall time, calls/s in
total and per proxy, rows stored and lost, and CPU ms per call of the proxies, the stub and the client (on a
shared 2-core box the CPU figures say more than the wall ones).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pg_server import PgServer, run_proxies  # noqa: E402

from slmigrate.store import Store  # noqa: E402


def measure(store: str, workdir: Path, args: argparse.Namespace) -> dict:
    load_before = os.getloadavg()[0]
    result = run_proxies(store, workdir, proxies=args.proxies, calls=args.calls, concurrency=args.concurrency)
    with Store(store) as s:
        rows = s.count_calls()
    per_proxy = result["per_proxy"]
    ms = lambda seconds: None if seconds is None else round(1000 * seconds / per_proxy, 2)  # noqa: E731
    return {
        "calls": result["calls"], "rows": rows, "lost": result["calls"] - rows,
        "wrong_answers": len(result["wrong_answers"]),
        "upstream_failures_retried": len(result["upstream_failures"]),
        "transport_errors_retried": len(result["transport_errors"]),
        "dropped": sum(s["dropped"] for s in result["proxy_stats"]),
        "store_failures": sum(s["store_failures"] for s in result["proxy_stats"]),
        "wall_s": round(result["wall_s"], 1),
        "calls_per_s": round(result["calls"] / result["wall_s"], 1),
        "calls_per_s_per_proxy_median": round(statistics.median(per_proxy / t for t in result["per_proxy_s"]), 1),
        # Each proxy's CPU includes its start-up (imports, ~1-2 s), spread over its calls.
        "proxy_cpu_ms_per_call_median": round(statistics.median(ms(c) for c in result["proxy_cpu_s"]), 2),
        "stub_cpu_ms_per_call": round(1000 * result["stub_cpu_s"] / result["calls"], 2),
        "client_cpu_ms_per_call": round(1000 * result["client_cpu_s"] / result["calls"], 2),
        "load_avg_1m": [round(load_before, 1), round(os.getloadavg()[0], 1)],
    }


def insert_rate(store: str, rows: int = 10_000, batch: int = 500) -> dict:
    """The store's own write path without proxies: pre-encoded proxy-sized calls inserted in batches, one
    connection, so the database's share of a call can be told apart from the proxies' CPU."""
    from slmigrate.record import CallRecord

    with Store(store) as s:
        calls = [CallRecord(request={"model": "stub", "messages": [{"role": "user", "content": f"rate call {i}"}]},
                            response={"choices": [{"index": 0, "message": {"role": "assistant",
                                                                           "content": f"Echo: rate call {i}"}}]},
                            agent="bench") for i in range(rows)]
        encoded = s.encode_rows(calls)
        start = time.perf_counter()
        for i in range(0, rows, batch):
            s.insert_rows(encoded[i:i + batch])
        elapsed = time.perf_counter() - start
    return {"rows": rows, "batch": batch, "rows_per_s": round(rows / elapsed), "ms_per_batch": round(
        1000 * elapsed / (rows / batch), 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=20_000)
    parser.add_argument("--proxies", type=int, default=4)
    parser.add_argument("--concurrency", type=int, default=16, help="requests in flight per proxy")
    parser.add_argument("--backends", default="postgresql,sqlite")
    args = parser.parse_args()
    out = {"benchmark": "pg_proxies", "date": time.strftime("%Y-%m-%d"), "python": platform.python_version(),
           "cpus": os.cpu_count(), "proxies": args.proxies, "concurrency_per_proxy": args.concurrency}
    for backend in args.backends.split(","):
        with tempfile.TemporaryDirectory(prefix="slmigrate-bench-") as tmp:
            if backend == "postgresql":
                with PgServer.start(fsync=True) as server:
                    out[backend] = measure(server.new_database(), Path(tmp), args)
                    out[backend]["insert_only"] = insert_rate(server.new_database())
            elif backend == "sqlite":
                out[backend] = measure(str(Path(tmp) / "shared.sqlite"), Path(tmp), args)
                out[backend]["insert_only"] = insert_rate(str(Path(tmp) / "insert.sqlite"))
            else:
                raise SystemExit(f"unknown backend {backend!r}; expected postgresql or sqlite")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
