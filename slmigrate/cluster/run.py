"""``slmigrate cluster``: curated calls in, tasks out (clusters/clusters.json, model.npz, map.png, assignments)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from slmigrate import artifacts, engines
from slmigrate.curate import dataset as curated
from slmigrate.cluster.calltable import GROUP, TAG, CallTable
from slmigrate.cluster.features import WEIGHTS, Layout, featurize
from slmigrate.cluster.fit import Fitted, assign_rest, fit_parts, nearest, split_dominant
from slmigrate.cluster.model import ClusterModel, signature_table, slug
from slmigrate.cluster.stats import cluster_stats, keywords
from slmigrate.cluster.views import OUTPUT_KINDS, TaskView
from slmigrate.config import ClusterConfig, Config, PricesConfig
from slmigrate.cluster.embed import Embedder, get_embedder
from slmigrate.errors import SlmigrateError
from slmigrate.progress import Progress, counter
from slmigrate.results import StageOutput
from slmigrate.record import CallRecord
from slmigrate.workspace import Workspace, fingerprint_of

SCHEMA_VERSION = 1
# Bump when the task view or the features change, so a re-run does not reuse clusters made the old way.
METHOD_VERSION = "views3-templates2"  # views3: instructions from the leading user turn; templates2: a template
# with slots is one coarse task
DEFAULT_THRESHOLD = {"coarse": 0.6, "fine": 0.55}
# A task holding more than this share of its group's calls is split into its steps (and reported when it stays).
DOMINANT_SHARE = 0.5


def cluster_calls(calls: Iterable[CallRecord], cfg: ClusterConfig, prices: PricesConfig | None = None, *,
                  embedder: Embedder | None = None, progress: Progress | None = None, total: int | None = None,
                  spill_dir: str | Path | None = None,
                  ) -> tuple[dict[str, Any], ClusterModel, list[str | None], dict[str, Any]]:
    """Cluster ``calls`` (any iterable: they are read once, one at a time, and not kept); returns (clusters.json
    body, model, per-call cluster id or None in input order, map data). ``total``: how many calls, for the bar."""
    prices = prices or PricesConfig()
    started = time.time()
    with CallTable(by=cfg.by, task_tag_key=cfg.task_tag_key, prices=prices, spill_dir=spill_dir) as table:
        advance = counter(progress if total is not None else None, "reading calls", total or 0)
        for call in calls:
            table.add(call)
            advance(1)
        result = _cluster_table(table.finish(), cfg, embedder or get_embedder(cfg.embedder), progress)
    result[0]["duration_s"] = round(time.time() - started, 3)
    return result


@dataclass
class _Group:
    """One clustering group (all calls, or one agent's) and its fit."""

    index: int  # in table.groups
    name: str | None
    fitted: Fitted
    offset: int  # its first cluster's index in the model


@dataclass
class _Fits:
    """Step 1's result: the groups' fits, and what they decided for the rows of their samples."""

    groups: list[_Group]
    names: list[str]  # cluster ids, in model order (tag clusters are appended later)
    row_label: np.ndarray  # per row: index into names, -1 unclustered (or not decided yet)
    sampled: np.ndarray  # per row: in a fit sample
    layout: Layout | None
    map_data: dict[str, Any]
    titles: list[str] = field(default_factory=list)  # per cluster: its template's name (and step), or ""
    split: list[int] = field(default_factory=list)  # clusters made by splitting a dominant task into steps


def _cluster_table(table: CallTable, cfg: ClusterConfig, embedder: Embedder,
                   progress: Progress | None) -> tuple[dict[str, Any], ClusterModel, list[str | None], dict[str, Any]]:
    weights = WEIGHTS[cfg.granularity]
    threshold = cfg.threshold or DEFAULT_THRESHOLD[cfg.granularity]
    fits = _fit_samples(table, cfg, embedder, weights, threshold, progress)
    layout = fits.layout or featurize([], embedder, weights)[1]  # no group (all tagged): the model still has one
    fitted = [grp.fitted for grp in fits.groups]
    model = ClusterModel(
        ids=list(fits.names), groups=[grp.name for grp in fits.groups for _ in grp.fitted.centroids],
        centroids=np.concatenate([f.centroids for f in fitted]) if fitted else np.zeros((0, layout.width),
                                                                                         np.float32),
        radius=np.concatenate([f.radius for f in fitted]) if fitted else np.zeros(0),
        request_radius=np.concatenate([f.request_radius for f in fitted]) if fitted else np.zeros(0),
        layout=layout, embedder_name=embedder.name, by=cfg.by, task_tag_key=cfg.task_tag_key, tagged={},
        _embedder=embedder)
    names, row_label = fits.names, fits.row_label
    # A user's own task tags are honoured as given: each tag is a cluster, never re-clustered.
    for g, (kind, tag) in enumerate(table.groups.values):
        if kind == TAG:
            cid = model.tagged.setdefault(tag, "task-" + slug(tag))
            if cid not in names:
                names.append(cid)
            row_label[table.row_group == g] = names.index(cid)
    reading = _assign_rows(table, fits, model, cfg, embedder, threshold, progress)
    reading.titles, reading.split = fits.titles, set(fits.split)

    call_label = row_label[table.call_row]
    call_tagged = table.groups_are_tags()[table.row_group[table.call_row]]
    model.signatures = signature_table(  # the router's fast path
        model, table.signatures.values, table.call_sig, table.row_turn[table.call_row],
        np.where(call_label < len(model.ids), call_label, -2), call_tagged, cfg.min_size,
        lambda calls: reading.request_label[table.call_row[calls]])
    body = _summary(table, call_label, names, reading, model, cfg, threshold, embedder)
    assignment = np.array(names + [None], dtype=object)[call_label].tolist()  # -1 -> None
    return body, model, assignment, fits.map_data


def _fit_samples(table: CallTable, cfg: ClusterConfig, embedder: Embedder, weights: dict[str, float],
                 threshold: float, progress: Progress | None) -> _Fits:
    """Step 1: fit each group on a sample, its ``max_points`` distinct views with the smallest content hashes,
    which depends only on the content (shuffled input, same clusters) and is every view when they are few."""
    calls_per_row = np.bincount(table.call_row, minlength=table.n_rows)
    named = sorted(((g, name) for g, (kind, name) in enumerate(table.groups.values) if kind == GROUP),
                   key=lambda gn: (gn[1] is None, gn[1] or ""))
    samples = {}
    for g, _ in named:
        rows = np.flatnonzero(table.row_group == g)
        samples[g] = rows[np.argsort(table.row_hash[rows], kind="stable")][:cfg.max_points]
    views = table.views_of(np.concatenate(list(samples.values()))) if samples else {}
    if _on_engine(cfg, embedder):
        embed_on_engine(list(views.values()), embedder, cfg, progress)
    fits = _Fits([], [], np.full(table.n_rows, -1, dtype=np.int64), np.zeros(table.n_rows, dtype=bool), None, {})
    map_rows: list[np.ndarray] = []
    map_labels: list[str | None] = []
    map_counts: list[int] = []
    text_template, templates = table.templates.fit(cfg.min_size)
    row_template = np.array(text_template, dtype=np.int64)[table.row_instr] if table.n_rows else \
        np.zeros(0, np.int64)
    for g, name in named:
        rows = samples[g]
        fits.sampled[rows] = True
        group_views = [views[r] for r in rows.tolist()]
        x, fits.layout = featurize(group_views, embedder, weights, progress=progress)
        counts = calls_per_row[rows].astype(np.float64)
        parts, part_title, fixed = _template_parts(table, g, rows, row_template, templates, calls_per_row,
                                                   cfg.min_size)
        fitted, part_of = fit_parts(x, counts, parts, threshold=threshold, core_ratio=cfg.core_ratio,
                                    min_size=cfg.min_size, request_mask=fits.layout.request_mask(), filtered=fixed,
                                    refine=cfg.granularity == "fine")
        titles = [part_title.get(p, "") for p in part_of]
        largest = max((counts[fitted.labels == i].sum() for i in range(len(fitted.centroids))), default=0.0)
        if counts.sum() >= 2 * cfg.min_size and largest > DOMINANT_SHARE * counts.sum():
            # One task holds most calls (one agent prompt doing everything): split it into its steps.
            x_fine, _ = featurize(group_views, embedder, WEIGHTS["fine"])
            steps = np.where(table.row_tool[rows] >= 0, table.row_tool[rows], -1 - table.row_kind[rows].astype(int))
            fitted, parent, step_of = split_dominant(
                x, x_fine, counts, fitted, steps, share=DOMINANT_SHARE, threshold=DEFAULT_THRESHOLD["fine"],
                min_size=cfg.min_size, request_mask=fits.layout.request_mask())
            titles = [_step_title(titles[p], s, table) for p, s in zip(parent, step_of)]
            fits.split.extend(len(fits.names) + n for n, s in enumerate(step_of) if s is not None)
        fits.groups.append(_Group(g, name, fitted, len(fits.names)))
        fits.row_label[rows] = np.where(fitted.labels >= 0, fitted.labels + len(fits.names), -1)
        prefix = "" if name is None else slug(name) + "-"
        local = [f"{prefix}c{n + 1:02d}" for n in range(len(fitted.centroids))]
        fits.names.extend(local)
        fits.titles.extend(titles)
        map_rows.append(x)
        map_labels.extend(local[lb] if lb >= 0 else None for lb in fitted.labels.tolist())
        map_counts.extend(counts.astype(int).tolist())
    width = fits.layout.width if fits.layout else 0
    fits.map_data = {"x": np.concatenate(map_rows) if map_rows else np.zeros((0, width)), "labels": map_labels,
                     "counts": map_counts}
    return fits


_STEP_NAMES = {"json": "JSON answer", "label": "label answer", "text": "reply"}


def _template_parts(table: CallTable, group: int, rows: np.ndarray, row_template: np.ndarray, templates: list,
                    calls_per_row: np.ndarray, min_size: int) -> tuple[np.ndarray, dict[int, str], frozenset[int]]:
    """Per sampled row its part - one (instruction template, tool list) pair, or -1 for the rows without a
    template of at least ``min_size`` calls in the group, which the embedding alone clusters - each part's
    title (the template's name), and the parts whose template is one fixed text (no slots)."""
    mine = np.flatnonzero(table.row_group == group)
    template_calls = np.bincount(row_template[mine], weights=calls_per_row[mine], minlength=len(templates))
    usable = np.array([not t.residual and template_calls[t.id] >= min_size for t in templates], dtype=bool)
    keys: dict[tuple[int, int], int] = {}
    titles: dict[int, str] = {}
    fixed = set()
    parts = np.full(len(rows), -1, dtype=np.int64)
    for j, (t, tools) in enumerate(zip(row_template[rows].tolist(), table.row_tools[rows].tolist())):
        if usable[t]:
            parts[j] = keys.setdefault((t, tools), len(keys))
            titles[int(parts[j])] = templates[t].name
            if len(templates[t].texts) < 2:
                fixed.add(int(parts[j]))
    return parts, titles, frozenset(fixed)


def _step_title(title: str, step: int | None, table: CallTable) -> str:
    if step is None:
        return title
    what = ("calls " + table.tools.values[step]) if step >= 0 else _STEP_NAMES.get(OUTPUT_KINDS[-1 - step], "reply")
    return f"{title} · {what}" if title else what


def _assign_rows(table: CallTable, fits: _Fits, model: ClusterModel, cfg: ClusterConfig, embedder: Embedder,
                 threshold: float, progress: Progress | None) -> _RowPass:
    """Step 2, every row a chunk at a time: the views outside the samples go to the nearest centroid; each row's
    distance to its centroid (the representative), the cluster the router's request path would pick (the
    fast-path check), the keyword documents and the unclustered examples."""
    reading = _RowPass(table.n_rows, len(fits.names), model.layout.request_mask())
    by_group = {grp.index: grp for grp in fits.groups}
    advance = counter(progress, "assigning task views", table.n_rows)
    for start, views, first_ids in table.iter_rows():
        rows = np.arange(start, start + len(views))
        if _on_engine(cfg, embedder):
            embed_on_engine([v for r, v in zip(rows.tolist(), views) if table.row_group[r] in by_group],
                            embedder, cfg)
        for g in np.unique(table.row_group[rows]).tolist():
            if g in by_group:
                mine = rows[table.row_group[rows] == g]
                reading.place(by_group[g], mine, [views[r - start] for r in mine.tolist()], model,
                              fits.row_label, fits.sampled, embedder, threshold, cfg.core_ratio)
        reading.collect(rows, views, first_ids, fits.row_label)
        advance(len(views))
    return reading


class _RowPass:
    """What the pass over the rows gathers, per row and per cluster."""

    def __init__(self, n_rows: int, n_clusters: int, request_mask: np.ndarray) -> None:
        self.request_mask = request_mask
        self.request_label = np.full(n_rows, -1, dtype=np.int64)  # per row: the request path's cluster
        self.distance: dict[int, float] = {}  # cluster -> distance of its representative so far
        self.representative: dict[int, tuple[str, str]] = {}  # cluster -> (call id, view text)
        self.docs: list[dict[str, None]] = [{} for _ in range(n_clusters)]
        self.unclustered_examples: list[str] = []
        self._row_distance: dict[int, float] = {}
        self.titles: list[str] = []  # per cluster: its template's name (and step), or ""
        self.split: set[int] = set()  # clusters made by splitting a dominant task into its steps

    def place(self, group: _Group, rows: np.ndarray, views: list[TaskView], model: ClusterModel,
              row_label: np.ndarray, sampled: np.ndarray, embedder: Embedder, threshold: float,
              core_ratio: float) -> None:
        """Label a group's rows (those outside the fit sample: nearest centroid within reach), and note their
        distances to their centroid and the cluster their request alone would be routed to."""
        x, _ = featurize(views, embedder, model.layout.weights)
        rest = ~sampled[rows]
        if rest.any():
            local = assign_rest(x[rest], group.fitted, threshold=threshold, core_ratio=core_ratio)
            row_label[rows[rest]] = np.where(local >= 0, local + group.offset, -1)
        labels = row_label[rows]
        has = labels >= 0
        distance = np.linalg.norm(x[has] - model.centroids[labels[has]], axis=1)
        self._row_distance.update(zip(rows[has].tolist(), distance.tolist()))
        candidates = model.candidates(group.name)
        if len(candidates):
            hit = nearest(x, model.centroids[candidates], model.request_radius[candidates], mask=self.request_mask)
            self.request_label[rows] = np.where(hit >= 0, candidates[np.maximum(hit, 0)], -1)

    def collect(self, rows: np.ndarray, views: list[TaskView], first_ids: list[str], row_label: np.ndarray) -> None:
        """In row order (the order calls first showed each view): keyword texts, representatives, examples."""
        for row, view, first in zip(rows.tolist(), views, first_ids):
            label = int(row_label[row])
            if label < 0:
                if len(self.unclustered_examples) < 5:
                    self.unclustered_examples.append(first)
                continue
            # Keywords: one document per cluster of its first 2000 distinct view texts: a view repeated a
            # thousand times would otherwise swamp the term counts without changing the top words.
            if len(self.docs[label]) < 2000:
                self.docs[label][view.text()] = None
            # The representative: the view nearest the centroid (a tag's cluster: its first call).
            distance = self._row_distance.pop(row, 0.0)
            if label not in self.distance or distance < self.distance[label]:
                self.distance[label] = distance
                self.representative[label] = (first, view.text())


# With no --workers, the local engine embeds in one single-threaded process per core once there are this many
# texts: each worker first spends ~10 s loading torch and the model. On a quiet 2-core box that about evens out
# with one process using both cores through torch's threads (tau2: 88 s vs 82 s), but when other work takes CPU
# time the threaded run degrades far more (tau2: 103 s vs ~150 s), so processes are the safer default
# (docs/benchmarks.md).
PARALLEL_MIN_TEXTS = 1000


def _on_engine(cfg: ClusterConfig, embedder: Embedder) -> bool:
    """Whether the embedding pass goes through ``embed_on_engine``: on Ray, on --workers processes, or - no
    --workers, a costly embedder, several cores - on processes if the pass turns out large enough."""
    if cfg.engine != "local" or (cfg.workers or 1) > 1:
        return True
    return cfg.workers is None and embedder.worth_workers and engines.usable_cpus() > 1


def _embed_pass(embedder: Embedder):
    """One engine worker's embedding pass: the driver's embedder, loaded once per worker."""
    return lambda texts: list(embedder.encode(texts))


def embed_on_engine(views: list[TaskView], embedder: Embedder, cfg: ClusterConfig,
                    progress: Progress | None = None) -> None:
    """Embed every distinct text that ``featurize`` will ask for on ``cfg.engine`` and put the vectors in the
    embedder's cache; the fit, which depends on order, then runs here unchanged."""
    import functools

    distinct = list(dict.fromkeys(views))
    texts = dict.fromkeys(c for v in distinct for c in v.system_chunks)
    for part in ("tools", "answer", "turn"):
        texts.update(dict.fromkeys(getattr(v, part) for v in distinct))
    # Shortest first, as the embedder batches: little padding per batch.
    todo = sorted(embedder.missing(list(texts)), key=len)
    workers = cfg.workers
    if cfg.engine == "local" and workers is None:
        if len(todo) < PARALLEL_MIN_TEXTS:
            return  # featurize embeds them in this process
        workers = engines.usable_cpus()
    vectors = engines.map_batches(todo, functools.partial(_embed_pass, embedder), engine=cfg.engine,
                                  workers=workers, address=cfg.ray_address, batch_size=64,
                                  progress=counter(progress, f"embedding ({cfg.engine})", len(todo)))
    embedder.prime(todo, vectors)


def _summary(table: CallTable, call_label: np.ndarray, names: list[str], reading: _RowPass, model: ClusterModel,
             cfg: ClusterConfig, threshold: float, embedder: Embedder) -> dict[str, Any]:
    total = table.n_calls
    total_cost = float(table.cost.sum())
    by_label = np.argsort(call_label, kind="stable")  # each cluster's calls together, in call order
    bounds = np.searchsorted(call_label[by_label], np.arange(-1, len(names) + 1))
    members = {c: by_label[bounds[c + 1]:bounds[c + 2]] for c in range(len(names)) if bounds[c + 2] > bounds[c + 1]}
    unclustered = by_label[bounds[0]:bounds[1]]
    order = sorted(members, key=lambda c: (-len(members[c]), names[c]))
    words = keywords([" ".join(reading.docs[c]) for c in order])
    clusters = []
    for c, kw in zip(order, words):
        clustered = c < len(model.ids)
        stats = cluster_stats(names[c], members[c], table, total, total_cost, reading.representative[c],
                              cfg.replaceable_at, model.groups[c] if clustered else None,
                              "clustered" if clustered else "task_tag")
        stats["keywords"] = kw
        stats["label"] = ", ".join(kw[:3]) if kw else names[c]
        title = reading.titles[c] if clustered and c < len(reading.titles) else ""
        if title:
            stats["label"] = title
            stats["template"] = title
        if c in reading.split:
            stats["split_from_dominant"] = True
        if clustered:
            stats["radius"] = round(float(model.radius[c]), 4)
        clusters.append(stats)
    _distinct_labels(clusters)
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
        # Examples: the first calls of up to five distinct unclustered task views.
        "unclustered": {"size": len(unclustered), "share": round(len(unclustered) / max(total, 1), 4),
                        "cost_usd": round(float(table.cost[unclustered].sum()), 6),
                        "examples": reading.unclustered_examples},
        "overall": {
            "replaceable_clusters": [c["id"] for c in replaceable],
            "call_share": round(sum(c["size"] for c in replaceable) / max(total, 1), 4),
            "cost_share": round(rep_cost / total_cost, 4) if total_cost > 0 else 0.0,
            "cost_usd": round(rep_cost, 6),
        },
        "clusters": clusters,
        **_dominant_warning(clusters, cfg),
    }


