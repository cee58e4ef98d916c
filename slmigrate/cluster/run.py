"""``slmigrate cluster``: curated calls in, tasks out (clusters/clusters.json, model.npz, map.png, assignments)."""

from __future__ import annotations

import json
import time
from collections import defaultdict
from typing import Any

import numpy as np

from slmigrate import curated
from slmigrate.cluster.features import WEIGHTS, featurize
from slmigrate.cluster.fit import Fitted, assign_rest, canonical_order, fit_group
from slmigrate.cluster.model import CLUSTERS_FILE, UNKNOWN_AGENT, ClusterModel, learn_signatures, slug, task_tag
from slmigrate.cluster.stats import cluster_stats, keywords
from slmigrate.cluster.views import TaskView, task_view
from slmigrate.config import ClusterConfig, Config, PricesConfig
from slmigrate.embed import Embedder, get_embedder
from slmigrate.errors import SlmigrateError
from slmigrate.progress import progress_bar
from slmigrate.record import CallRecord
from slmigrate.workspace import Workspace, fingerprint_of

SCHEMA_VERSION = 1
# Bump when the task view or the features change, so a re-run does not reuse clusters made the old way.
METHOD_VERSION = "views1-avglink1"
DEFAULT_THRESHOLD = {"coarse": 0.6, "fine": 0.55}


def _groups(calls: list[CallRecord], cfg: ClusterConfig) -> dict[str | None, list[int]]:
    """Which calls are clustered together: all of them, or each agent's own (``--by agent``)."""
    groups: dict[str | None, list[int]] = defaultdict(list)
    for i, call in enumerate(calls):
        if task_tag(call, cfg.task_tag_key) is not None:
            continue
        groups[(call.agent or UNKNOWN_AGENT) if cfg.by == "agent" else None].append(i)
    return dict(sorted(groups.items(), key=lambda kv: (kv[0] is None, kv[0] or "")))


def cluster_calls(calls: list[CallRecord], cfg: ClusterConfig, prices: PricesConfig | None = None, *,
                  embedder: Embedder | None = None, progress: bool = False,
                  ) -> tuple[dict[str, Any], ClusterModel, list[str | None], dict[str, Any]]:
    """Cluster ``calls``; returns (clusters.json body, model, per-call cluster id or None, map data)."""
    prices = prices or PricesConfig()
    embedder = embedder or get_embedder(cfg.embedder)
    weights = WEIGHTS[cfg.granularity]
    threshold = cfg.threshold or DEFAULT_THRESHOLD[cfg.granularity]
    started = time.time()
    views: list[TaskView] = [task_view(c) for c in calls]
    if cfg.engine != "local" or (cfg.workers or 1) > 1:
        embed_on_engine([views[i] for idx in _groups(calls, cfg).values() for i in idx], embedder, cfg, progress)
    assignment: list[str | None] = [None] * len(calls)
    ids: list[str] = []
    groups_of: list[str | None] = []
    members: dict[str, list[int]] = {}
    fits: list[tuple[str | None, Fitted, list[str]]] = []
    layout = None
    map_rows: list[np.ndarray] = []
    map_labels: list[str | None] = []
    map_counts: list[int] = []

    for group, idx in _groups(calls, cfg).items():
        # Distinct views of this group, in a canonical order, with how many calls share each.
        distinct: dict[TaskView, list[int]] = {}
        for i in idx:
            distinct.setdefault(views[i], []).append(i)
        keys = list(distinct)
        order = canonical_order([repr(v) for v in keys])
        keys = [keys[j] for j in order]
        fit_keys, rest_keys = keys[:cfg.max_points], keys[cfg.max_points:]
        x, layout = featurize(fit_keys, embedder, weights, progress=progress)
        counts = np.array([len(distinct[v]) for v in fit_keys], dtype=np.float64)
        fitted = fit_group(x, counts, threshold=threshold, core_ratio=cfg.core_ratio, min_size=cfg.min_size,
                           request_mask=layout.request_mask())
        prefix = "" if group is None else slug(group) + "-"
        names = [f"{prefix}c{n + 1:02d}" for n in range(len(fitted.centroids))]
        ids.extend(names)
        groups_of.extend([group] * len(names))
        fits.append((group, fitted, names))
        labels: list[int] = fitted.labels.tolist()
        if rest_keys:
            # Views beyond max_points: embedded (each distinct text once) and sent to the nearest centroid.
            for start in range(0, len(rest_keys), 20_000):
                chunk = rest_keys[start:start + 20_000]
                xr, _ = featurize(chunk, embedder, weights, progress=progress)
                labels.extend(assign_rest(xr, fitted, threshold=threshold, core_ratio=cfg.core_ratio).tolist())
        for view, label in zip(keys, labels):
            name = names[label] if label >= 0 else None
            for i in distinct[view]:
                assignment[i] = name
        map_rows.append(x)
        map_labels.extend(names[lb] if lb >= 0 else None for lb in fitted.labels.tolist())
        map_counts.extend(counts.astype(int).tolist())

    # A user's own task tags are honoured as given: each tag is a cluster, never re-clustered.
    tagged: dict[str, str] = {}
    for i, call in enumerate(calls):
        tag = task_tag(call, cfg.task_tag_key)
        if tag is not None:
            cid = tagged.setdefault(tag, "task-" + slug(tag))
            assignment[i] = cid
    for cid, name in enumerate(assignment):
        if name is not None:
            members.setdefault(name, []).append(cid)

    if layout is None:  # every call was tagged (or there were none): an empty model still assigns tags
        _, layout = featurize([], embedder, weights)
    width = layout.width
    centroids = np.concatenate([f.centroids for _, f, _ in fits]) if fits else np.zeros((0, width), np.float32)
    radius = np.concatenate([f.radius for _, f, _ in fits]) if fits else np.zeros(0)
    request_radius = np.concatenate([f.request_radius for _, f, _ in fits]) if fits else np.zeros(0)
    model = ClusterModel(ids=ids, groups=groups_of, centroids=centroids, radius=radius,
                         request_radius=request_radius, layout=layout, embedder_name=embedder.name, by=cfg.by,
                         task_tag_key=cfg.task_tag_key, tagged=tagged, _embedder=embedder)
    model.signatures = learn_signatures(model, calls, assignment, cfg.min_size)  # the router's fast path

    body = _summary(calls, views, members, assignment, model, cfg, prices, threshold, embedder)
    body["duration_s"] = round(time.time() - started, 3)
    map_data = {"x": np.concatenate(map_rows) if map_rows else np.zeros((0, width)), "labels": map_labels,
                "counts": map_counts}
    return body, model, assignment, map_data


