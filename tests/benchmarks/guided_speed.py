"""Tool calls decoded free vs inside the request's schemas, side by side, one request at a time (the router's loop).

A fine-tuned tool-call task of a workspace (e.g. BFCL: ``python -m slmigrate.collect.bfcl DATA -w WS``, then
``slmigrate -w WS finetune``): its test calls, prompts rendered as ``slmigrate evaluate`` renders them, the merged
model in the number format it is served in. Per prompt and repeat, in alternating order so the noise of a shared
box falls on both paths:

- ``free``: ``generate(merged, ..., batch_size=1)`` - the batch-1 decoder with prompt-lookup drafts;
- ``guided``: the same with ``guides=guides_for(...)`` - each step the best token the request's tool schemas
  allow, the grammar's forced tokens fed as drafts (``slmigrate.evaluate.guide``).

Printed as one JSON line: p50/p95 latency per path, forward passes per answer (deterministic: the speed figure
that does not depend on the box's load), the primary metric of each path and how many answers differ.

Usage: HF_HUB_OFFLINE=1 python tests/benchmarks/guided_speed.py --workspace WS [--cluster bfcl] [--calls 40]
       [--repeats 2] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import time
from datetime import datetime, timezone

from generate_speed import add_run_args, open_workspace, pct, task_setup


def bench(ws, cid: str, args) -> dict:
    from slmigrate.evaluate import generate as G
    from slmigrate.evaluate import greedy
    from slmigrate.evaluate import metrics as M
    from slmigrate.evaluate import run as R

    calls, model, tok, prompts, max_new = task_setup(ws, cid, args.calls)
    merged = greedy.for_serving(greedy.merged(model))
    paths = ("free", "guided")
    lat: dict[str, list[float]] = {p: [] for p in paths}
    texts: dict[str, list[str]] = {p: [""] * len(prompts) for p in paths}
    forwards: dict[str, int] = {p: 0 for p in paths}
    new_tokens: dict[str, int] = {p: 0 for p in paths}
    for rep in range(args.repeats):
        lookups = {p: greedy.AnswerLookup() for p in paths}  # a fresh router per repeat and path
        for i, (prompt, call) in enumerate(zip(prompts, calls)):
            for path in paths if (rep + i) % 2 == 0 else paths[::-1]:
                t0 = time.perf_counter()
                # the guide is built per request, as the router does, so its cost is in the figure
                guides = G.guides_for(merged, tok, [call.request]) if path == "guided" else None
                r = G.generate(merged, tok, [prompt], batch_size=1, max_new_tokens=max_new,
                               lookup=lookups[path], guides=guides)
                lat[path].append((time.perf_counter() - t0) * 1000)
                texts[path][i] = r.texts[0]
                if rep == 0:
                    forwards[path] += r.extra.get("forwards", 0)
                    new_tokens[path] += r.new_tokens[0]
    kind = R.cluster_kind(R.load_clusters(ws)[cid])
    primary = M.primary_metric(kind, {})
    ctx = M.MetricContext([c.request for c in calls], None, None)
    score = {p: M.score(kind, [R.parse(t) for t in texts[p]], [c.answer for c in calls], ctx).means.get(primary)
             for p in paths}
    n = len(prompts)
    return {
        "cluster": cid, "kind": kind, "calls": n, "repeats": args.repeats, "max_new_tokens": max_new,
        **{f"{p}_p50_ms": pct(lat[p], 50) for p in paths}, **{f"{p}_p95_ms": pct(lat[p], 95) for p in paths},
        "speedup_p50": round(pct(lat["free"], 50) / pct(lat["guided"], 50), 2),
        **{f"{p}_forwards_per_answer": round(forwards[p] / n, 2) for p in paths},
        **{f"{p}_new_tokens_per_answer": round(new_tokens[p] / n, 2) for p in paths},
        "primary_metric": primary, **{f"{p}_score": score[p] for p in paths},
        "same_answers": f"{sum(a == b for a, b in zip(texts['free'], texts['guided']))}/{n}",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workspace", required=True, help="a workspace with a fine-tuned tool-call task (read only)")
    parser.add_argument("--cluster", default="bfcl")
    add_run_args(parser, calls=40, repeats=2)
    args = parser.parse_args()
    ws = open_workspace(args)
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    result = bench(ws, args.cluster, args)
    print(json.dumps({"started": started, "threads": args.threads, **result}))


if __name__ == "__main__":
    main()