def _distinct_labels(clusters: list[dict[str, Any]]) -> None:
    """Clusters sharing a template name (the embedding split one template) get their top keywords added."""
    same: dict[str, list[dict[str, Any]]] = {}
    for c in clusters:
        same.setdefault(c["label"], []).append(c)
    for label, group in same.items():
        if len(group) < 2:
            continue
        for c in group:
            others = {w for o in group if o is not c for w in o["keywords"][:6]}
            words = [w for w in c["keywords"] if w not in others][:2] or c["keywords"][:2]
            if words:
                c["label"] = f"{label} ({', '.join(words)})"


def _dominant_warning(clusters: list[dict[str, Any]], cfg: ClusterConfig) -> dict[str, Any]:
    """A ``warning`` when one task still holds most of the calls, with what to do."""
    top = max(clusters, key=lambda c: c["share"], default=None)
    if top is None or top["share"] <= DOMINANT_SHARE:
        return {}
    hint = ("try `slmigrate cluster --granularity fine` (one task per step: tool called, JSON, reply) or a "
            "smaller --threshold" if cfg.granularity == "coarse" else "try a smaller --threshold")
    return {"warning": f"one task ({top['id']}, {top['label'][:60]}) holds {top['share']:.0%} of the calls: its "
                       f"calls look alike to the clusterer; {hint}, or tag the calls' tasks (metadata "
                       f"`{cfg.task_tag_key or 'task_tag'}`)"}


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


