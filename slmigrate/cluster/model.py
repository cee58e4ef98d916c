"""The saved cluster model: centroids and radii in ``clusters/model.npz``, which ``assign`` uses for new calls.

``refine`` and the router call ``ClusterModel.load(ws).assign(call)``. A call with a response is compared on its
whole task view; a request alone (the router, before any model answered) only on the request blocks (system
prompt, tools, latest turn) against each cluster's request radius. Two fine clusters that differ only in what
the model answered therefore look alike to the router: it picks the nearer one.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from slmigrate.cluster.features import BLOCKS, Layout, featurize
from slmigrate.cluster.fit import nearest
from slmigrate.cluster.views import task_view
from slmigrate.embed import Embedder, get_embedder
from slmigrate.errors import SlmigrateError
from slmigrate.record import CallRecord
from slmigrate.workspace import Workspace

MODEL_FILE = "model.npz"
UNKNOWN_AGENT = "unknown"  # the --by agent group of calls without an agent tag
CLUSTERS_FILE = "clusters.json"


def slug(text: str) -> str:
    """A folder-safe name (cluster ids become adapter folder names)."""
    return re.sub(r"[^A-Za-z0-9_.]+", "-", text).strip("-.")[:48] or "x"


def task_tag(call: CallRecord, key: str | None) -> str | None:
    if not key:
        return None
    value = (call.metadata or {}).get(key)
    return str(value) if isinstance(value, (str, int)) and str(value).strip() else None


@dataclass
class ClusterModel:
    ids: list[str]
    groups: list[str | None]  # the agent group of each cluster (None unless --by agent)
    centroids: np.ndarray
    radius: np.ndarray
    request_radius: np.ndarray
    layout: Layout
    embedder_name: str
    by: str = "none"
    task_tag_key: str | None = None
    tagged: dict[str, str] = field(default_factory=dict)  # user task tag -> cluster id
    _embedder: Embedder | None = None

    # --- persistence ---
    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        meta = {"ids": self.ids, "groups": self.groups, "dims": self.layout.dims, "weights": self.layout.weights,
                "embedder": self.embedder_name, "by": self.by, "task_tag_key": self.task_tag_key,
                "tagged": self.tagged}
        tmp = folder / (".tmp-" + MODEL_FILE)
        with open(tmp, "wb") as fh:
            np.savez(fh, centroids=self.centroids.astype(np.float32), radius=self.radius,
                     request_radius=self.request_radius, meta=np.array(json.dumps(meta)))
        tmp.replace(folder / MODEL_FILE)

    @classmethod
    def load(cls, ws: Workspace | Path, embedder: Embedder | None = None) -> "ClusterModel":
        folder = ws.path("clusters") if isinstance(ws, Workspace) else Path(ws)
        path = folder / MODEL_FILE
        if not path.exists():
            raise SlmigrateError(f"no cluster model at {path}; run `slmigrate cluster` first")
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(str(data["meta"]))
            model = cls(ids=meta["ids"], groups=meta["groups"], centroids=data["centroids"],
                        radius=data["radius"], request_radius=data["request_radius"],
                        layout=Layout(dims=meta["dims"], weights=meta["weights"]), embedder_name=meta["embedder"],
                        by=meta["by"], task_tag_key=meta["task_tag_key"], tagged=meta["tagged"])
        model._embedder = embedder
        return model

    @property
    def embedder(self) -> Embedder:
        if self._embedder is None:
            self._embedder = get_embedder(self.embedder_name)
        return self._embedder

    # --- assignment ---
    def vectors(self, calls: Sequence[CallRecord]) -> np.ndarray:
        views = [task_view(c) for c in calls]
        distinct = list(dict.fromkeys(views))
        x, _ = featurize(distinct, self.embedder, self.layout.weights)
        row = {v: i for i, v in enumerate(distinct)}
        return x[[row[v] for v in views]] if views else x

    def assign(self, call: CallRecord) -> str | None:
        """The cluster id of ``call``, or None when it is not near enough to any cluster."""
        return self.assign_many([call])[0]

    def assign_many(self, calls: Sequence[CallRecord]) -> list[str | None]:
        out: list[str | None] = [None] * len(calls)
        todo = []
        for i, call in enumerate(calls):
            tag = task_tag(call, self.task_tag_key)
            if tag is not None:
                out[i] = self.tagged.get(tag)
            else:
                todo.append(i)
        if not todo or not self.ids:
            return out
        x = self.vectors([calls[i] for i in todo])
        request_mask = self.layout.request_mask()
        groups = np.array([g or "" for g in self.groups])
        for j, i in enumerate(todo):
            call = calls[i]
            candidates = np.arange(len(self.ids))
            if self.by == "agent":
                mine = np.flatnonzero(groups == (call.agent or UNKNOWN_AGENT))
                candidates = mine if len(mine) else candidates
            answered = call.answer is not None
            hit = nearest(x[j:j + 1], self.centroids[candidates],
                          (self.radius if answered else self.request_radius)[candidates],
                          mask=None if answered else request_mask)[0]
            out[i] = self.ids[candidates[hit]] if hit >= 0 else None
        return out


def load_clusters(ws: Workspace) -> dict:
    """clusters.json (schema in docs/cluster.md)."""
    path = ws.path("clusters", CLUSTERS_FILE)
    if not path.exists():
        raise SlmigrateError(f"no clusters in {ws.root}; run `slmigrate cluster` first")
    return json.loads(path.read_text())


__all__ = ["BLOCKS", "ClusterModel", "load_clusters", "slug", "task_tag"]
