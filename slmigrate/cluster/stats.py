"""What each cluster is and what it costs: label, output kind, tokens, cost, replaceability."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from slmigrate.cluster.views import OUTPUT_KINDS

if TYPE_CHECKING:
    from slmigrate.cluster.calltable import CallTable


# Words of the task view's own scaffolding (views.py), which say nothing about the task.
_VIEW_WORDS = {"tools", "offered", "calls", "tool", "result", "user", "free", "text", "reply", "short", "label",
               "answer", "json", "object", "keys", "array", "failed", "prompt", "system", "turn"}


def keywords(docs: list[str], top: int = 6) -> list[list[str]]:
    """c-TF-IDF: per class, the words frequent in it and rare across the classes (one document per class)."""
    if not docs:
        return []
    from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS, CountVectorizer

    try:
        vec = CountVectorizer(stop_words=list(ENGLISH_STOP_WORDS | _VIEW_WORDS),
                              token_pattern=r"(?u)\b[a-zA-Z][a-zA-Z_]{2,}\b",
                              max_features=50_000)
        counts = vec.fit_transform(docs).astype(np.float64)
    except ValueError:  # no words at all
        return [[] for _ in docs]
    words = vec.get_feature_names_out()
    tf = counts.multiply(1.0 / np.maximum(counts.sum(axis=1), 1.0)).tocsr()
    avg_words = counts.sum() / counts.shape[0]
    idf = np.log(1.0 + avg_words / np.maximum(np.asarray(counts.sum(axis=0)).ravel(), 1.0))
    scores = tf.multiply(idf).toarray()
    return [[words[j] for j in np.argsort(-row, kind="stable")[:top] if row[j] > 0] for row in scores]


def _pct(values: np.ndarray, q: float) -> int | None:
    return int(round(float(np.percentile(values, q)))) if len(values) else None


def replaceability(kind: str, size: int, completion_p50: int | None, prompt_p95: int | None,
                   shape_share: float, system_share: float) -> tuple[float, list[str]]:
    """An up-front guess (0-1) of how well a small fine-tuned model could take over, with the reasons.

    Follows the paper's argument: narrow, repetitive calls with structured, short outputs are what SLMs do well;
    open-ended long generation is not. ``evaluate`` measures it for real later.
    """
    short = completion_p50 is not None and completion_p50 <= 50
    medium = completion_p50 is not None and completion_p50 <= 200
    graded = (  # per signal: (met, points, reason) tiers best first, then the reason when none is met
        ([(kind in ("tool_call", "json", "label"), 0.3, f"structured output ({kind})")],
         "free-text output (harder to match)"),
        ([(short, 0.2, f"short answers (p50 {completion_p50} tokens)"),
          (medium, 0.1, f"medium answers (p50 {completion_p50} tokens)")],
         f"long answers (p50 {completion_p50} tokens)"),
        ([(shape_share >= 0.8, 0.2, f"one answer shape in {shape_share:.0%} of calls"),
          (shape_share >= 0.5, 0.1, f"a few answer shapes (top one {shape_share:.0%})")],
         f"varied answer shapes (top one {shape_share:.0%})"),
        ([(system_share >= 0.8, 0.15, "one fixed instruction set (narrow task)")],
         f"varied instructions (top one {system_share:.0%})"),
        ([(size >= 100, 0.15, f"{size} examples to learn from"), (size >= 30, 0.08, f"only {size} examples")],
         f"few examples ({size})"),
    )
    score, reasons = 0.0, []
    for tiers, otherwise in graded:
        points, reason = next(((pts, why) for met, pts, why in tiers if met), (0.0, otherwise))
        score += points
        reasons.append(reason)
    if prompt_p95 is not None and prompt_p95 > 8000:
        score -= 0.1
        reasons.append(f"long context (p95 {prompt_p95} prompt tokens) needs a long-context SLM")
    return round(min(max(score, 0.0), 1.0), 3), reasons


def most_common(values: np.ndarray, n: int | None = None) -> list[tuple[int, int]]:
    """(value, count) pairs, most frequent first, ties in order of first appearance (as ``Counter`` would)."""
    if len(values) == 0:
        return []
    unique, first, counts = np.unique(values, return_index=True, return_counts=True)
    order = np.lexsort((first, -counts))[:n]
    return [(unique[i].item(), int(counts[i])) for i in order]


def cluster_stats(cid: str, members: np.ndarray, table: CallTable, total_calls: int, total_cost: float,
                  representative: tuple[str, str], replaceable_at: float, group: str | None,
                  source: str) -> dict[str, Any]:
    """The stats of one cluster from the call table's columns (``members``: its call indices, in call order)."""
    size = len(members)
    rows = table.call_row[members]
    kinds = {OUTPUT_KINDS[k]: n for k, n in most_common(table.row_kind[rows])}
    kind = max(OUTPUT_KINDS, key=lambda k: (kinds.get(k, 0), -OUTPUT_KINDS.index(k)))
    prompt = table.prompt[members]
    prompt = prompt[prompt >= 0]
    completion = table.completion[members]
    completion = completion[completion >= 0]
    cost = float(table.cost[members].sum())
    shape_share = most_common(table.row_answer[rows], 1)[0][1] / size
    system_share = most_common(table.row_system[rows], 1)[0][1] / size
    tool_ids = table.row_tool[rows]
    tools = {table.tools.values[t]: n for t, n in most_common(tool_ids[tool_ids >= 0], 10)}
    models = {table.models.values[m]: n for m, n in most_common(table.call_model[members], 5)}
    score, reasons = replaceability(kind, size, _pct(completion, 50), _pct(prompt, 95), shape_share, system_share)
    rep_id, rep_view = representative
    return {
        "id": cid,
        "group": group,
        "source": source,  # "clustered" or "task_tag"
        "size": size,
        "share": round(size / max(total_calls, 1), 4),
        "output_kind": kind,
        "output_kinds": kinds,
        "tools_called": tools,
        "models": models,
        "prompt_tokens": {"total": int(prompt.sum()), "p50": _pct(prompt, 50), "p95": _pct(prompt, 95)},
        "completion_tokens": {"total": int(completion.sum()), "p50": _pct(completion, 50),
                              "p95": _pct(completion, 95)},
        "cost_usd": round(cost, 6),
        "cost_share": round(cost / total_cost, 4) if total_cost > 0 else 0.0,
        "replaceability": score,
        "likely_replaceable": score >= replaceable_at,
        "reasons": reasons,
        "representative": {"id": rep_id, "view": rep_view[:600]},
    }
