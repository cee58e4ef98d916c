"""Per-request generation latency: today's path vs the fast batch-1 decoder, side by side on the demo's tasks.

Real SmolLM2-135M-Instruct with each task's LoRA adapter from a demo workspace (a copy of ``make demo``'s
``.slmigrate-demo``; this script only reads it), on the task's test calls, prompts rendered exactly as
``slmigrate evaluate`` renders them (static prompt parts removed, context budget, chat template). Per prompt and
repeat, in alternating order so the noise of a shared box falls on both:

- ``today``: ``generate(peft_model, ..., batch_size=1, fast=False)``: HF ``model.generate`` greedy with the
  adapter attached unmerged - what a served request cost before;
- ``fast``: ``generate(merged_model, ..., batch_size=1)``: the merged model in the number format it is served
  in (``greedy.for_serving``: bfloat16 on a CPU with native bfloat16) through ``slmigrate.evaluate.greedy``
  with drafts from the prompt and the task's earlier answers.

Also printed once: evaluate's latency figure today (batch 8: every call of a batch is given the batch's wall
time, not what one served request waits), the profile of one request (prefill, per-token step, unmerged vs
merged), and whether the two paths gave the same answers (and the primary metric of each, when they differ).

Usage: HF_HUB_OFFLINE=1 python tests/benchmarks/generate_speed.py --workspace /tmp/demo-copy [--clusters c01,c04]
       [--calls 12] [--repeats 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from datetime import datetime, timezone


def pct(values: list[float], q: float) -> float:
    from slmigrate.evaluate.run import percentile

    return round(float(percentile(values, q) or 0.0), 1)


def task_setup(ws, cid: str, calls_wanted: int):
    """The cluster's test calls, its PEFT model (as evaluate loads it), the prompts evaluate renders."""
    from slmigrate.chat_format import StaticPrompt
    from slmigrate.curate.dataset import load_curated
    from slmigrate.evaluate import generate as G
    from slmigrate.evaluate import run as R

    test = load_curated(ws, "test")
    assigned = ws.store.clusters_of([c.id for c in test])
    calls = [c for c in test if assigned.get(c.id) == cid and c.answer is not None][:calls_wanted]
    adapter = R.find_adapter(ws, cid)
    if adapter is None:
        raise SystemExit(f"no adapter for {cid} in {ws.root}")
    model, tok, _ = G.load_model(R.adapter_base_model(adapter), device="cpu")
    model = G.attach_adapter(model, adapter)
    static = StaticPrompt.load(adapter)
    max_new = G.max_new_tokens_for(tok, [R.answer_text(c.answer) for c in calls], cap=512)
    budget = R.context_budget(model, tok, max_new)
    requests = [R._without(static, c.request) if static else c.request for c in calls]
    prompts = [R.render(tok, r, budget) for r in requests]
    return calls, model, tok, prompts, max_new


