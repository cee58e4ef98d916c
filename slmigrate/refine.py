"""Refine (paper step S6): fold the calls that arrived since the last run back into the migration.

One pass, in this order:

1. the new calls: everything stored since the last refine (or since curate, the first time) - from the proxy,
   the router or an import. Calls a small model answered are counted but never learned from: a specialist must
   learn the LLM's answers, not its own;
2. curate only those, through curate's own entry point (``curate.curate_calls``: the same filters,
   de-duplication and PII scrubbing as ``slmigrate curate``);
3. assign them to the existing clusters with the saved cluster model; the rest form the unassigned pool, and
   when the cluster stage's own clustering (``cluster.cluster_calls``) finds a recurring task in the pool (a
   cluster of at least ``min_size`` calls), it is proposed as a new cluster;
4. drift per cluster: its share of traffic then and now, how far its new calls sit from its centre compared with
   its training calls, and - for deployed adapters - the primary metric on the fresh calls, scored by
   ``evaluate.evaluate_calls`` (the code path ``slmigrate evaluate`` runs on the test split);
5. retrain, warm-started from the current adapter, where the metric fell under the threshold or the cluster's
   data grew by ``grow_ratio``; the adapter it replaces is kept under ``adapters/<cluster>/.versions/`` with its
   evaluation and the reason for the new one.

The settings are the workspace's own (``config.workspace_config``) unless the caller passes a config.
``dry_run`` stops after the plan. The plan is returned (and printed by the CLI); an unchanged workspace gives
"nothing to do".
"""

from __future__ import annotations

import json
import shutil
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from slmigrate.chat_format import message_text
from slmigrate.config import Config
from slmigrate.errors import SlmigrateError
from slmigrate.record import CallRecord
from slmigrate.workspace import Workspace

SHARE_DRIFT = 0.10  # absolute change in a cluster's share of traffic that counts as drift
DISTANCE_DRIFT = 1.5  # new calls this many times farther from the centre than the training calls
GROW_RATIO = 0.5  # retrain when new calls reach this share of the cluster's training calls
FRESH_EVAL_LIMIT = 32  # fresh calls per deployed cluster to re-evaluate on


def _baseline_seq(ws: Workspace) -> int:
    last = ws.manifest("refine")
    if last is not None:
        return int(last.get("last_seq", 0))
    curate = ws.manifest("curate")
    if curate is None:
        raise SlmigrateError(f"nothing to refine in {ws.root}: run the pipeline first (`slmigrate run`, or curate, "
                             "cluster, finetune and evaluate)")
    # The store fingerprint curate saw is "count:last insert batch:max id".
    return int(str(curate.get("store_fingerprint", "0:0:")).split(":")[1] or 0)


def _answered_by_slm(call: CallRecord) -> bool:
    return ((call.metadata or {}).get("route") or {}).get("answered_by") == "slm"


def new_calls(ws: Workspace, since_seq: int) -> tuple[list[CallRecord], int]:
    calls = list(ws.store.iter_calls(since_seq=since_seq))
    learnable = [c for c in calls if not _answered_by_slm(c)]
    return learnable, len(calls) - len(learnable)


def curate_new(calls: list[CallRecord], config: Config) -> tuple[list[CallRecord], Counter]:
    """The new calls through curate's own filters, de-duplication and PII scrubbing (``curate.curate_calls``)."""
    from slmigrate.curate import curate_calls

    return curate_calls(calls, config.curate)


def _distances(model: Any, calls: Sequence[CallRecord], ids: Sequence[str | None]) -> dict[str, list[float]]:
    """Per cluster, each call's distance to the cluster centre divided by the cluster radius."""
    out: dict[str, list[float]] = defaultdict(list)
    rows = [i for i, cid in enumerate(ids) if cid is not None]
    if not rows:
        return out
    x = model.vectors([calls[i] for i in rows])
    index = {cid: k for k, cid in enumerate(model.ids)}
    for j, i in enumerate(rows):
        k = index[ids[i]]
        d = float(np.linalg.norm(x[j].astype(np.float64) - model.centroids[k].astype(np.float64)))
        out[ids[i]].append(d / max(float(model.radius[k]), 1e-9))
    return out


def propose_clusters(model: Any, pool: Sequence[CallRecord], config: Config) -> list[dict[str, Any]]:
    """Recurring tasks among calls no cluster claims: the cluster stage's own clustering (``cluster.cluster_calls``
    with the workspace's [cluster] settings and the saved model's embedder), run on the pool."""
    if len(pool) < config.cluster.min_size:
        return []
    from slmigrate.cluster import cluster_calls

    body, _, _, _ = cluster_calls(pool, config.cluster, config.prices, embedder=model.embedder)
    by_id = {c.id: c for c in pool}
    proposals = []
    for found in body["clusters"]:
        if found.get("source") != "clustered":
            continue  # a user's task tag is their own cluster already, not a discovery
        rep = (found.get("representative") or {}).get("id")
        example = by_id.get(rep) or pool[0]
        last_user = next((m for m in reversed(example.messages) if m.get("role") == "user"), None)
        proposals.append({"size": int(found["size"]), "label": found.get("label"), "output_kind":
                          found.get("output_kind"), "example_call": example.id,
                          "example": message_text(last_user)[:160]})
    return proposals


