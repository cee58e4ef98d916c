"""Benchmark: `slmigrate curate` on the tau2-bench calls versus a plain loop of presidio's AnalyzerEngine.analyze
over every message of every call. Prints one JSON line.

curate runs on all calls, end to end (load, filters, dedup, analysis, replacement, dataset write; the spaCy/
presidio load is included). The plain loop would take far too long on every call on a shared 2-core box, so it
runs on every Nth call (--every, default 40) and its calls/s is extrapolated from that sample; its model load
is not counted. Both use the same AnalyzerEngine (same recognisers, same threshold), so the comparison is of
the work done, not of the detectors. "same entities": on the sample, the (type, value) pairs the plain loop
finds versus those curate's cached, batched analysis finds for the same calls.

    .venv/bin/python tests/benchmarks/curate_speed.py [--every 40] [--workers 1] [--repeat 1]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
TAU2 = ROOT.parent / "shared" / "data" / "tau2-bench" / "tau2_gpt41_calls.openai.jsonl.gz"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--every", type=int, default=40, help="plain loop on every Nth call")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=1, help="curate runs (fresh workspace each), median taken")
    args = parser.parse_args()
    if not TAU2.exists():
        sys.exit(f"needs {TAU2}")

    from slmigrate import env

    env.offline_hub()
    from slmigrate.collect.importer import import_calls
    from slmigrate.config import CurateConfig
    from slmigrate.curate.run import curate
    from slmigrate.curate.pii import TextAnalyzer, texts_of
    from slmigrate.curate.pii.engine import DEFAULT_ENTITIES, _keep, Found
    from slmigrate.workspace import Workspace

    curate_times, report = [], {}
    for _ in range(args.repeat):
        with tempfile.TemporaryDirectory() as tmp:
            ws = Workspace.open(Path(tmp) / "ws")
            import_calls(ws, [TAU2])
            calls = list(ws.store.iter_calls())
            started = time.perf_counter()
            report = curate(ws, CurateConfig(pii="placeholder", workers=args.workers, near_duplicates=False))
            curate_times.append(time.perf_counter() - started)
    n_calls = len(calls)
    curate_s = statistics.median(curate_times)

    # The plain loop: one analyze() per message text (and tool-call argument) of every sampled call.
    sample = calls[:: args.every]
    plain = TextAnalyzer()
    engine = plain.engine
    entities = [e for e in DEFAULT_ENTITIES if e in set(engine.get_supported_entities("en"))]
    plain_found: set[tuple[str, str]] = set()
    n_texts = 0
    started = time.perf_counter()
    for call in sample:
        for text in texts_of(call):
            n_texts += 1
            for r in engine.analyze(text=text, language="en", entities=entities):
                f = Found(r.entity_type, text[r.start:r.end].strip(), float(r.score))
                if _keep(f):
                    plain_found.add((f.entity, f.value))
    plain_s = time.perf_counter() - started
    plain_cps = len(sample) / plain_s

    # curate's analysis of the same calls (distinct texts once, batched), for the entity comparison.
    ours = TextAnalyzer()
    ours._engine = engine
    ours.analyze_many([t for c in sample for t in texts_of(c)])
    ours_found = {(f.entity, f.value) for c in sample for t in texts_of(c) for f in ours.cache[t]
                  if f.source != "struct"}
    both = plain_found & ours_found
    result = {
        "benchmark": "curate_speed",
        "calls": n_calls,
        "curate_s_median": round(curate_s, 1),
        "curate_runs": len(curate_times),
        "curate_calls_per_s": round(n_calls / curate_s, 2),
        "curate_distinct_texts": report.get("distinct_texts_analysed"),
        "workers": args.workers,
        "plain_sample_calls": len(sample),
        "plain_sample_texts": n_texts,
        "plain_s": round(plain_s, 1),
        "plain_calls_per_s_extrapolated": round(plain_cps, 3),
        "plain_s_extrapolated_all_calls": round(n_calls / plain_cps, 1),
        "speedup": round((n_calls / curate_s) / plain_cps, 1),
        "sample_entities_plain": len(plain_found),
        "sample_entities_curate": len(ours_found),
        "sample_plain_entities_also_found_by_curate": round(len(both) / max(1, len(plain_found)), 3),
        "sample_plain_only_examples": sorted(plain_found - ours_found)[:8],
    }
    print(json.dumps(result, ensure_ascii=False))


if __name__ == "__main__":
    main()