def profile(model, merged, tok, prompt: str) -> dict[str, float]:
    """One request's parts: prefill (last-position logits) and one cached decoding step, unmerged vs merged."""
    import torch
    from transformers import DynamicCache

    ids = torch.tensor([tok(prompt, add_special_tokens=False)["input_ids"]])
    out: dict[str, float] = {"prompt_tokens": ids.shape[1]}
    for name, m in (("unmerged", model), ("merged", merged)):
        pre, step = [], []
        for _ in range(3):
            with torch.inference_mode():
                cache = DynamicCache()
                t0 = time.perf_counter()
                logits = m(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits
                t1 = time.perf_counter()
                m(input_ids=logits[:, -1:].argmax(-1), past_key_values=cache, use_cache=True, logits_to_keep=1)
                t2 = time.perf_counter()
            pre.append((t1 - t0) * 1000)
            step.append((t2 - t1) * 1000)
        out[f"{name}_prefill_ms"] = round(statistics.median(pre), 1)
        out[f"{name}_step_ms"] = round(statistics.median(step), 1)
    return out


def bench_task(ws, cid: str, args) -> dict:
    from slmigrate.evaluate import generate as G
    from slmigrate.evaluate import greedy
    from slmigrate.evaluate import metrics as M
    from slmigrate.evaluate import run as R

    calls, model, tok, prompts, max_new = task_setup(ws, cid, args.calls)
    merged = greedy.for_serving(greedy.merged(model))  # what evaluate scores and the router serves
    # evaluate's figure today: batch 8, each call credited with its batch's wall time
    batched = G.generate(model, tok, prompts, batch_size=8, max_new_tokens=max_new, fast=False)
    lat: dict[str, list[float]] = {"today": [], "fast": []}
    toks: dict[str, int] = {"today": 0, "fast": 0}
    secs: dict[str, float] = {"today": 0.0, "fast": 0.0}
    texts: dict[str, list[str]] = {"today": [""] * len(prompts), "fast": [""] * len(prompts)}
    stats = {"forwards": 0, "drafted": 0, "accepted": 0}
    for rep in range(args.repeats):
        lookup = greedy.AnswerLookup()  # each repeat starts with no earlier answers, as a fresh router does
        for i, prompt in enumerate(prompts):
            order = ("today", "fast") if (rep + i) % 2 == 0 else ("fast", "today")
            for path in order:
                t0 = time.perf_counter()
                if path == "today":
                    r = G.generate(model, tok, [prompt], batch_size=1, max_new_tokens=max_new, fast=False)
                else:
                    r = G.generate(merged, tok, [prompt], batch_size=1, max_new_tokens=max_new, lookup=lookup)
                ms = (time.perf_counter() - t0) * 1000
                lat[path].append(ms)
                toks[path] += r.new_tokens[0]
                secs[path] += ms / 1000
                texts[path][i] = r.texts[0]
                if path == "fast" and rep == 0:
                    for key in stats:
                        stats[key] += r.extra.get(key, 0)
    kind = R.cluster_kind(R.load_clusters(ws)[cid])
    refs = [c.answer for c in calls]
    primary = M.primary_metric(kind, {})
    score = {p: M.score(kind, [R.parse(t) for t in texts[p]], refs, M.MetricContext([c.request for c in calls],
                                                                                     None, None)).means.get(primary)
             for p in texts}
    same = sum(a == b for a, b in zip(texts["today"], texts["fast"]))
    p50 = {p: pct(v, 50) for p, v in lat.items()}
    llm = R.llm_figures(ws, calls, __import__("slmigrate.config", fromlist=["PricesConfig"]).PricesConfig())
    return {
        "cluster": cid, "kind": kind, "calls": len(prompts), "repeats": args.repeats, "max_new_tokens": max_new,
        "llm_recorded_p50_ms": llm.get("latency_p50_ms"),
        "evaluate_today_batch8_p50_ms": pct(batched.latency_ms, 50),
        "today_p50_ms": p50["today"], "today_p95_ms": pct(lat["today"], 95),
        "fast_p50_ms": p50["fast"], "fast_p95_ms": pct(lat["fast"], 95),
        "speedup_p50": round(p50["today"] / p50["fast"], 2) if p50["fast"] else None,
        "today_tokens_per_s": round(toks["today"] / secs["today"], 1),
        "fast_tokens_per_s": round(toks["fast"] / secs["fast"], 1),
        "same_answers": f"{same}/{len(prompts)}", "primary_metric": primary,
        "fast_dtype": str(next(merged.parameters()).dtype).replace("torch.", ""),
        "score_today": score["today"], "score_fast": score["fast"],
        "fast_decoder": stats, "profile": profile(model, merged, tok, prompts[0]),
    }


def add_run_args(parser: argparse.ArgumentParser, *, calls: int, repeats: int) -> None:
    """The options every per-request latency benchmark here takes (also guided_speed.py's)."""
    parser.add_argument("--calls", type=int, default=calls, help="test calls per task")
    parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: a shared 2-core box)")


def open_workspace(args: argparse.Namespace):
    """The workspace to read (never written), with torch set to ``--threads``."""
    import torch

    from slmigrate.workspace import Workspace

    torch.set_num_threads(args.threads)
    return Workspace.open(args.workspace, create=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workspace", required=True, help="a copy of a demo workspace (read only here)")
    parser.add_argument("--clusters", default="c01,c04")
    add_run_args(parser, calls=12, repeats=3)
    args = parser.parse_args()
    ws = open_workspace(args)
    rows = [bench_task(ws, cid, args) for cid in args.clusters.split(",")]
    print(json.dumps({"date": datetime.now(timezone.utc).isoformat(timespec="minutes"), "threads": args.threads,
                      "tasks": rows}, indent=1))


if __name__ == "__main__":
    main()
