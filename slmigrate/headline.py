"""The answer `audit` and `run` end with: which share of the LLM calls and spend could move to small models.

Built from what the workspace holds - the clusters (tasks, cost, the hand-set prior), the probe (measured
replaceability with 95% intervals), the evaluation when there is one (the fine-tuned score) - and from the store
(how many token counts were estimated, calls without a model or a timestamp, the LLM's logged latency). Nothing
here measures anything new; it only puts the figures side by side, in numbers and in words.
"""

from __future__ import annotations

import json
from typing import Any

from slmigrate import artifacts
from slmigrate.config import Config
from slmigrate.record import TIMESTAMP_MISSING_KEY
from slmigrate.usage import ESTIMATED_KEY
from slmigrate.workspace import Workspace


def log_facts(ws: Workspace) -> dict[str, Any]:
    """What the log itself lacked: estimated token counts (and by which tokenizer), model, timestamps."""
    conn = ws.store.conn
    # metadata is JSON text in both stores; LIKE on the key works in SQLite and PostgreSQL alike.
    row = conn.execute(
        "SELECT COUNT(*), "
        f"COALESCE(SUM(CASE WHEN metadata LIKE '%\"{ESTIMATED_KEY}\"%' THEN 1 ELSE 0 END), 0), "
        "COALESCE(SUM(CASE WHEN model IS NULL OR model = '' THEN 1 ELSE 0 END), 0), "
        f"COALESCE(SUM(CASE WHEN metadata LIKE '%\"{TIMESTAMP_MISSING_KEY}\"%' THEN 1 ELSE 0 END), 0), "
        "COALESCE(SUM(CASE WHEN prompt_tokens IS NULL AND completion_tokens IS NULL THEN 1 ELSE 0 END), 0) "
        "FROM calls").fetchone()
    tokenizer = None
    if row[1]:
        sample = conn.execute(f"SELECT metadata FROM calls WHERE metadata LIKE '%\"{ESTIMATED_KEY}\"%' LIMIT 1"
                              ).fetchone()
        tokenizer = json.loads(sample[0]).get(ESTIMATED_KEY)
    latencies = sorted(r[0] for r in conn.execute("SELECT latency_ms FROM calls WHERE latency_ms IS NOT NULL"))
    return {"calls": row[0], "tokens_estimated": row[1], "tokenizer": tokenizer, "without_model": row[2],
            "without_timestamp": row[3], "without_tokens": row[4],
            "llm_latency_p50_ms": latencies[len(latencies) // 2] if latencies else None}


def _slm_cost_per_call(probed: dict[str, Any] | None, evals: dict[str, Any] | None, config: Config
                       ) -> tuple[float | None, float | None, str | None]:
    """(USD per call, latency p50 ms, where from) of the small model: the fine-tuned evaluation when there is
    one, else the few-shot probe's compute time on this machine."""
    for r in (evals or {}).get("clusters") or []:
        eff = ((r.get("variants") or {}).get("finetuned") or {}).get("efficiency") or {}
        if eff.get("cost_per_1k_usd") is not None:
            return eff["cost_per_1k_usd"] / 1000, eff.get("latency_p50_ms"), "evaluate (fine-tuned)"
    runs = [t["fewshot"] for t in (probed or {}).get("clusters") or [] if not t["fewshot"].get("skipped")]
    if not runs:
        return None, None, None
    compute_ms = sum(r["compute_ms_per_call"] for r in runs) / len(runs)
    cuda = any(r.get("device") == "cuda" for r in runs)
    threads = max((r.get("cpu_threads") or _torch_threads()) for r in runs)
    hour = config.prices.gpu_hour_usd if cuda else config.prices.cpu_hour_usd * threads
    latency = sorted(r["latency_p50_ms"] for r in runs)[len(runs) // 2]
    return compute_ms / 1000 * hour / 3600, latency, "few-shot probe"


def headline(ws: Workspace, config: Config) -> dict[str, Any] | None:
    """The answer in numbers (``text``: in words), or None before the cluster stage has run."""
    clusters = artifacts.clusters_file(ws, required=False)
    if clusters is None:
        return None
    probed = ws.probe()
    evals = ws.evaluation()
    facts = log_facts(ws)
    tasks = clusters["clusters"]
    calls, cost = int(clusters.get("calls") or 0), float(clusters.get("cost_usd") or 0.0)
    prior = clusters.get("overall") or {}
    measured = (probed or {}).get("overall") or {}
    finetuned = {r["cluster"]: (r.get("variants") or {}).get("finetuned", {}).get("primary")
                 for r in (evals or {}).get("clusters") or []}
    by_task = {t["cluster"]: t for t in (probed or {}).get("clusters") or []}

    def share(key: str, prior_key: str) -> dict[str, Any]:
        found = measured.get(key) or {}
        return {"value": found.get("value"), "low": found.get("low"), "high": found.get("high"),
                "prior": prior.get(prior_key)}

    slm_cost, slm_latency, slm_source = _slm_cost_per_call(probed, evals, config)
    savings = None
    plan = (evals or {}).get("plan") or {}
    moved = plan.get("measured") or {}
    if moved and slm_cost is not None and (moved.get("calls") or {}).get("total"):
        # Once evaluated, the tasks that move are the evaluation's decisions (each on its own lower bound), not
        # the probe's prediction: the saving follows what will actually be routed to small models.
        per_call = moved["cost_usd"]["migrate"] / moved["calls"]["total"] - moved["calls"]["share"] * slm_cost
        savings = {"value": round(1e6 * per_call, 2), "low": None, "high": None, "basis": "evaluation"}
    elif measured and calls and slm_cost is not None:
        # Per million calls like these: the LLM spend on the calls that move, less the small model serving them.
        savings = {k: round(1e6 * (measured["cost_usd"][k] / calls - measured["calls_share"][k] * slm_cost), 2)
                   for k in ("value", "low", "high")}
        savings["basis"] = "probe"
    llm_latency = facts["llm_latency_p50_ms"]
    out = {
        "tasks": len(tasks), "calls": calls, "cost_usd": round(cost, 6),
        "cost_known": facts["without_tokens"] < facts["calls"] or cost > 0,
        "tokens_estimated": facts["tokens_estimated"], "tokenizer": facts["tokenizer"],
        "calls_without_model": facts["without_model"], "assumed_model": config.prices.default_model,
        "calls_without_timestamp": facts["without_timestamp"],
        "calls_share": share("calls_share", "call_share"), "cost_share": share("cost_share", "cost_share"),
        "measured": bool(measured),
        "savings_per_million_calls_usd": savings, "slm_cost_source": slm_source,
        "latency_ms": {"llm_p50": llm_latency, "slm_p50": slm_latency,
                       "change": round(slm_latency - llm_latency, 1) if llm_latency and slm_latency else None},
        "per_task": [_task_line(c, by_task.get(c["id"]), finetuned.get(c["id"])) for c in tasks],
        "evaluated": _evaluated(evals),
    }
    out["text"] = words(out)
    return out


def _evaluated(evals: dict[str, Any] | None) -> dict[str, Any] | None:
    """What the evaluation decided, when there is one: the fine-tuned models measured on held-out calls outrank
    the probe's prediction for the tasks they cover."""
    plan = (evals or {}).get("plan")
    if not plan:
        return None
    measured = plan.get("measured") or {}
    results = (evals or {}).get("clusters") or []
    return {"migrating": list(plan.get("migrating_clusters") or []),
            "evaluated": [r["cluster"] for r in results],
            "calls_share": (measured.get("calls") or {}).get("share"),
            "cost_share": (measured.get("cost_usd") or {}).get("share"),
            # the decision per task: outcome, point estimate and its 95% interval (the lower bound decides)
            "decisions": {r["cluster"]: {k: (r.get("decision") or {}).get(k)
                                         for k in ("outcome", "value", "lower", "upper", "n", "needs_calls")}
                          for r in results},
            "not_enough_evidence": {cid: n for cid, n in (plan.get("not_enough_evidence") or {}).items()}}


def _bounds(e: dict[str, Any], clusters: list[str]) -> str:
    """' (c01 1.000, 95% lower bound 0.940, n=60)' for the tasks named, from the evaluation's decisions."""
    shown = []
    for cid in clusters:
        d = (e.get("decisions") or {}).get(cid) or {}
        if d.get("lower") is not None and d.get("value") is not None:
            shown.append(f"{cid} {d['value']:.3f}, 95% lower bound {d['lower']:.3f}, n={d['n']}")
    return f" ({'; '.join(shown)})" if shown else ""


def _task_line(cluster: dict[str, Any], probed: dict[str, Any] | None, finetuned: float | None) -> dict[str, Any]:
    m = (probed or {}).get("measured") or {}
    return {"cluster": cluster["id"], "label": cluster.get("label"), "calls": cluster.get("size"),
            "cost_usd": cluster.get("cost_usd"), "prior": cluster.get("replaceability"),
            "metric": (probed or {}).get("metric"), "threshold": (probed or {}).get("threshold"),
            "measured": m.get("score"), "low": m.get("low"), "high": m.get("high"), "probe": m.get("probe"),
            "n": m.get("n"), "replaceable": (probed or {}).get("replaceable"), "finetuned": finetuned}


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.0f}%"


def _usd(x: float) -> str:
    return f"${x:,.2f}" if abs(x) >= 1 else f"${x:,.4f}"


def words(h: dict[str, Any]) -> str:
    """The headline as sentences, for the terminal and the report."""
    parts = [f"{h['tasks']} recurring task{'s' if h['tasks'] != 1 else ''} in {h['calls']:,} calls"]
    if h["cost_known"]:
        parts[0] += f" costing {_usd(h['cost_usd'])}"
        if h["tokens_estimated"]:
            parts[0] += f" (tokens of {h['tokens_estimated']:,} calls estimated with {h['tokenizer']})"
        if h["calls_without_model"] and h["assumed_model"]:
            parts[0] += f" ({h['calls_without_model']:,} calls without a model priced as {h['assumed_model']})"
    else:
        parts[0] += "; cost unknown (the log has no token counts and no tokenizer is installed)"
    c, k = h["calls_share"], h["cost_share"]
    if h["measured"]:
        parts.append(f"measured by the probe (no training): {_pct(c['value'])} of calls (95% interval "
                     f"{_pct(c['low'])}-{_pct(c['high'])}) "
                     f"and {_pct(k['value'])} of cost ({_pct(k['low'])}-{_pct(k['high'])}) could move to small "
                     "models")
    else:
        parts.append("not measured yet (run `slmigrate probe`)")
    e = h.get("evaluated")
    if e:
        moving = ", ".join(e["migrating"]) or "none"
        parts.append(f"evaluated fine-tuned on held-out calls ({len(e['evaluated'])} task(s)): migrating {moving}"
                     f"{_bounds(e, e['migrating'])}, {_pct(e['calls_share'])} of calls and {_pct(e['cost_share'])} "
                     "of cost (a task migrates when the 95% lower bound of its score reaches the threshold)")
        for cid, needs in (e.get("not_enough_evidence") or {}).items():
            parts.append(f"{cid}: not enough evidence: needs {needs} more calls" if needs is not None
                         else f"{cid}: not enough evidence (no number of calls lets a lower bound reach the threshold)")
    parts.append(f"hand-set prior: {_pct(c['prior'])} of calls, {_pct(k['prior'])} of cost")
    s = h["savings_per_million_calls_usd"]
    if s is not None and s.get("basis") == "evaluation":
        parts.append(f"saving {_usd(s['value'])} per million calls on the tasks the evaluation migrates (small "
                     f"model priced from the {h['slm_cost_source']})")
    elif s is not None:
        parts.append(f"saving {_usd(s['value'])} per million calls ({_usd(s['low'])} to {_usd(s['high'])}, if the "
                     f"probe's tasks move; small model priced from the {h['slm_cost_source']})")
    lat = h["latency_ms"]
    if lat["change"] is not None:
        parts.append(f"latency p50 {lat['llm_p50']:,.0f} ms -> {lat['slm_p50']:,.0f} ms")
    elif lat["slm_p50"] is not None:
        parts.append(f"latency change unknown (the log has no LLM latencies; small model p50 "
                     f"{lat['slm_p50']:,.0f} ms)")
    if h["calls_without_timestamp"]:
        parts.append(f"{h['calls_without_timestamp']:,} calls have no timestamp in the log")
    return "; ".join(parts) + "."


def _torch_threads() -> int:
    """The CPU threads torch would use; the report also runs on a core install without torch (the `train`
    extra), where the machine's CPU count stands in."""
    try:
        import torch
    except ImportError:
        import os

        return os.cpu_count() or 1
    return torch.get_num_threads()