def iter_compact(ws: Workspace, task_tag_key: str | None = None) -> Iterator[curated.CuratedCall]:
    """The curated calls with what clustering reads (request, first answer, models, token counts, task tag), in
    dataset order, a record batch at a time."""
    columns = ["id", "agent", "model", "prompt_tokens", "completion_tokens", "request", "response", "metadata"]
    for part in curated.iter_batches(ws, columns):
        for i in range(len(part["id"])):
            response = json.loads(part["response"][i]) or {}
            choices = response.get("choices") or []
            metadata = json.loads(part["metadata"][i] or "{}")
            tag = {task_tag_key: metadata[task_tag_key]} if task_tag_key and task_tag_key in metadata else {}
            yield curated.CuratedCall(
                request=json.loads(part["request"][i]),
                response={"choices": [{"message": c.get("message"), "finish_reason": c.get("finish_reason")}
                                      for c in choices[:1]]} if choices else response,
                id=part["id"][i], agent=part["agent"][i], model=part["model"][i],
                prompt_tokens=part["prompt_tokens"][i], completion_tokens=part["completion_tokens"][i],
                metadata=tag)


def _iter_ids(ws: Workspace) -> Iterator[str]:
    for part in curated.iter_batches(ws, ["id"]):
        yield from part["id"]