def fresh_metric(ws: Workspace, deployment: Any, calls: Sequence[CallRecord], config: Config) -> float | None:
    """The deployed adapter's primary metric on fresh calls: ``evaluate.evaluate_calls``, the scoring
    ``slmigrate evaluate`` gives the test split, on up to ``FRESH_EVAL_LIMIT`` of them."""
    from slmigrate.evaluate import evaluate_calls

    sample = [c for c in calls if c.answer is not None][:FRESH_EVAL_LIMIT]
    if not sample:
        return None
    result = evaluate_calls(ws, deployment.cluster, sample, config.evaluate, variants=("finetuned",),
                            prices=config.prices, model=Path(deployment.adapter).name)
    return (result["variants"].get("finetuned") or {}).get("primary")


def plan_refine(ws: Workspace, config: Config, *,
                metric_fn: Callable[[Any, Sequence[CallRecord]], float | None] | None = None,
                cluster_model: Any = None) -> dict[str, Any]:
    """Everything refine would do, without changing anything."""
    from slmigrate.cluster.model import ClusterModel
    from slmigrate.serve.deployment import load_deployments

    since = _baseline_seq(ws)
    calls, by_slm = new_calls(ws, since)
    last_seq = ws.store.max_seq()
    plan: dict[str, Any] = {"since_seq": since, "last_seq": last_seq, "new_calls": len(calls) + by_slm,
                            "answered_by_slm": by_slm, "actions": [], "clusters": {}, "proposed": []}
    if not calls:
        plan.update(nothing_to_do=True, summary=f"no new LLM-answered calls since the last run "
                                                f"({by_slm} answered by small models)")
        return plan
    curated, dropped = curate_new(calls, config)
    plan.update(curated=len(curated), dropped=dict(dropped))
    model = cluster_model or ClusterModel.load(ws)
    known = {c["id"]: c for c in ws.clusters()}
    ids = model.assign_many(curated)
    new_by = defaultdict(list)
    for call, cid in zip(curated, ids):
        new_by[cid].append(call)
    pool = new_by.pop(None, [])
    plan["unassigned"] = len(pool)
    new_dist = _distances(model, curated, ids)

    # Training-time distances of each cluster, from a sample of its curated calls, as the drift baseline.
    from slmigrate.curate.dataset import load_curated

    old = load_curated(ws, "train")
    old_ids = ws.store.clusters_of([c.id for c in old])
    sample: dict[str, list[CallRecord]] = defaultdict(list)
    for c in old:
        cid = old_ids.get(c.id)
        if cid in new_dist and len(sample[cid]) < 64:
            sample[cid].append(c)
    flat = [c for cs in sample.values() for c in cs]
    old_dist = _distances(model, flat, [old_ids.get(c.id) for c in flat])
    train_size = Counter(cid for cid in old_ids.values() if cid)

    deployments = {}
    try:
        deployments = {d.cluster: d for d in load_deployments(ws)}
    except SlmigrateError:
        pass  # not evaluated yet: nothing deployed to re-check
    from slmigrate.serve.guard import demotions

    demoted = demotions(ws)  # tasks the router's live guard took back from the small model
    total_new = len(curated)
    for cid in sorted(set(new_by) | set(deployments) | set(demoted)):
        fresh = new_by.get(cid, [])
        info = known.get(cid, {})
        old_share = float(info.get("share") or 0.0)
        new_share = len(fresh) / total_new if total_new else 0.0
        far_new = float(np.mean(new_dist[cid])) if new_dist.get(cid) else None
        far_old = float(np.mean(old_dist[cid])) if old_dist.get(cid) else None
        entry: dict[str, Any] = {"new_calls": len(fresh), "share_before": round(old_share, 4),
                                 "share_now": round(new_share, 4), "distance_new": far_new, "distance_train": far_old,
                                 "drift": []}
        if abs(new_share - old_share) >= SHARE_DRIFT:
            entry["drift"].append(f"share of traffic {old_share:.0%} -> {new_share:.0%}")
        if far_new is not None and far_old and far_new >= DISTANCE_DRIFT * far_old:
            entry["drift"].append(f"new calls {far_new / far_old:.1f}x farther from the centre than training calls")
        reasons = []
        if cid in deployments and fresh:
            d = deployments[cid]
            metric = (metric_fn or (lambda dep, cs: fresh_metric(ws, dep, cs, config)))(d, fresh)
            threshold = config.evaluate.threshold.get(d.kind, 0.9)
            entry.update(metric=metric, metric_name=d.metric, threshold=threshold, deployed=True)
            plan["actions"].append({"action": "reevaluate", "cluster": cid,
                                    "why": f"{len(fresh)} fresh calls for the deployed adapter"})
            if metric is not None and metric < threshold:
                entry["drift"].append(f"{d.metric} on fresh calls {metric:.3f} < {threshold:.2f}")
                reasons.append(f"{d.metric} fell to {metric:.3f} (threshold {threshold:.2f})")
        if cid in demoted:
            why = demoted[cid].get("reason") or "live agreement fell"
            reasons.append(f"the router's live guard demoted it ({why})")
        if train_size.get(cid) and len(fresh) >= GROW_RATIO * train_size[cid]:
            reasons.append(f"data grew by {len(fresh)} calls ({len(fresh) / train_size[cid]:.0%} of its training set)")
        if reasons and (cid in deployments or ws.path("adapters", cid).exists()):
            plan["actions"].append({"action": "retrain", "cluster": cid, "why": "; ".join(reasons)})
        plan["clusters"][cid] = entry

    plan["proposed"] = propose_clusters(model, pool, config)
    for i, prop in enumerate(plan["proposed"], 1):
        plan["actions"].append({"action": "propose_cluster", "cluster": f"new-{i}",
                                "why": f"{prop['size']} unassigned calls form a recurring task, e.g. "
                                       f"{prop['example']!r}; run `slmigrate curate` and `slmigrate cluster` to "
                                       "adopt it"})
    retrain = [a for a in plan["actions"] if a["action"] == "retrain"]
    plan["nothing_to_do"] = False
    plan["summary"] = (f"{len(calls) + by_slm} new calls ({by_slm} answered by small models), {len(curated)} kept "
                       f"after curation, {len(curated) - len(pool)} assigned to known clusters, {len(pool)} "
                       "unassigned; "
                       f"{len(plan['proposed'])} new cluster(s) proposed, {len(retrain)} to retrain")
    return plan