def _embed_pass(embedder: Embedder):
    """One engine worker's embedding pass: the driver's embedder, loaded once per worker."""
    return lambda texts: list(embedder.encode(texts))


def embed_on_engine(views: list[TaskView], embedder: Embedder, cfg: ClusterConfig, progress: bool = False) -> None:
    """Embed every distinct text that ``featurize`` will ask for on ``cfg.engine`` and put the vectors in the
    embedder's cache; the fit, which depends on order, then runs here unchanged."""
    import functools

    from slmigrate import engines

    distinct = list(dict.fromkeys(views))
    texts = dict.fromkeys(c for v in distinct for c in v.system_chunks)
    for part in ("tools", "answer", "turn"):
        texts.update(dict.fromkeys(getattr(v, part) for v in distinct))
    # Shortest first, as the embedder batches: little padding per batch.
    todo = sorted(embedder.missing(list(texts)), key=len)
    with progress_bar(progress, f"embedding ({cfg.engine})", len(todo)) as advance:
        vectors = engines.map_batches(todo, functools.partial(_embed_pass, embedder), engine=cfg.engine,
                                      workers=cfg.workers, address=cfg.ray_address, batch_size=64,
                                      progress=advance)
    embedder.prime(todo, vectors)


def _summary(calls, views, members, assignment, model: ClusterModel, cfg: ClusterConfig, prices: PricesConfig,
             threshold: float, embedder: Embedder) -> dict[str, Any]:
    total = len(calls)
    costs = [prices.cost(c.model, c.prompt_tokens, c.completion_tokens) for c in calls]
    total_cost = float(sum(costs))
    order = sorted(members, key=lambda c: (-len(members[c]), c))
    # Keywords: one document per cluster made of its distinct views (at most 2000): a view repeated a thousand
    # times would otherwise swamp the term counts and cost time on large logs without changing the top words.
    docs = [" ".join(list(dict.fromkeys(views[i].text() for i in members[c]))[:2000]) for c in order]
    words = keywords(docs)
    centroid_of = {cid: i for i, cid in enumerate(model.ids)}
    clusters = []
    for cid, kw in zip(order, words):
        idx = members[cid]
        rep = idx[0]
        if cid in centroid_of:  # the member nearest its centroid represents the cluster
            x = model.vectors([calls[i] for i in idx[:2000]])
            rep = idx[int(((x - model.centroids[centroid_of[cid]]) ** 2).sum(1).argmin())]
        group = model.groups[centroid_of[cid]] if cid in centroid_of else None
        stats = cluster_stats(cid, idx, calls, views, prices, total, total_cost, rep, cfg.replaceable_at, group,
                              "clustered" if cid in centroid_of else "task_tag")
        stats["keywords"] = kw
        stats["label"] = ", ".join(kw[:3]) if kw else cid
        if cid in centroid_of:
            stats["radius"] = round(float(model.radius[centroid_of[cid]]), 4)
        clusters.append(stats)
    unclustered = [i for i, a in enumerate(assignment) if a is None]
    replaceable = [c for c in clusters if c["likely_replaceable"]]
    rep_cost = sum(c["cost_usd"] for c in replaceable)
    return {
        "schema_version": SCHEMA_VERSION,
        "method": {"version": METHOD_VERSION, "granularity": cfg.granularity, "threshold": threshold,
                   "core_ratio": cfg.core_ratio, "min_size": cfg.min_size, "by": cfg.by,
                   "embedder": embedder.name, "weights": model.layout.weights},
        "calls": total,
        "clustered_calls": total - len(unclustered),
        "cost_usd": round(total_cost, 6),
        "unclustered": {"size": len(unclustered), "share": round(len(unclustered) / max(total, 1), 4),
                        "cost_usd": round(sum(costs[i] for i in unclustered), 6),
                        "examples": [calls[i].id for i in unclustered[:5]]},
        "overall": {
            "replaceable_clusters": [c["id"] for c in replaceable],
            "call_share": round(sum(c["size"] for c in replaceable) / max(total, 1), 4),
            "cost_share": round(rep_cost / total_cost, 4) if total_cost > 0 else 0.0,
            "cost_usd": round(rep_cost, 6),
        },
        "clusters": clusters,
    }


