"""Benchmark: curate (--pii placeholder) and cluster (MiniLM) on the tau2-bench calls with the local engine on 1
and 2 workers and with `--engine ray` on 2 local Ray workers. Prints one JSON line.

The calls are imported once; every curate run uses the same workspace with force=True, every cluster run a fresh
MiniLM embedder on the same curated calls, so each run does the whole pass (model loads included: each worker
loads spaCy/presidio or MiniLM once per run). Ray's own start (ray.init) is timed apart from the runs because a
long-lived driver or a cluster pays it once. Each run's output is compared with the local 1-worker run's:
"same" must be true.

Local cluster with 1 worker embeds in this process with torch's own thread count (2 on this box), the default
before 2026-11-23; the 2-worker runs use 1 thread per worker, which is what the default now picks on 2 cores
once a pass has 1,000 texts to embed (cluster.run.PARALLEL_MIN_TEXTS).

    .venv/bin/python tests/benchmarks/ray_speedup.py [PATH] [--calls 1000] [--repeat 1] [--no-ray]
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
TAU2 = ROOT.parent / "shared" / "data" / "tau2-bench" / "tau2_gpt41_calls.openai.jsonl.gz"
RUNS = (("local", 1), ("local", 2), ("ray", 2))


def _subset(src: Path, dst: Path, limit: int | None) -> int:
    """The first ``limit`` calls of the log (calls of one simulation are contiguous, so sessions stay whole
    except possibly the last)."""
    n = 0
    with gzip.open(src, "rt") as fh, dst.open("w") as out:
        for line in fh:
            if limit is not None and n >= limit:
                break
            if line.strip():
                out.write(line)
                n += 1
    return n


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("path", nargs="?", default=str(TAU2), help="tau2 calls (openai JSON Lines, .gz)")
    parser.add_argument("--calls", type=int, default=1000, help="first N calls of the log (0: all)")
    parser.add_argument("--repeat", type=int, default=1, help="runs per configuration, median taken")
    parser.add_argument("--no-ray", action="store_true", help="local 1 and 2 workers only")
    args = parser.parse_args()
    path = Path(args.path)
    if not path.exists():
        print(json.dumps({"skipped": f"{path} not present (shared data is only on the team's machines)"}))
        return

    from slmigrate import engines, env
    from slmigrate.curate import dataset as curated

    env.offline_hub()
    from slmigrate.cluster.run import cluster_calls
    from slmigrate.collect.importer import import_calls
    from slmigrate.config import ClusterConfig, CurateConfig
    from slmigrate.curate.run import curate
    from slmigrate.cluster.embed import get_embedder
    from slmigrate.workspace import Workspace

    result: dict = {"input": path.name, "loadavg_start": [round(x, 2) for x in os.getloadavg()]}
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "calls.jsonl"
        result["calls"] = _subset(path, log, args.calls or None)
        ws = Workspace.open(Path(tmp) / "ws")
        import_calls(ws, [log])

        runs = [r for r in RUNS if not (args.no_ray and r[0] == "ray")]
        if not args.no_ray:
            started = time.perf_counter()
            engines.ray_init(2)
            result["ray_init_s"] = round(time.perf_counter() - started, 2)

        curate_s: dict[str, float] = {}
        cluster_s: dict[str, float] = {}
        same: dict[str, bool] = {}
        reference_rows = reference_clusters = None
        calls = None
        for engine, workers in runs:
            name = f"{engine}-{workers}"
            times = []
            for _ in range(args.repeat):
                t = time.perf_counter()
                report = curate(ws, CurateConfig(pii="placeholder", engine=engine, workers=workers), force=True)
                times.append(time.perf_counter() - t)
            curate_s[name] = round(statistics.median(times), 2)
            rows = [dataclasses.asdict(c) for c in curated.load_curated(ws)]
            if reference_rows is None:
                reference_rows, calls = rows, list(curated.load_curated(ws))
                result["calls_out"] = report.calls_out
                result["distinct_texts"] = report.to_dict()["distinct_texts_analysed"]
            same[f"curate {name}"] = rows == reference_rows

            times = []
            for _ in range(args.repeat):
                cfg = ClusterConfig(map=False, engine=engine, workers=workers)
                t = time.perf_counter()
                body, _, assignment, _ = cluster_calls(calls, cfg, embedder=get_embedder("minilm"))
                times.append(time.perf_counter() - t)
            cluster_s[name] = round(statistics.median(times), 2)
            if reference_clusters is None:
                reference_clusters = assignment
                result["clusters"] = len(body["clusters"])
            same[f"cluster {name}"] = assignment == reference_clusters

    base_c, base_k = curate_s["local-1"], cluster_s["local-1"]
    result.update({
        "curate_s": curate_s, "cluster_s": cluster_s,
        "curate_speedup_vs_local1": {k: round(base_c / v, 2) for k, v in curate_s.items()},
        "cluster_speedup_vs_local1": {k: round(base_k / v, 2) for k, v in cluster_s.items()},
        # PII throughput of one worker, whole curate stage (load, filters, analysis, replacement, write)
        "curate_calls_per_s_local1": round(result["calls"] / base_c, 2),
        "distinct_texts_per_s_local1": round(result["distinct_texts"] / base_c, 2),
        "same": same,
        "loadavg_end": [round(x, 2) for x in os.getloadavg()],
        "cpus": os.cpu_count(),
    })
    print(json.dumps(result))


if __name__ == "__main__":
    main()