@dataclass(frozen=True)
class ClusterResult(StageOutput):
    """``cluster``'s result; ``to_dict()`` is clusters.json's body with ``skipped``."""

    clusters: list[dict[str, Any]]
    calls: int
    unclustered: dict[str, Any]
    overall: dict[str, Any]
    skipped: bool
    curated_version: str | None = None
    map: str | None = None
    warning: str | None = None  # one task holds most of the calls: what to do about it


def cluster(ws: Workspace, config: Config | None = None, *, progress: Progress | None = None, force: bool = False,
            embedder: Embedder | None = None) -> ClusterResult:
    """Cluster the workspace's curated calls; skipped when the curated data and config are unchanged.

    ``config`` is the whole config: the stage reads [cluster] and [prices]."""
    config = config or Config()
    cfg = config.cluster
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
    stored = artifacts.clusters_file(ws, required=False) if not force and ws.is_fresh("cluster", fingerprint) \
        else None
    if stored is not None:
        return ClusterResult.of({**stored, "skipped": True})
    started = time.time()
    n_calls = curated.load_dataset(ws).num_rows
    if not n_calls:
        raise SlmigrateError(f"the curated dataset {version} in {ws.root} is empty; collect and curate calls first")
    out.mkdir(parents=True, exist_ok=True)
    # The calls stream through once; the distinct task views spill to a temporary file beside the clusters.
    body, model, assignment, map_data = cluster_calls(iter_compact(ws, cfg.task_tag_key), cfg, config.prices,
                                                      embedder=embedder, progress=progress, total=n_calls,
                                                      spill_dir=out)
    body["curated_version"] = version
    model.save(out)
    if cfg.map:
        draw_map(out / "map.png", map_data, f"{len(body['clusters'])} clusters of {body['calls']} calls "
                                            f"({cfg.granularity})")
        body["map"] = ws.relative(out / "map.png")
    (out / "config.json").write_text(json.dumps(cfg.model_dump(), indent=2))
    artifacts.write_clusters(ws, body)
    ws.store.set_clusters(zip(_iter_ids(ws), assignment))  # the dataset's order, as the calls were read
    ws.write_manifest("cluster", fingerprint=fingerprint, config=cfg.model_dump(), started=started,
                      counts={"calls": body["calls"], "clusters": len(body["clusters"]),
                              "unclustered": body["unclustered"]["size"]},
                      extra={"curated_version": version, "prices": config.prices.model_dump()})
    body["skipped"] = False
    return ClusterResult.of(body)
