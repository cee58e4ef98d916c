"""Import speed of `slmigrate collect import`: calls/s and CPU per call on the real tau2 log, and on a big file.

    .venv/bin/python tests/benchmarks/import_speed.py [--rounds 3] [--calls 100000] [--cores 2]

1. The tau2 file (3,223 real GPT-4.1 calls, ~28 KB each, gzipped JSONL) is imported into a fresh workspace
   `--rounds` times in each of three modes, interleaved so the shared machine's noise hits all alike:
   - `processes` (the default): worker processes parse, convert, hash and compress; the main process reads the
     file and writes SQLite;
   - `in_process`: the previous design, one process (a thread compresses while the main thread parses);
   - `stdlib_json`: in-process with orjson switched off (standard-library json everywhere).
2. A `--calls`-call JSONL file is made by repeating the tau2 records with new ids (so every call is new to the
   store) and imported once with the default mode: calls/s, CPU and the peak memory of each process.

The process (and so its workers) is pinned to `--cores` CPUs. Wall-clock calls/s depends on how busy the machine is,
so CPU seconds per 1,000 calls are reported too: process time of the importing process plus that of its worker
processes (RUSAGE_CHILDREN, counted once they have exited, which the import waits for). `cpu_bound_calls_per_s` =
calls / (CPU seconds / cores) is the rate the measured CPU cost would allow if the cores did nothing else and the
work split evenly; it is derived, not measured. The 1-minute load average is sampled before and after every run.
Prints one JSON line.
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
MODES = {"processes": None, "in_process": 0, "stdlib_json": 0}  # mode -> import_calls(workers=...)


def use_orjson(on: bool) -> None:
    """Switch the three places that use orjson (parse, hash, payload encode) on or off."""
    import orjson

    from slmigrate import record, store
    from slmigrate.collect import importer as collect

    collect._fast_loads = orjson.loads if on else None
    record.orjson = orjson if on else None
    store.orjson = orjson if on else None


def _children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def timed_import(path: Path, tmp: Path, tag: str, workers: int | None, cores: int) -> dict:
    from slmigrate.collect.importer import import_calls
    from slmigrate.workspace import Workspace

    ws = Workspace.open(tmp / f"ws-{tag}")
    load0 = os.getloadavg()[0]
    cpu0, kids0, t0 = time.process_time(), _children_cpu(), time.perf_counter()
    result = import_calls(ws, [path], workers=workers)
    wall = time.perf_counter() - t0
    main_cpu, kids_cpu = time.process_time() - cpu0, _children_cpu() - kids0
    cpu = main_cpu + kids_cpu
    calls = result.imported + result.duplicates
    ws.store.close()
    size = (ws.root / "slmigrate.sqlite").stat().st_size
    for f in ws.root.glob("slmigrate.sqlite*"):
        f.unlink()
    return {"calls": calls, "skipped": result.skipped, "wall_s": round(wall, 2), "cpu_s": round(cpu, 2),
            "cpu_s_main": round(main_cpu, 2), "cpu_s_workers": round(kids_cpu, 2),
            "calls_per_s": round(calls / wall, 1), "cpu_s_per_1k": round(cpu / calls * 1000, 3),
            "cpu_bound_calls_per_s": round(calls / (cpu / cores), 1),
            "load_avg": [load0, os.getloadavg()[0]], "store_mb": round(size / 1e6, 1)}


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
                 "load_avg_start": os.getloadavg()}
    with tempfile.TemporaryDirectory(prefix="slmigrate-bench-") as tmp_name:
        tmp = Path(tmp_name)
        from slmigrate.collect import formats

        formats.names()  # load the format modules now, so the first timed run does not pay for it
        runs: dict[str, list[dict]] = {m: [] for m in MODES}
        for r in range(args.rounds):
            for mode, workers in MODES.items():
                use_orjson(mode != "stdlib_json")
                runs[mode].append(timed_import(TAU2, tmp, f"{mode}-{r}", workers, len(cpus)))
        use_orjson(True)
        for mode, rs in runs.items():
            out[f"tau2_{mode}"] = {
                "calls": rs[0]["calls"],
                **{f"{k}_median": statistics.median(x[k] for x in rs)
                   for k in ("calls_per_s", "cpu_s_per_1k", "cpu_bound_calls_per_s")},
                "runs": rs,
            }
        base = out["tau2_processes"]["calls_per_s_median"]
        out["tau2_wall_ratio_processes_vs"] = {m: round(base / out[f"tau2_{m}"]["calls_per_s_median"], 2)
                                               for m in ("in_process", "stdlib_json")}
        if args.calls:
            big = tmp / "big.jsonl"
            size = make_big(args.calls, big)
            res = timed_import(big, tmp, "big", None, len(cpus))
            res["file_mb"] = round(size / 1e6, 1)
            res["peak_rss_mb_main"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
            res["peak_rss_mb_largest_worker"] = round(
                resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1)
            out["big_file"] = res
    out["load_avg_end"] = os.getloadavg()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
