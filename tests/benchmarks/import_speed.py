"""Import speed of `slmigrate collect import`: calls/s on the real tau2 log, and on a 100k-call file.

    .venv/bin/python tests/benchmarks/import_speed.py [--rounds 3] [--calls 100000] [--cores 2]

1. The tau2 file (3,223 real GPT-4.1 calls, ~28 KB each, gzipped JSONL) is imported into a fresh workspace
   `--rounds` times with orjson on, interleaved with the same import using only the standard-library json, so
   the shared machine's noise hits both alike: medians and their ratio.
2. A `--calls`-call JSONL file is made by repeating the tau2 records with new ids (so every call is new to the
   store) and imported once, streaming: calls/s and the process's peak memory.

The process is pinned to `--cores` CPUs. Wall-clock calls/s depends on how busy the machine is, so CPU seconds
per 1,000 calls (process time, all threads) are reported too. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

TAU2 = ROOT.parent / "shared" / "data" / "tau2-bench" / "tau2_gpt41_calls.openai.jsonl.gz"


def use_orjson(on: bool) -> None:
    """Switch the three places that use orjson (parse, hash, payload encode) on or off."""
    import orjson

    from slmigrate import collect, record, store

    collect._fast_loads = orjson.loads if on else None
    record.orjson = orjson if on else None
    store.orjson = orjson if on else None


def timed_import(path: Path, tmp: Path, tag: str) -> dict:
    from slmigrate.collect import import_calls
    from slmigrate.workspace import Workspace

    ws = Workspace.open(tmp / f"ws-{tag}")
    cpu0, t0 = time.process_time(), time.perf_counter()
    result = import_calls(ws, [path])
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    calls = result.imported + result.duplicates
    ws.store.close()
    db = ws.root / "slmigrate.sqlite"
    size = db.stat().st_size
    for f in ws.root.glob("slmigrate.sqlite*"):
        f.unlink()
    return {"calls": calls, "skipped": result.skipped, "wall_s": round(wall, 2), "cpu_s": round(cpu, 2),
            "calls_per_s": round(calls / wall, 1), "cpu_s_per_1k": round(cpu / calls * 1000, 3),
            "store_mb": round(size / 1e6, 1)}


def make_big(n: int, out: Path) -> int:
    """``n`` calls from the tau2 records, cycled, each with a new id (and so a new content hash)."""
    with gzip.open(TAU2, "rb") as fh:
        lines = fh.read().splitlines()
    written = 0
    with open(out, "wb") as fh:
        while written < n:
            for raw in lines:
                if written >= n:
                    break
                obj = json.loads(raw)
                obj["id"] = f"{obj['id']}-r{written // len(lines)}"
                fh.write(json.dumps(obj).encode() + b"\n")
                written += 1
    return out.stat().st_size


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--calls", type=int, default=100_000, help="size of the generated file; 0 skips it")
    ap.add_argument("--cores", type=int, default=2)
    args = ap.parse_args()
    if not TAU2.exists():
        sys.exit(f"needs {TAU2} (the team's shared data)")
    cpus = sorted(os.sched_getaffinity(0))[: args.cores]
    os.sched_setaffinity(0, cpus)

    out: dict = {"benchmark": "import_speed", "machine": platform.node(), "cpus_pinned": len(cpus),
                 "load_avg_start": os.getloadavg()[0]}
    with tempfile.TemporaryDirectory(prefix="slmigrate-bench-") as tmp_name:
        tmp = Path(tmp_name)
        runs: dict[str, list[dict]] = {"orjson": [], "stdlib_json": []}
        for r in range(args.rounds):
            for mode in ("orjson", "stdlib_json"):
                use_orjson(mode == "orjson")
                runs[mode].append(timed_import(TAU2, tmp, f"{mode}-{r}"))
        use_orjson(True)
        for mode, rs in runs.items():
            out[f"tau2_{mode}"] = {
                "calls": rs[0]["calls"],
                "calls_per_s_median": statistics.median(x["calls_per_s"] for x in rs),
                "cpu_s_per_1k_median": statistics.median(x["cpu_s_per_1k"] for x in rs),
                "runs": rs,
            }
        out["tau2_speedup_orjson_vs_stdlib"] = round(
            out["tau2_orjson"]["calls_per_s_median"] / out["tau2_stdlib_json"]["calls_per_s_median"], 2)
        if args.calls:
            big = tmp / "big.jsonl"
            size = make_big(args.calls, big)
            rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            res = timed_import(big, tmp, "big")
            res["file_mb"] = round(size / 1e6, 1)
            res["peak_rss_mb"] = round(max(rss_before, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) / 1024, 1)
            out["big_file"] = res
    out["load_avg_end"] = os.getloadavg()[0]
    print(json.dumps(out))


if __name__ == "__main__":
    main()
