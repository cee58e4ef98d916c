"""The saved cluster model: centroids and radii in ``clusters/model.npz``, which ``assign`` uses for new calls.

``refine`` and the router call ``ClusterModel.load(ws).assign(call)``. A call with a response is compared on its
whole task view; a request alone (the router, before any model answered) only on the request blocks (system
prompt, tools, latest turn) against each cluster's request radius. Two fine clusters that differ only in what
the model answered therefore look alike to the router: it picks the nearer one.

The structural fast path: a request's *signature* (its masked system prompt, the sorted names of the tools it
offers, its ``response_format`` type and, with ``--by agent``, its agent group) is often enough to know its task.
At cluster time ``learn_signatures`` keeps the signatures that are unambiguous in the clustered calls:
- the clustered calls with the signature all went to one and the same cluster (none to another cluster, none
  carrying a task tag), and at most ``MAX_UNCLUSTERED_SHARE`` of its calls were left unclustered (the one-off
  filter drops a few odd turns of a real task; a prompt whose calls are largely one-offs is generic);
- its calls show at least ``min_size`` distinct latest turns (evidence that the turn varies without changing
  the task);
- the request path itself (request blocks against the request radii, what the router computes without the fast
  path) puts every one of its calls, unclustered ones included, stripped of the answer, into that cluster.
A request with such a signature is assigned without any embedding; anything else takes the embedding path. The
table is saved in model.npz's metadata; a model saved without it (older workspaces) simply has no fast path.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from slmigrate.cluster.features import BLOCKS, Layout, featurize
from slmigrate.cluster.fit import nearest
from slmigrate.cluster.views import TURN_CHARS, _mask_system, latest_turn, mask, system_prompt, task_view
from slmigrate.embed import Embedder, get_embedder
from slmigrate.errors import SlmigrateError
from slmigrate.record import CallRecord
from slmigrate.workspace import Workspace

MODEL_FILE = "model.npz"
UNKNOWN_AGENT = "unknown"  # the --by agent group of calls without an agent tag
CLUSTERS_FILE = "clusters.json"
# Bump when request_signature changes: a table learnt with another recipe is ignored (no fast path) on load.
SIGNATURE_VERSION = 1
MAX_UNCLUSTERED_SHARE = 0.05


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
    signatures: dict[str, str] = field(default_factory=dict)  # request signature -> cluster id (the fast path)
    _embedder: Embedder | None = None

    # --- persistence ---
    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        meta = {"ids": self.ids, "groups": self.groups, "dims": self.layout.dims, "weights": self.layout.weights,
                "embedder": self.embedder_name, "by": self.by, "task_tag_key": self.task_tag_key,
                "tagged": self.tagged, "signatures": self.signatures, "signature_version": SIGNATURE_VERSION}
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
                        by=meta["by"], task_tag_key=meta["task_tag_key"], tagged=meta["tagged"],
                        signatures=(meta.get("signatures") or {}
                                    if meta.get("signature_version") == SIGNATURE_VERSION else {}))
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

    def fast_assign(self, call: CallRecord) -> str | None:
        """The cluster the signature table gives a request without an answer, or None (take the embedding path)."""
        if not self.signatures or call.answer is not None:
            return None
        cid = self.signatures.get(request_signature(call, self.by))
        return cid if cid is not None and cid in self.ids else None

    def assign_many(self, calls: Sequence[CallRecord], *, fast: bool = True) -> list[str | None]:
        """Cluster ids (None: not near enough to any cluster). ``fast=False`` skips the signature fast path."""
        out: list[str | None] = [None] * len(calls)
        todo = []
        for i, call in enumerate(calls):
            tag = task_tag(call, self.task_tag_key)
            if tag is not None:
                out[i] = self.tagged.get(tag)
            elif fast and (hit := self.fast_assign(call)) is not None:
                out[i] = hit
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


def request_signature(call: CallRecord, by: str = "none") -> str:
    """What a request alone says about its task, as a short hash: the masked system prompt (the same masking as
    the task view, so ids and numbers inside the prompt do not matter), the sorted offered tool names, the
    ``response_format`` type, and the agent group when clusters are made per agent."""
    system = _mask_system(system_prompt(call.messages))
    names = sorted({(t.get("function") or {}).get("name") or t.get("name") or "?" for t in call.tools})
    fmt = call.request.get("response_format")
    fmt_kind = fmt.get("type") if isinstance(fmt, dict) else (str(fmt) if fmt else None)
    agent = (call.agent or UNKNOWN_AGENT) if by == "agent" else None
    key = json.dumps([system, names, fmt_kind, agent], ensure_ascii=False)
    return hashlib.sha1(key.encode("utf-8")).hexdigest()


def learn_signatures(model: ClusterModel, calls: Sequence[CallRecord], assignment: Sequence[str | None],
                     min_size: int) -> dict[str, str]:
    """The fast-path table: signatures that map to exactly one cluster (the rules are in the module docstring).

    Deterministic: it depends only on the calls, their clusters and the model, not on the order of the calls.
    """
    clusters: dict[str, set] = {}
    unclustered: dict[str, int] = {}
    total: dict[str, int] = {}
    turns: dict[str, set[str]] = {}
    sigs = []
    for call, cid in zip(calls, assignment):
        sig = request_signature(call, model.by)
        sigs.append(sig)
        total[sig] = total.get(sig, 0) + 1
        if task_tag(call, model.task_tag_key) is not None:
            # A tagged call's cluster comes from its tag, which a live request need not carry: no fast path.
            clusters.setdefault(sig, set()).add(("tagged",))
        elif cid is None:
            unclustered[sig] = unclustered.get(sig, 0) + 1
        else:
            clusters.setdefault(sig, set()).add(cid)
        if len(turns.setdefault(sig, set())) < min_size:
            turns[sig].add(mask(latest_turn(call.messages))[:TURN_CHARS])
    ids = set(model.ids)
    table = {}
    for sig, marks in clusters.items():
        (only,) = marks if len(marks) == 1 else (None,)
        if (isinstance(only, str) and only in ids and len(turns[sig]) >= min_size
                and unclustered.get(sig, 0) <= MAX_UNCLUSTERED_SHARE * total[sig]):
            table[sig] = only
    # The request path must agree on every call of the signature: a signature whose calls the router's own
    # embedding path would split or leave out is not unambiguous for requests, whatever the clustering said.
    rows = [i for i, sig in enumerate(sigs) if sig in table]
    for start in range(0, len(rows), 20_000):  # in chunks: the vectors of a million requests would not fit
        part = rows[start:start + 20_000]
        requests = [CallRecord(request=calls[i].request, agent=calls[i].agent) for i in part]
        for i, got in zip(part, model.assign_many(requests, fast=False)):
            if got != table.get(sigs[i], got):
                table.pop(sigs[i], None)
    return dict(sorted(table.items()))


def load_clusters(ws: Workspace) -> dict:
    """clusters.json (schema in docs/cluster.md)."""
    path = ws.path("clusters", CLUSTERS_FILE)
    if not path.exists():
        raise SlmigrateError(f"no clusters in {ws.root}; run `slmigrate cluster` first")
    return json.loads(path.read_text())


__all__ = ["BLOCKS", "ClusterModel", "learn_signatures", "load_clusters", "request_signature", "slug", "task_tag"]
