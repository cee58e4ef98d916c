"""Finding the tasks: average-linkage clustering of distinct task views, with a one-off filter.

Why this recipe:
- Calls are first collapsed to distinct task views (with their call counts). Agent logs repeat views heavily, so
  this is what makes 100k calls affordable; when even the distinct views exceed ``max_points``, a deterministic
  hash-ordered sample of them is clustered and the rest are assigned to the nearest centroid afterwards, in
  batches (``assign_rest``): average linkage needs the pairwise distances, O(n^2) time and memory, so a million
  views cannot be fitted directly, while assigning costs O(n * clusters).
- Average linkage cut at a distance threshold lets the number of clusters come from the data, is deterministic
  (the input is put in a canonical order first: by content hash, ``calltable.view_digest``), and gives a radius
  with a meaning: in the weighted space a distance of ``d`` means the calls' views differ by a weighted cosine
  distance of ``d^2 / 2``.
- A recurring task has dense structure inside it; a handful of unrelated one-off requests that happen to share
  a generic system prompt do not. So a call is kept only if, cut again at ``core_ratio`` times the radius, it
  still sits in a group of at least ``min_size`` calls; the rest are "unclustered".
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Fitted:
    """The clusters of one group of calls (all calls, or one agent's)."""

    labels: np.ndarray  # per fitted row: cluster index (0..k-1) or -1
    centroids: np.ndarray  # (k, width)
    radius: np.ndarray  # (k,) largest member distance in the full space
    request_radius: np.ndarray  # (k,) the same over the request blocks only (routing before the answer exists)


def fit_group(x: np.ndarray, counts: np.ndarray, *, threshold: float, core_ratio: float, min_size: int,
              request_mask: np.ndarray) -> Fitted:
    """Cluster the rows of ``x`` (distinct views; ``counts`` calls each)."""
    n = len(x)
    width = x.shape[1]
    if n == 0:
        return Fitted(np.zeros(0, int), np.zeros((0, width), np.float32), np.zeros(0), np.zeros(0))
    if n == 1:
        cut = fine = np.zeros(1, dtype=int)
    else:
        from scipy.cluster.hierarchy import fcluster, linkage
        from scipy.spatial.distance import pdist

        tree = linkage(pdist(x.astype(np.float64)), method="average")
        cut = fcluster(tree, threshold, criterion="distance") - 1
        fine = fcluster(tree, threshold * core_ratio, criterion="distance") - 1
    size = np.bincount(cut, weights=counts)
    fine_size = np.bincount(fine, weights=counts)
    keep = (size[cut] >= min_size) & (fine_size[fine] >= min_size)
    # After the one-off filter a cluster may have shrunk below min_size: drop it too.
    kept_size = np.bincount(cut[keep], weights=counts[keep], minlength=len(size))
    keep &= kept_size[cut] >= min_size
    # Number the clusters by size (largest first); ties by first row, which is canonical.
    ids = [c for c in dict.fromkeys(cut[keep].tolist())]
    ids.sort(key=lambda c: (-kept_size[c], int(np.flatnonzero(cut == c)[0])))
    remap = {c: i for i, c in enumerate(ids)}
    labels = np.array([remap[c] if k else -1 for c, k in zip(cut.tolist(), keep.tolist())], dtype=int)
    k = len(ids)
    centroids = np.zeros((k, width), dtype=np.float32)
    radius = np.zeros(k)
    request_radius = np.zeros(k)
    for i in range(k):
        rows = labels == i
        w = counts[rows].astype(np.float64)
        members = x[rows].astype(np.float64)
        centroid = (members * w[:, None]).sum(axis=0) / w.sum()
        centroids[i] = centroid
        radius[i] = float(np.sqrt(((members - centroid) ** 2).sum(axis=1)).max())
        request_radius[i] = float(np.sqrt(((members[:, request_mask] - centroid[request_mask]) ** 2).sum(axis=1)).max())
    return Fitted(labels, centroids, radius, request_radius)


def assign_rest(x: np.ndarray, fitted: Fitted, *, threshold: float, core_ratio: float) -> np.ndarray:
    """Clusters for views left out of a sampled fit (``max_points``): the nearest centroid, within reach.

    A cluster's radius measured on a sample understates its extent in the whole data (the farthest of a few
    hundred members is nearer than the farthest of a million), so the reach is the larger of that radius and the
    core distance ``threshold * core_ratio``: a view that close to a centroid would sit in that cluster's dense
    core in a full fit. One-off views lie farther from every centroid and stay unclustered.
    """
    reach = np.maximum(fitted.radius, threshold * core_ratio)
    return nearest(x, fitted.centroids, reach)


def nearest(x: np.ndarray, centroids: np.ndarray, radius: np.ndarray, mask: np.ndarray | None = None,
            slack: float = 1.0) -> np.ndarray:
    """Index of the nearest centroid within its radius (times ``slack``), or -1; rows of ``x`` at a time."""
    if len(centroids) == 0 or len(x) == 0:
        return np.full(len(x), -1, dtype=int)
    if mask is not None:
        x, centroids = x[:, mask], centroids[:, mask]
    out = np.empty(len(x), dtype=int)
    # Chunked so 100k rows x k centroids never materialise a huge distance matrix at once.
    for start in range(0, len(x), 4096):
        part = x[start:start + 4096].astype(np.float64)
        d2 = (part ** 2).sum(1)[:, None] - 2 * part @ centroids.T.astype(np.float64) + \
            (centroids.astype(np.float64) ** 2).sum(1)[None, :]
        d = np.sqrt(np.maximum(d2, 0.0))
        best = d.argmin(axis=1)
        within = d[np.arange(len(part)), best] <= radius[best] * slack + 1e-6
        out[start:start + 4096] = np.where(within, best, -1)
    return out


def from_members(x: np.ndarray, counts: np.ndarray, members: list[np.ndarray], request_mask: np.ndarray) -> Fitted:
    """A ``Fitted`` from clusters given as row index arrays: numbered by size (calls), largest first, ties by
    first row; centroids, radii and request radii measured in ``x``."""
    members = [m for m in members if len(m)]
    members.sort(key=lambda m: (-float(counts[m].sum()), int(m.min())))
    labels = np.full(len(x), -1, dtype=int)
    k, width = len(members), x.shape[1]
    centroids = np.zeros((k, width), dtype=np.float32)
    radius, request_radius = np.zeros(k), np.zeros(k)
    for i, rows in enumerate(members):
        labels[rows] = i
        w = counts[rows].astype(np.float64)
        pts = x[rows].astype(np.float64)
        centroid = (pts * w[:, None]).sum(axis=0) / w.sum()
        centroids[i] = centroid
        radius[i] = float(np.sqrt(((pts - centroid) ** 2).sum(axis=1)).max())
        request_radius[i] = float(np.sqrt(((pts[:, request_mask] - centroid[request_mask]) ** 2).sum(axis=1)).max())
    return Fitted(labels, centroids, radius, request_radius)


def members_of(fitted: Fitted) -> list[np.ndarray]:
    return [np.flatnonzero(fitted.labels == i) for i in range(len(fitted.centroids))]


def fit_parts(x: np.ndarray, counts: np.ndarray, parts: np.ndarray, *, threshold: float, core_ratio: float,
              min_size: int, request_mask: np.ndarray, filtered: frozenset[int] = frozenset(),
              refine: bool = True) -> tuple[Fitted, list[int]]:
    """``fit_group`` inside each part (rows sharing a part id >= 0: one instruction template and tool set) on its
    own, so two templates never share a cluster; returns the combined fit and each cluster's part id.

    A template with slots (several distinct texts sharing its lines) is a task by construction: inside its part
    there is no one-off filter, and the rows of its sub-clusters smaller than ``min_size`` join the nearest of
    its larger ones (the whole part is one cluster when the embedding finds none). With ``refine`` False
    (coarse tasks) such a part is one cluster outright: one template is one job, and inside it the embedding
    sees only slot values (a scenario, a user's words), whose cut at ``threshold`` is a coin toss that
    scrubbing names or MiniLM's float noise flips (tau2's user simulator: top merge 0.600 vs 0.601 with PII
    scrubbing on and off, one task or two). Rows of part -1 (no
    template) and of the ``filtered`` parts (one fixed prompt, which may front unrelated one-off requests) are
    clustered with the one-off filter."""
    members, part_of = [], []
    for p in sorted(set(parts.tolist())):
        rows = np.flatnonzero(parts == p)
        templated = p >= 0 and p not in filtered
        if templated and not refine:
            members.append(rows)
            part_of.append(p)
            continue
        fitted = fit_group(x[rows], counts[rows], threshold=threshold, min_size=min_size,
                           core_ratio=1.0 if templated else core_ratio, request_mask=request_mask)
        local = members_of(fitted)
        if templated:
            if not local:
                local = [np.arange(len(rows))]
            elif (fitted.labels < 0).any():
                rest = np.flatnonzero(fitted.labels < 0)
                near = nearest(x[rows][rest], fitted.centroids, np.full(len(fitted.centroids), np.inf))
                local = [np.sort(np.concatenate([m, rest[near == i]])) for i, m in enumerate(local)]
        for m in local:
            members.append(rows[m])
            part_of.append(p)
    combined = from_members(x, counts, members, request_mask)
    order = {int(m.min()): p for m, p in zip(members, part_of)}
    return combined, [order[int(m.min())] for m in members_of(combined)]


def split_dominant(x: np.ndarray, x_fine: np.ndarray, counts: np.ndarray, fitted: Fitted, steps: np.ndarray, *,
                   share: float, threshold: float, min_size: int, request_mask: np.ndarray
                   ) -> tuple[Fitted, list[int], list[int | None]]:
    """Split every cluster holding more than ``share`` of the calls into its steps: first by ``steps`` (per row:
    which tool it called, or JSON / label / reply), then a step still holding more than ``share`` by the fine
    task view (``x_fine``: the turn it answers and the answer's shape), average linkage cut at ``threshold``,
    the rows it leaves out going to the nearest of its sub-clusters. Steps with fewer than ``min_size`` calls are
    unclustered (rare moves of a large job). Returns the new fit, each new cluster's parent (old index) and
    step id (None where the cluster was not split). A cluster with fewer than two steps of ``min_size`` calls is
    one task doing one thing, and is kept whole."""
    total = float(counts.sum())
    members, parent, step_of = [], [], []
    for i, rows in enumerate(members_of(fitted)):
        kinds = [s for s in set(steps[rows].tolist()) if counts[rows[steps[rows] == s]].sum() >= min_size]
        # A task of one kind of step (a classifier answering labels only) is one task, however large: kept.
        if counts[rows].sum() <= share * total or len(rows) < 2 or len(kinds) < 2:
            members.append(rows)
            parent.append(i)
            step_of.append(None)
            continue
        for s in sorted(set(steps[rows].tolist())):
            part = rows[steps[rows] == s]
            if counts[part].sum() < min_size:
                continue
            if counts[part].sum() <= share * total or len(part) < 2:
                members.append(part)
                parent.append(i)
                step_of.append(s)
                continue
            sub = fit_group(x_fine[part], counts[part], threshold=threshold, core_ratio=1.0, min_size=min_size,
                            request_mask=np.ones(x_fine.shape[1], dtype=bool))
            if len(sub.centroids) == 0:
                groups = [part]
            else:
                local = sub.labels.copy()
                rest = local < 0
                if rest.any():
                    local[rest] = nearest(x_fine[part][rest], sub.centroids, np.full(len(sub.centroids), np.inf))
                groups = [part[local == k] for k in range(len(sub.centroids))]
            for g in groups:
                members.append(g)
                parent.append(i)
                step_of.append(s)
    new = from_members(x, counts, members, request_mask)
    key = {int(m.min()): (p, s) for m, p, s in zip(members, parent, step_of)}
    info = [key[int(m.min())] for m in members_of(new)]
    return new, [p for p, _ in info], [s for _, s in info]
