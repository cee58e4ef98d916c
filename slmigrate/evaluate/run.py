"""Evaluate: is the small model good enough for this task, what does it save, and should the task move?

For each cluster, on its curated *test* split (never seen in training), the small model answers every call in
up to three variants - ``base`` (zero-shot), ``icl`` (base with a few examples from the train split) and
``finetuned`` (base + the cluster's adapter) - and is scored against the LLM's recorded answers with the
metrics of the cluster's output kind (``slmigrate.evaluate.metrics``). Efficiency is measured beside quality, and the
cluster migrates when the fine-tuned model reaches the threshold on the kind's primary metric.

Results go to ``evals/<run>/`` (results.json, per-cluster predictions) and ``evals/latest.json``, which
``report`` and ``refine`` read, and the "evaluate" manifest records what was evaluated.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from slmigrate import artifacts
from slmigrate.evaluate import metrics as M
from slmigrate.artifacts import ClusterInfo
from slmigrate.chat_format import StaticPrompt, message_text
from slmigrate.config import EvaluateConfig, PricesConfig
from slmigrate.curate.dataset import CuratedCall, current_version, load_curated
from slmigrate.errors import GateFailed, SlmigrateError
from slmigrate.progress import Progress, silent
from slmigrate.record import CallRecord
from slmigrate.results import StageOutput
from slmigrate.stats import calls_needed, estimate, wilson
from slmigrate.workspace import Workspace, fingerprint_of

VARIANTS = ("base", "icl", "finetuned")


# --- inputs from other stages ------------------------------------------------------------------------------

def load_clusters(ws: Workspace) -> dict[str, ClusterInfo]:
    """Cluster id -> its description from the cluster stage (output kind, label, estimate...)."""
    return {c["id"]: c for c in ws.clusters()}


def cluster_kind(info: ClusterInfo) -> str:
    kind = info.get("output_kind", "text")
    return kind if kind in M.KINDS else "text"


def find_adapter(ws: Workspace, cluster: str, model: str | None = None) -> Path | None:
    """The cluster's fine-tuned weights: ``adapters/<cluster>/<model>/`` (a PEFT folder, or a full model).

    With several models trained for one cluster, ``model`` picks one by folder name; otherwise the newest.
    """
    root = ws.path("adapters", cluster)
    if not root.is_dir():
        return None
    found = [p for p in root.iterdir() if p.is_dir() and
             ((p / "adapter_config.json").exists() or (p / "config.json").exists())]
    if model:
        slug = model.rstrip("/").split("/")[-1].lower()
        found = [p for p in found if p.name.lower() == slug] or found
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def adapter_base_model(adapter: Path) -> str | None:
    cfg = adapter / "adapter_config.json"
    if cfg.exists():
        return json.loads(cfg.read_text()).get("base_model_name_or_path")
    return None


# --- variants ------------------------------------------------------------------------------------------------

def answer_text(message: dict[str, Any] | None) -> str:
    """The reference answer as the text a model should produce (what fine-tuning trained it to write)."""
    from slmigrate import chat_format

    return chat_format.serialise_answer(message)


def icl_examples(train: Sequence[CuratedCall], k: int, seed: int) -> list[CuratedCall]:
    """``k`` train calls of the cluster, drawn at random among the shorter half so the prompt stays small."""
    usable = [c for c in train if c.answer is not None]
    if k <= 0 or not usable:
        return []
    size = {c.id: len(json.dumps(c.messages[-1:])) + len(json.dumps(c.answer)) for c in usable}
    short = sorted(usable, key=lambda c: (size[c.id], c.id))[: max(k, len(usable) // 2)]
    return sorted(random.Random(seed).sample(short, min(k, len(short))), key=lambda c: c.id)


def with_examples(request: dict[str, Any], examples: Sequence[CuratedCall]) -> dict[str, Any]:
    """The request with worked examples inserted as earlier turns, after the system prompt.

    Each example is its call's latest turn as a user message and the LLM's answer, written in the same text
    form the model's answers are parsed from, so the examples also teach the answer format.
    """
    from slmigrate.evaluate.judge import task_text

    messages = list(request.get("messages") or [])
    head = [m for m in messages[:1] if m.get("role") in ("system", "developer")]
    shots: list[dict[str, Any]] = []
    for ex in examples:
        last = ex.messages[-1] if ex.messages else {}
        turn = message_text(last) if last.get("role") == "user" else task_text({"messages": ex.messages[-2:]})
        shots += [{"role": "user", "content": turn},
                  {"role": "assistant", "content": answer_text(ex.answer)}]
    return {**request, "messages": head + shots + messages[len(head):]}


def parse(text: str) -> dict[str, Any]:
    from slmigrate import chat_format

    try:
        return chat_format.parse_answer(text)
    except Exception:  # noqa: BLE001 - an unparseable answer is a wrong answer, not a crash
        return {"role": "assistant", "content": text}


def render(tokenizer: Any, request: dict[str, Any], max_tokens: int | None = None) -> str:
    """The prompt text; over-long prompts lose old history first (chat_format's rule, as in training)."""
    from slmigrate import chat_format

    return chat_format.render_prompt(tokenizer, list(request.get("messages") or []),
                                     list(request.get("tools") or []), max_tokens=max_tokens).text


def context_budget(model: Any, tokenizer: Any, max_new_tokens: int) -> int | None:
    """Prompt tokens that fit the model's context window next to the answer."""
    window = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return max(32, int(window) - max_new_tokens) if window else None


# --- efficiency ----------------------------------------------------------------------------------------------

def percentile(values: Sequence[float], q: float) -> float | None:
    import numpy as np

    vals = [v for v in values if v is not None]
    return float(np.percentile(vals, q)) if vals else None


def hardware_hour_usd(device: str, prices: PricesConfig) -> tuple[float, str]:
    if device == "cuda":
        return prices.gpu_hour_usd, "1 GPU"
    import torch

    threads = torch.get_num_threads()
    return prices.cpu_hour_usd * threads, f"{threads} CPU cores"


def llm_figures(ws: Workspace, calls: Sequence[CuratedCall], prices: PricesConfig) -> dict[str, Any]:
    """What the LLM did on these calls, from the recorded usage and latency."""
    latencies = []
    for c in calls:
        stored = ws.store.get_call(c.id)
        if stored is not None and stored.latency_ms is not None:
            latencies.append(stored.latency_ms)
    costs = [prices.cost(c.model, c.prompt_tokens, c.completion_tokens) for c in calls
             if c.prompt_tokens is not None or c.completion_tokens is not None]
    return {
        "model": max({c.model for c in calls if c.model} or {None}, key=lambda m: sum(c.model == m for c in calls)),
        "latency_p50_ms": percentile(latencies, 50), "latency_p95_ms": percentile(latencies, 95),
        "cost_per_1k_usd": 1000 * sum(costs) / len(costs) if costs else None,
        "mean_prompt_tokens": _mean([c.prompt_tokens for c in calls]),
        "mean_completion_tokens": _mean([c.completion_tokens for c in calls]),
    }


def _mean(values: Sequence[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def slm_figures(gen: Any, prices: PricesConfig, llm_cost: float | None, served: Any = None) -> dict[str, Any]:
    """Cost and speed of one variant. Latency: per call as the router serves it (batch 1) - from ``served``, a
    batch-1 run of a sample, when ``gen`` was batched (``latency_of`` says which); the batch wall time a call
    waited in ``gen`` stays as ``batch_latency_*``."""
    hour_usd, hardware = hardware_hour_usd(gen.device, prices)
    compute_s = _mean(gen.compute_ms) / 1000 if gen.compute_ms else None
    cost = 1000 * compute_s * hour_usd / 3600 if compute_s is not None else None
    lat = served if served is not None and served.latency_ms else gen
    return {
        "latency_p50_ms": percentile(lat.latency_ms, 50), "latency_p95_ms": percentile(lat.latency_ms, 95),
        "latency_of": f"{len(lat.latency_ms)} calls one at a time" if lat.batch_size == 1
        else f"batches of {lat.batch_size}",
        "batch_latency_p50_ms": percentile(gen.latency_ms, 50),
        "compute_ms_per_call": compute_s * 1000 if compute_s is not None else None,
        "tokens_per_s": gen.tokens_per_s, "peak_memory_mb": gen.peak_memory_mb, "memory_kind": gen.memory_kind,
        "device": gen.device, "hardware": hardware, "hardware_hour_usd": hour_usd, "batch_size": gen.batch_size,
        "max_new_tokens": gen.max_new_tokens, "truncated": gen.truncated,
        "mean_prompt_tokens": _mean(gen.prompt_tokens), "mean_new_tokens": _mean(gen.new_tokens),
        "cost_per_1k_usd": cost,
        "llm_to_slm_cost_ratio": (llm_cost / cost) if llm_cost and cost else None,
    }


# --- one cluster ---------------------------------------------------------------------------------------------

def evaluate_variant(model: Any, tokenizer: Any, calls: Sequence[CuratedCall], kind: str, *,
                     examples: Sequence[CuratedCall] = (), config: EvaluateConfig, prices: PricesConfig,
                     llm_cost: float | None, ctx: M.MetricContext, max_new_tokens: int,
                     static: StaticPrompt | None = None, served_sample: int = 0,
                     progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Generate for ``calls`` with one model variant and score the answers. Reusable by ``select --probe``.

    ``static``: the static prompt parts an adapter was trained without (removed here as in training and in
    the router). ``served_sample``: when generation is batched, this many calls are generated again one at a
    time, as the router serves them, and the latency figures are theirs (a batch's wall time is not what a
    served request waits).
    """
    from slmigrate.evaluate.generate import generate, guides_for

    requests = [with_examples(c.request, examples) if examples else c.request for c in calls]
    if static:
        requests = [_without(static, r) for r in requests]
    budget = context_budget(model, tokenizer, max_new_tokens)
    prompts = [render(tokenizer, r, budget) for r in requests]

    def guides(n: int) -> list[Any] | None:
        # from the calls' own requests: the static tools are out of the prompt, not out of the schema.
        # A guide is spent by one decoding, so the served-latency sample gets fresh ones.
        return guides_for(model, tokenizer, [c.request for c in calls[:n]]) if config.constrained else None

    gen = generate(model, tokenizer, prompts, batch_size=config.batch_size, max_new_tokens=max_new_tokens,
                   progress=progress, guides=guides(len(calls)))
    served = generate(model, tokenizer, prompts[:served_sample], batch_size=1, max_new_tokens=max_new_tokens,
                      guides=guides(served_sample)) if served_sample and config.batch_size > 1 else None
    predictions = [parse(t) for t in gen.texts]
    scores = M.score(kind, predictions, [c.answer for c in calls], ctx)
    primary = M.primary_metric(kind, config.primary)
    return {
        "metrics": scores.means, "counts": scores.counts, "primary": scores.means.get(primary),
        # 95% interval per metric (Wilson for 0/1 scores, else a seeded bootstrap): decide() reads the primary's
        "intervals": {name: estimate(values, config.seed) for name, values in scores.items.items()},
        "efficiency": slm_figures(gen, prices, llm_cost, served),
        "_items": [{"id": c.id, "text": t, "prediction": p, primary: scores.items.get(primary, [None] * len(calls))[i]}
                   for i, (c, t, p) in enumerate(zip(calls, gen.texts, predictions))],
    }


def _without(static: StaticPrompt, request: dict[str, Any]) -> dict[str, Any]:
    messages, tools = static.apply(list(request.get("messages") or []), request.get("tools"))
    return {**request, "messages": messages, "tools": tools}


OUTCOMES = ("migrate", "stay", "not_enough_evidence")


def decide(kind: str, n_test: int, finetuned: dict[str, Any] | None, metric: str, threshold: float,
           min_calls: int, *, llm: dict[str, Any] | None = None,
           max_latency_ratio: float | None = None) -> dict[str, Any]:
    """Whether the task migrates, on the **lower** bound of the fine-tuned primary metric's 95% interval.

    Outcomes: ``migrate`` (lower bound >= threshold, and the latency ratio within ``max_latency_ratio`` when
    set); ``stay`` (the interval says no, or the small model is too slow); ``not_enough_evidence`` (so few scored
    calls that even n of n right would leave the lower bound under the threshold, or fewer than ``min_calls``:
    ``needs_calls`` more test calls are needed). ``migrate`` and ``reason`` are kept for older readers; ``why``
    is the same sentence. ``llm`` is the LLM's recorded figures (``latency_p50_ms``) for the latency check.
    """
    base: dict[str, Any] = {"outcome": "stay", "metric": metric, "threshold": threshold, "value": None,
                            "lower": None, "upper": None, "n": 0, "method": None, "needs_calls": None,
                            "latency": _latency(finetuned, llm, max_latency_ratio)}

    def out(outcome: str, why: str) -> dict[str, Any]:
        return {**base, "migrate": outcome == "migrate", "outcome": outcome, "reason": why, "why": why}

    if finetuned is None or finetuned.get("skipped"):
        return out("stay", "no fine-tuned model evaluated; run `slmigrate finetune` first")
    value = finetuned.get("primary")
    if value is None:
        return out("stay", f"{metric} could not be computed on the test calls")
    interval = (finetuned.get("intervals") or {}).get(metric)
    if interval is None:  # an evaluation written before intervals: a point estimate is no basis for a decision
        return out("stay", f"no interval for {metric}; re-run `slmigrate evaluate --force`")
    n, lower, upper = int(interval["n"]), float(interval["low"]), float(interval["high"])
    base.update(value=value, lower=lower, upper=upper, n=n, method=interval["interval"])
    figure = f"fine-tuned {metric} {value:.3f} (95% interval {lower:.3f}-{upper:.3f}, {interval['interval']}, n={n})"
    if upper < threshold:
        return out("stay", f"{figure}: even the upper bound is under the threshold {threshold:.2f}")
    needed = calls_needed(threshold)
    if needed is None or n < max(needed, min_calls):
        if needed is None:
            return out("not_enough_evidence", f"{figure}: a threshold of {threshold:.2f} cannot be reached by a "
                                              "lower bound on any number of calls; lower the threshold")
        base["needs_calls"] = max(needed, min_calls) - n
        best = wilson(n, n)[0]
        because = (f"even {n} of {n} right would give a lower bound of {best:.3f} < threshold {threshold:.2f}"
                   if best < threshold else f"fewer than [evaluate] min_test_calls = {min_calls}")
        return out("not_enough_evidence",
                   f"not enough evidence: needs {base['needs_calls']} more calls ({figure}; {because}, and it takes "
                   f"{max(needed, min_calls)} test calls)")
    if lower < threshold:
        return out("stay", f"{figure}: lower bound {lower:.3f} < threshold {threshold:.2f}")
    lat = base["latency"]
    if lat["ratio"] is not None and max_latency_ratio is not None and lat["ratio"] > max_latency_ratio:
        return out("stay", f"{figure} passes, but the small model is too slow: p50 {lat['slm_p50_ms']:,.0f} ms "
                           f"is {lat['ratio']:.2f}x the LLM's {lat['llm_p50_ms']:,.0f} ms (max_latency_ratio "
                           f"{max_latency_ratio:g})")
    why = f"{figure}: lower bound {lower:.3f} >= threshold {threshold:.2f}"
    if max_latency_ratio is not None and lat["ratio"] is None:
        why += "; latency not checked (no recorded LLM latency)"
    return out("migrate", why)


def _latency(finetuned: dict[str, Any] | None, llm: dict[str, Any] | None,
             max_ratio: float | None) -> dict[str, Any]:
    """The fine-tuned model's p50/p95 latency next to the LLM's recorded p50, and their ratio."""
    eff = (finetuned or {}).get("efficiency") or {}
    slm, llm_p50 = eff.get("latency_p50_ms"), (llm or {}).get("latency_p50_ms")
    return {"slm_p50_ms": slm, "slm_p95_ms": eff.get("latency_p95_ms"), "llm_p50_ms": llm_p50,
            "ratio": round(slm / llm_p50, 3) if slm is not None and llm_p50 else None, "max_ratio": max_ratio}


# --- the plan ------------------------------------------------------------------------------------------------

def migration_plan(ws: Workspace, results: list[dict[str, Any]], clusters: dict[str, dict[str, Any]],
                   prices: PricesConfig) -> dict[str, Any]:
    """Measured share of calls, tokens and LLM cost in clusters that migrate, over all curated calls."""
    calls = load_curated(ws)
    assigned = ws.store.clusters_of([c.id for c in calls])
    migrating = {r["cluster"] for r in results if r["decision"]["migrate"]}
    totals = defaultdict(float)
    moved = defaultdict(float)
    for c in calls:
        tokens = (c.prompt_tokens or 0) + (c.completion_tokens or 0)
        cost = prices.cost(c.model, c.prompt_tokens, c.completion_tokens)
        totals["calls"] += 1
        totals["tokens"] += tokens
        totals["cost_usd"] += cost
        if assigned.get(c.id) in migrating:
            moved["calls"] += 1
            moved["tokens"] += tokens
            moved["cost_usd"] += cost
    measured = {k: {"total": totals[k], "migrate": moved[k], "share": moved[k] / totals[k] if totals[k] else 0.0}
                for k in ("calls", "tokens", "cost_usd")}
    estimate = {cid: cluster_estimate(info) for cid, info in clusters.items() if cid in {r["cluster"] for r in results}}
    return {"migrating_clusters": sorted(migrating), "measured": measured, "estimate_per_cluster": estimate,
            "estimate": _overall_estimate(ws), "decisions": {r["cluster"]: plan_line(r) for r in results},
            "not_enough_evidence": {r["cluster"]: r["decision"].get("needs_calls") for r in results
                                    if r["decision"].get("outcome") == "not_enough_evidence"}}


PLAN_KEYS = ("outcome", "metric", "threshold", "value", "lower", "upper", "n", "method", "needs_calls", "why")


def plan_line(result: dict[str, Any]) -> dict[str, Any]:
    """One task's decision in the plan: outcome, point estimate, 95% interval, n, and the small model's
    p50/p95 latency next to the LLM's recorded p50 (``latency``)."""
    d = result["decision"]
    return {**{k: d.get(k) for k in PLAN_KEYS}, "latency": d.get("latency")}


def cluster_estimate(info: ClusterInfo) -> dict[str, Any] | None:
    """``slmigrate cluster``'s up-front replaceability guess for one cluster (score, verdict, reasons)."""
    if "replaceability" not in info:
        return None
    return {"score": info["replaceability"], "likely_replaceable": info.get("likely_replaceable"),
            "reasons": info.get("reasons")}


def _overall_estimate(ws: Workspace) -> Any:
    found = artifacts.clusters_file(ws, required=False)
    return None if found is None else found.get("overall")


# --- the whole run -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class EvaluateResult(StageOutput):
    """``evaluate``'s result; ``to_dict()`` is the evaluation's body (evaluation.json), with
    ``skipped_unchanged`` when nothing changed and the stored evaluation is returned."""

    run: str
    clusters: list[dict[str, Any]]
    plan: dict[str, Any]
    skipped: list[dict[str, Any]] = field(default_factory=list)  # clusters left out, with the reason
    skipped_unchanged: bool = False


def evaluate(ws: Workspace, config: EvaluateConfig | None = None, *, progress: Progress | None = None,
             force: bool = False, clusters: Sequence[str] | None = None, variants: Sequence[str] | None = None,
             limit: int | None = None, judge: Any = None, prices: PricesConfig | None = None, embedder: Any = None,
             model: str | None = None) -> EvaluateResult:
    """Evaluate each cluster on its test split and decide which migrate; store and return the results.

    ``progress`` hears of each cluster and variant's generation as ``("CLUSTER VARIANT", calls done, calls)``.
    """
    config = config or EvaluateConfig()
    prices = prices or PricesConfig()
    variants = list(variants or config.variants)
    limit = limit if limit is not None else config.limit
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        raise SlmigrateError(f"unknown variant(s) {', '.join(bad)}; choose from {', '.join(VARIANTS)}")
    started = time.time()
    known = load_clusters(ws)
    wanted = list(clusters) if clusters else sorted(known)  # unclustered calls are no task: not in ``known``
    missing = [c for c in wanted if c not in known]
    if missing:
        raise SlmigrateError(f"unknown cluster(s) {', '.join(missing)}; see `slmigrate cluster --json` for ids "
                             f"({', '.join(sorted(known)[:10])})")
    version = current_version(ws)
    test = load_curated(ws, "test")
    train = load_curated(ws, "train") if "icl" in variants else []
    assigned = ws.store.clusters_of([c.id for c in test] + [c.id for c in train])
    by_cluster: dict[str, list[CuratedCall]] = defaultdict(list)
    train_by: dict[str, list[CuratedCall]] = defaultdict(list)
    for c in test:
        if c.answer is not None:
            by_cluster[assigned.get(c.id)].append(c)
    for c in train:
        train_by[assigned.get(c.id)].append(c)
    adapters = {cid: find_adapter(ws, cid, model) for cid in wanted}
    fingerprint = fingerprint_of(version, sorted(wanted), variants, limit, config.fingerprint_dump(), model,
                                 {c: [str(a), a.stat().st_mtime] if a else None for c, a in adapters.items()},
                                 getattr(judge, "model", None), getattr(judge, "mode", None),
                                 _overall_estimate(ws))
    previous = ws.evaluation()
    if not force and previous is not None and ws.is_fresh("evaluate", fingerprint):
        return EvaluateResult.of({**previous, "skipped_unchanged": True})
    previously = {r["cluster"] for r in (previous or {"clusters": []})["clusters"]
                  if r.get("decision", {}).get("migrate")}

    embedder = _text_embedder(config, [known[c] for c in wanted], embedder)
    run = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")[:-4]
    out_dir = ws.path("evals", run)
    # Runs killed mid-way leave their .RUN.tmp folders; no reader looks at them, so clear them all.
    for stale in ws.path("evals").glob(".*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = ws.path("evals", f".{run}.tmp")
    (tmp / "predictions").mkdir(parents=True)
    results, skipped = [], []
    for cid in wanted:
        calls = by_cluster.get(cid, [])[: limit or None]
        if not calls:
            skipped.append({"cluster": cid, "reason": "no test calls with an answer"})
            continue
        res = _score_cluster(ws, cid, known[cid], calls, train_by.get(cid, []), variants, adapters[cid],
                             model, config, prices, embedder, judge, progress or silent)
        res["decision"]["previously_migrated"] = cid in previously
        items = {v: res["variants"][v].pop("_items", []) for v in res["variants"]}
        with (tmp / "predictions" / f"{_safe(cid)}.jsonl").open("w") as fh:
            for v, rows in items.items():
                for row in rows:
                    fh.write(json.dumps({"variant": v, **row}, ensure_ascii=False, default=str) + "\n")
        results.append(res)
    plan = migration_plan(ws, results, known, prices)
    body = {
        "run": run, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "curated_version": version, "variants": variants, "limit": limit,
        "config": config.model_dump(), "prices": prices.model_dump(),
        "judge": {"model": judge.model, "mode": judge.mode} if judge is not None else None,
        "clusters": results, "skipped": skipped, "plan": plan,
        "duration_s": round(time.time() - started, 1),
    }
    artifacts.write_evaluation_run(tmp, body)
    tmp.rename(out_dir)
    artifacts.write_evaluation(ws, body)
    ws.write_manifest("evaluate", fingerprint=fingerprint, config=config.model_dump(), started=started,
                      counts={"clusters": len(results), "migrate": len(plan["migrating_clusters"]),
                              "test_calls": sum(r["test_calls"] for r in results)},
                      extra={"run": run})
    return EvaluateResult.of(body)


def evaluate_calls(ws: Workspace, cluster: str, calls: Sequence[CallRecord], config: EvaluateConfig | None = None,
                   *, variants: Sequence[str] = ("finetuned",), train: Sequence[CuratedCall] = (),
                   prices: PricesConfig | None = None, embedder: Any = None, judge: Any = None,
                   model: str | None = None, progress: Progress | None = None) -> dict[str, Any]:
    """Evaluate one cluster's model variants on the given ``calls`` (those with an answer) instead of its test
    split, and decide as ``evaluate`` would: the same adapter, generation, scoring and decision, nothing stored.
    Returns the per-cluster result ``evaluate`` lists (``variants.<name>.primary`` is the primary metric).
    ``slmigrate refine`` re-checks a deployed adapter on fresh traffic with it."""
    config = config or EvaluateConfig()
    prices = prices or PricesConfig()
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        raise SlmigrateError(f"unknown variant(s) {', '.join(bad)}; choose from {', '.join(VARIANTS)}")
    known = load_clusters(ws)
    if cluster not in known:
        raise SlmigrateError(f"unknown cluster {cluster}; see `slmigrate cluster --json` for ids "
                             f"({', '.join(sorted(known)[:10])})")
    calls = [c for c in calls if c.answer is not None]
    if not calls:
        raise SlmigrateError(f"no calls with an answer to evaluate cluster {cluster} on")
    embedder = _text_embedder(config, [known[cluster]], embedder)
    result = _score_cluster(ws, cluster, known[cluster], calls, list(train), list(variants),
                            find_adapter(ws, cluster, model), model, config, prices, embedder, judge,
                            progress or silent)
    for variant in result["variants"].values():
        variant.pop("_items", None)
    return result


def _text_embedder(config: EvaluateConfig, clusters: Sequence[ClusterInfo], embedder: Any) -> Any:
    """The embedder for the text-similarity metric: the given one, else the configured one when a text cluster
    is evaluated (``none`` skips the metric)."""
    if embedder is None and config.embedder != "none" and any(cluster_kind(c) == "text" for c in clusters):
        from slmigrate.cluster.embed import get_embedder

        embedder = get_embedder(config.embedder)
    return embedder


def _score_cluster(ws, cid, info, calls, train, variants, adapter, model_name, config, prices, embedder, judge, bar):
    """One cluster's variants on ``calls``: the metric context (text clusters get the embedder and the judge),
    then generation, scoring and the decision. ``evaluate`` and ``evaluate_calls`` both come through here."""
    from slmigrate.evaluate import generate as G

    cluster_judge = judge if cluster_kind(info) == "text" else None
    ctx = M.MetricContext([c.request for c in calls], embedder, cluster_judge)
    return _evaluate_cluster(ws, cid, info, calls, train, variants, adapter, model_name, config, prices, ctx, bar, G)


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)


def _evaluate_cluster(ws, cid, info, calls, train, variants, adapter, model_name, config, prices, ctx, bar, G):
    kind = cluster_kind(info)
    metric = M.primary_metric(kind, config.primary)
    threshold = config.threshold.get(kind, 0.9)
    llm = llm_figures(ws, calls, prices)
    # An adapter only works on the base it was trained on; --model names the base for clusters without one.
    base_name = (adapter_base_model(adapter) if adapter else None) or model_name or config.model
    out: dict[str, Any] = {
        "cluster": cid, "label": info.get("label"), "kind": kind, "primary_metric": metric,
        "threshold": threshold, "test_calls": len(calls), "adapter": ws.relative(adapter) if adapter else None,
        "llm": llm, "variants": {}, "estimate": cluster_estimate(info),
    }
    order = [v for v in VARIANTS if v in variants]  # finetuned last: peft injects its layers into the base
    model = tokenizer = None
    for variant in order:
        if variant == "finetuned" and adapter is None:
            out["variants"][variant] = {"skipped": True, "reason": "no adapter for this cluster"}
            continue
        if variant == "icl" and not train:
            out["variants"][variant] = {"skipped": True, "reason": "no train calls in this cluster"}
            continue
        if model is None or (variant == "finetuned" and not (adapter / "adapter_config.json").exists()):
            path = adapter if variant == "finetuned" and not (adapter / "adapter_config.json").exists() \
                else base_name
            model, tokenizer, resolved = G.load_model(path, device=config.device)
            out["model"] = str(resolved.hub_id or resolved.path)
        if variant == "finetuned" and (adapter / "adapter_config.json").exists():
            # merged into the weights and in the number format the router serves it in (bfloat16 on a CPU with
            # native support), so the scores below are the served model's
            from slmigrate.evaluate.greedy import for_serving

            model = for_serving(G.attach_adapter(model, adapter).merge_and_unload())
        max_new = G.max_new_tokens_for(tokenizer, [answer_text(c.answer) for c in calls],
                                       cap=config.max_new_tokens)
        examples = icl_examples(train, config.icl_examples, config.seed) if variant == "icl" else ()
        static = StaticPrompt.load(adapter) if variant == "finetuned" and adapter is not None else None
        what = f"{cid} {variant}"
        bar(what, 0, len(calls))
        out["variants"][variant] = evaluate_variant(
            model, tokenizer, calls, kind, examples=examples, config=config, prices=prices,
            llm_cost=llm["cost_per_1k_usd"], ctx=ctx, max_new_tokens=max_new, static=static,
            served_sample=config.served_latency_calls if variant == "finetuned" else 0,
            progress=lambda done, what=what: bar(what, done, len(calls)))
        if examples:
            out["variants"][variant]["examples"] = [e.id for e in examples]
    if adapter is not None and (adapter / "metrics.json").exists():
        trained = json.loads((adapter / "metrics.json").read_text())
        out["training"] = {k: trained.get(k) for k in ("method", "base_model", "examples", "steps", "epochs",
                                                       "best_val_loss", "final_train_loss", "seconds")}
    out["decision"] = decide(kind, len(calls), out["variants"].get("finetuned"), metric, threshold,
                             config.min_test_calls, llm=llm, max_latency_ratio=config.max_latency_ratio)
    return out


# --- the CI gate ---------------------------------------------------------------------------------------------

def gate(result: dict[str, Any], fail_under: float) -> list[dict[str, Any]]:
    """Clusters marked for migration (now, or in the previous evaluation: a regression must not slip through
    by no longer being marked) whose fine-tuned primary metric is below ``fail_under``."""
    failing = []
    for r in result.get("clusters", []):
        d = r.get("decision", {})
        if not (d.get("migrate") or d.get("previously_migrated")):
            continue
        value = (r["variants"].get("finetuned") or {}).get("primary")
        if value is None or value < fail_under:
            failing.append({"cluster": r["cluster"], "metric": r["primary_metric"], "value": value,
                            "fail_under": fail_under})
    return failing


def check_gate(result: dict[str, Any], fail_under: float | None) -> None:
    """Raise ``GateFailed`` (exit code 3) when the gate fails."""
    if fail_under is None:
        return
    raise_if_failing(gate(result, fail_under), fail_under)


def raise_if_failing(failing: list[dict[str, Any]], fail_under: float) -> None:
    """``GateFailed`` naming each failing cluster and its score, when there is one."""
    if failing:
        detail = "; ".join(f"{f['cluster']}: {f['metric']} = "
                           f"{'n/a' if f['value'] is None else format(f['value'], '.3f')}" for f in failing)
        raise GateFailed(f"quality gate failed: {len(failing)} cluster(s) marked for migration score below "
                         f"{fail_under}: {detail}; retrain them or keep them on the LLM")