def refine(ws: Workspace, config: Config | None = None, *, dry_run: bool = False,
           metric_fn: Callable[[Any, Sequence[CallRecord]], float | None] | None = None,
           cluster_model: Any = None) -> dict[str, Any]:
    """Plan, and unless ``dry_run``, carry out the plan: re-curate, retrain warm-started, re-evaluate.

    ``config``: default the workspace's own (``config.workspace_config``: what its stages recorded), never the
    current directory's slmigrate.toml."""
    from slmigrate.config import workspace_config

    config = config or workspace_config(ws)
    started = time.time()
    plan = plan_refine(ws, config, metric_fn=metric_fn, cluster_model=cluster_model)
    plan["dry_run"] = dry_run
    if dry_run:
        return plan
    retrain = [a["cluster"] for a in plan["actions"] if a["action"] == "retrain"]
    if retrain:
        _apply_retraining(ws, config, retrain, {a["cluster"]: a["why"] for a in plan["actions"]
                                                if a["action"] == "retrain"})
        plan["retrained"] = retrain
    ws.write_manifest("refine", fingerprint=str(plan["last_seq"]), config={}, started=started,
                      counts={"new_calls": plan["new_calls"], "retrained": len(retrain),
                              "proposed": len(plan["proposed"])},
                      extra={"last_seq": plan["last_seq"], "summary": plan["summary"]})
    return plan


def _apply_retraining(ws: Workspace, config: Config, clusters: list[str], why: dict[str, str]) -> None:
    """Re-curate (stable splits keep old calls where they were), keep the old adapters, retrain, re-evaluate."""
    from slmigrate.cluster.model import ClusterModel
    from slmigrate.curate.run import curate
    from slmigrate.curate.dataset import load_curated
    from slmigrate.evaluate.run import evaluate, find_adapter
    from slmigrate.finetune import finetune

    curate(ws, config.curate)
    model = ClusterModel.load(ws)
    calls = load_curated(ws)
    known = dict(zip([c.id for c in calls], model.assign_many(calls)))
    ws.store.set_clusters(known)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    previous = {r["cluster"]: r for r in (ws.evaluation() or {"clusters": []})["clusters"]}
    warm = {}
    for cid in clusters:
        current = find_adapter(ws, cid)
        if current is None:
            continue
        keep = ws.path("adapters", cid, ".versions", f"{current.name}-{stamp}")
        keep.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(current, keep)
        (keep / "version.json").write_text(json.dumps({
            "replaced_at": stamp, "replaced_because": why[cid],
            "evaluation": previous.get(cid, {}).get("variants", {}).get("finetuned"),
            "decision": previous.get(cid, {}).get("decision")}, indent=2, default=str))
        warm[cid] = keep
    finetune(ws, config.finetune, clusters=clusters, force=True,
             init_adapters={cid: str(path) for cid, path in warm.items()})
    evaluate(ws, config.evaluate, clusters=clusters)