def draw_map(path, map_data: dict[str, Any], title: str) -> None:
    """A 2-D PCA projection of the distinct task views, coloured by cluster (grey: unclustered)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.decomposition import PCA

    x = map_data["x"]
    fig, ax = plt.subplots(figsize=(8, 6), dpi=110)
    if len(x) >= 2:
        xy = PCA(n_components=2, random_state=0).fit_transform(x.astype(np.float64))
        labels = map_data["labels"]
        sizes = 8 + 6 * np.log1p(np.array(map_data["counts"], dtype=float))
        none = np.array([lb is None for lb in labels])
        ax.scatter(xy[none, 0], xy[none, 1], s=sizes[none], c="lightgrey", label="unclustered", alpha=0.6)
        names = list(dict.fromkeys(lb for lb in labels if lb is not None))
        cmap = plt.get_cmap("tab20")
        for n, name in enumerate(names):
            rows = np.array([lb == name for lb in labels])
            ax.scatter(xy[rows, 0], xy[rows, 1], s=sizes[rows], color=cmap(n % 20), alpha=0.75,
                       label=name if n < 20 else None)
        ax.legend(fontsize=7, markerscale=0.8, loc="best", ncol=2)
    ax.set_title(title)
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _trim_request(request: dict[str, Any], shared: dict[str, Any]) -> dict[str, Any]:
    """The parts of a request that clustering reads (leading system messages, the latest user/tool turn, tools,
    response_format), with repeated system prompts and tool lists shared between calls instead of copied."""
    messages = request.get("messages") or []
    lead = []
    for message in messages:
        if not isinstance(message, dict) or message.get("role") not in ("system", "developer"):
            break
        lead.append(message)
    turns = (m for m in reversed(messages) if isinstance(m, dict) and m.get("role") in ("user", "tool", "function"))
    turn = next(turns, None)
    out: dict[str, Any] = {"messages": [_shared(m, shared) for m in lead] + ([turn] if turn is not None else [])}
    for key in ("tools", "functions", "response_format"):
        if request.get(key):
            out[key] = _shared(request[key], shared)
    return out


def _shared(value: Any, shared: dict[Any, Any]) -> Any:
    if isinstance(value, dict) and isinstance(value.get("content"), str) and len(value) == 2:
        key: Any = (value.get("role"), value["content"])  # a plain message: cheaper than dumping it
    else:
        key = json.dumps(value, sort_keys=True, ensure_ascii=False)
    return shared.setdefault(key, value)


def load_compact(ws: Workspace, task_tag_key: str | None = None, batch: int = 2000) -> list[curated.CuratedCall]:
    """The curated calls trimmed to what clustering reads, read from the dataset ``batch`` rows at a time.

    A full call (whole history, every message, usage, metadata) costs several KB as Python objects; a million of
    them would not fit in memory. Trimmed, a call keeps its id, model, agent, token counts, task tag, its latest
    turn and its answer, and shares its system prompt and tool list with every call that has the same ones.
    """
    ds = curated.load_dataset(ws).select_columns(["id", "agent", "model", "prompt_tokens", "completion_tokens",
                                                  "request", "response", "metadata"])
    shared: dict[str, Any] = {}
    out: list[curated.CuratedCall] = []
    for part in ds.iter(batch_size=batch):
        for i in range(len(part["id"])):
            response = json.loads(part["response"][i]) or {}
            choices = response.get("choices") or []
            metadata = json.loads(part["metadata"][i] or "{}")
            tag = {task_tag_key: metadata[task_tag_key]} if task_tag_key and task_tag_key in metadata else {}
            out.append(curated.CuratedCall(
                request=_trim_request(json.loads(part["request"][i]), shared),
                response={"choices": [{"message": c.get("message"), "finish_reason": c.get("finish_reason")}
                                      for c in choices[:1]]} if choices else response,
                id=part["id"][i], agent=part["agent"][i], model=part["model"][i],
                prompt_tokens=part["prompt_tokens"][i], completion_tokens=part["completion_tokens"][i],
                metadata=tag))
    return out


def cluster(ws: Workspace, config: Config | None = None, *, embedder: Embedder | None = None, force: bool = False,
            progress: bool = True) -> dict[str, Any]:
    """Cluster the workspace's curated calls; skipped when the curated data and config are unchanged."""
    config = config or Config()
    cfg = config.cluster
    from slmigrate import engines

    engines.check_engine(cfg.engine, cfg.ray_address)
    if cfg.engine == "ray":
        engines.require_ray()
    version = curated.current_version(ws)
    if version is None:
        raise SlmigrateError(f"no curated data in {ws.root}; run `slmigrate curate` first, then `slmigrate cluster`")
    # Engine and worker count change speed, not clusters.
    settings = cfg.model_dump(exclude={"engine", "ray_address", "workers"})
    fingerprint = fingerprint_of(version, settings, config.prices.model_dump(), METHOD_VERSION,
                                 embedder.name if embedder else cfg.embedder)
    out = ws.path("clusters")
    if not force and ws.is_fresh("cluster", fingerprint) and (out / CLUSTERS_FILE).exists():
        body = json.loads((out / CLUSTERS_FILE).read_text())
        body["skipped"] = True
        return body
    started = time.time()
    calls = load_compact(ws, cfg.task_tag_key)
    if not calls:
        raise SlmigrateError(f"the curated dataset {version} in {ws.root} is empty; collect and curate calls first")
    body, model, assignment, map_data = cluster_calls(calls, cfg, config.prices, embedder=embedder,
                                                      progress=progress)
    body["curated_version"] = version
    out.mkdir(parents=True, exist_ok=True)
    model.save(out)
    if cfg.map:
        draw_map(out / "map.png", map_data, f"{len(body['clusters'])} clusters of {len(calls)} calls "
                                            f"({cfg.granularity})")
        body["map"] = str(out / "map.png")
    (out / "config.json").write_text(json.dumps(cfg.model_dump(), indent=2))
    tmp = out / (".tmp-" + CLUSTERS_FILE)
    tmp.write_text(json.dumps(body, indent=2, ensure_ascii=False))
    tmp.replace(out / CLUSTERS_FILE)
    ws.store.set_clusters({c.id: a for c, a in zip(calls, assignment)})
    ws.write_manifest("cluster", fingerprint=fingerprint, config=cfg.model_dump(), started=started,
                      counts={"calls": len(calls), "clusters": len(body["clusters"]),
                              "unclustered": body["unclustered"]["size"]},
                      extra={"curated_version": version})
    body["skipped"] = False
    return body
