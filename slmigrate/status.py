"""What the workspace holds: calls by source, agent and model, and what each stage has produced."""

from __future__ import annotations

from typing import Any

from slmigrate.workspace import STAGES, Workspace


def status(ws: Workspace) -> dict[str, Any]:
    from slmigrate.serve.guard import live_record

    store = ws.store
    totals = store.conn.execute(
        "SELECT COUNT(*), COALESCE(SUM(prompt_tokens),0), COALESCE(SUM(completion_tokens),0), "
        "SUM(CASE WHEN status != 'ok' THEN 1 ELSE 0 END), COUNT(DISTINCT session) FROM calls"
    ).fetchone()
    stages: dict[str, Any] = {}
    previous_created: str | None = None
    store_fp = store.fingerprint()
    for stage in STAGES[1:]:
        manifest = ws.manifest(stage)
        if manifest is None:
            stages[stage] = {"exists": False, "stale": None}
            continue
        reasons = []
        if stage == "curate" and manifest.get("store_fingerprint") not in (None, store_fp):
            reasons.append("new calls since it ran")
        if previous_created and previous_created > manifest["created"]:
            reasons.append("an earlier stage ran after it")
        stages[stage] = {
            "exists": True,
            "created": manifest["created"],
            "counts": manifest.get("counts", {}),
            "stale": bool(reasons),
            "why": "; ".join(reasons) or None,
        }
        previous_created = max(previous_created or "", manifest["created"])
    return {
        "workspace": str(ws.root),
        "schema_version": store.schema_version,
        "calls": totals[0],
        "failed_calls": totals[3] or 0,
        "sessions": totals[4],
        "prompt_tokens": totals[1],
        "completion_tokens": totals[2],
        "by_source": store.group_counts("source"),
        "by_agent": store.group_counts("agent"),
        "by_model": store.group_counts("model"),
        "stages": stages,
        # The router's live guard per migrated task (serve/guard.json): live agreement, its bound, demotions.
        "live_guard": live_record(ws),
    }
