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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from slmigrate.cluster.features import BLOCKS, Layout, featurize
from slmigrate.cluster.fit import nearest
from slmigrate.cluster.views import TURN_CHARS, _mask_system, digest64, latest_turn, mask, system_prompt, task_view
from slmigrate.cluster.embed import Embedder, get_embedder
from slmigrate.errors import SlmigrateError
from slmigrate.record import CallRecord
from slmigrate.workspace import Workspace

MODEL_FILE = "model.npz"
UNKNOWN_AGENT = "unknown"  # the --by agent group of calls without an agent tag
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
        for j, i in enumerate(todo):
            call = calls[i]
            candidates = self.candidates(call.agent)
            answered = call.answer is not None
            hit = nearest(x[j:j + 1], self.centroids[candidates],
                          (self.radius if answered else self.request_radius)[candidates],
                          mask=None if answered else request_mask)[0]
            out[i] = self.ids[candidates[hit]] if hit >= 0 else None
        return out

    def candidates(self, agent: str | None) -> np.ndarray:
        """The clusters a call may join: with ``--by agent`` its agent's own (all, when its agent has none)."""
        everything = np.arange(len(self.ids))
        if self.by != "agent":
            return everything
        mine = np.flatnonzero(np.array([g == (agent or UNKNOWN_AGENT) for g in self.groups], dtype=bool))
        return mine if len(mine) else everything


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


def signature_table(model: ClusterModel, signatures: Sequence[str], call_sig: np.ndarray, call_turn: np.ndarray,
                    call_label: np.ndarray, call_tagged: np.ndarray, min_size: int,
                    request_path: Callable[[np.ndarray], np.ndarray]) -> dict[str, str]:
    """The fast-path table from per-call columns (the rules are in the module docstring).

    ``call_sig`` indexes ``signatures``; ``call_turn`` is a hash of the call's masked latest turn; ``call_label``
    indexes ``model.ids`` (-1: unclustered, -2: a cluster the model does not have); ``request_path(calls)`` gives
    the cluster index (-1: none) the router's embedding path picks for those calls' requests. Deterministic: it
    depends only on the calls, their clusters and the model, not on the order of the calls.
    """
    n = len(signatures)
    total = np.bincount(call_sig, minlength=n)
    tagged = np.bincount(call_sig[call_tagged], minlength=n) > 0
    free = ~call_tagged
    unclustered = np.bincount(call_sig[free & (call_label == -1)], minlength=n)
    clustered = free & (call_label != -1)
    pairs = np.unique(np.stack([call_sig[clustered].astype(np.int64), call_label[clustered].astype(np.int64)],
                               axis=1), axis=0).reshape(-1, 2)  # distinct (signature, cluster)
    n_clusters = np.bincount(pairs[:, 0], minlength=n)
    only = np.full(n, -1, dtype=np.int64)
    only[pairs[:, 0]] = pairs[:, 1]  # the cluster, where there is exactly one
    turns = np.unique(np.stack([call_sig.astype(np.uint64), call_turn.astype(np.uint64)], axis=1),
                      axis=0).reshape(-1, 2)
    distinct_turns = np.bincount(turns[:, 0].astype(np.int64), minlength=n)
    ok = ((n_clusters == 1) & ~tagged & (only >= 0) & (only < len(model.ids)) & (distinct_turns >= min_size)
          & (unclustered <= MAX_UNCLUSTERED_SHARE * total))
    # The request path must agree on every call of the signature: a signature whose calls the router's own
    # embedding path would split or leave out is not unambiguous for requests, whatever the clustering said.
    rows = np.flatnonzero(ok[call_sig])
    if len(rows):
        wrong = np.asarray(request_path(rows)) != only[call_sig[rows]]
        ok[np.unique(call_sig[rows][wrong])] = False
    return dict(sorted((signatures[s], model.ids[only[s]]) for s in np.flatnonzero(ok).tolist()))


def learn_signatures(model: ClusterModel, calls: Sequence[CallRecord], assignment: Sequence[str | None],
                     min_size: int) -> dict[str, str]:
    """``signature_table`` for calls held in memory, with their cluster ids."""
    index: dict[str, int] = {}
    call_sig = np.array([index.setdefault(request_signature(c, model.by), len(index)) for c in calls],
                        dtype=np.int64)
    call_turn = np.array([digest64(mask(latest_turn(c.messages))[:TURN_CHARS]) for c in calls], dtype=np.uint64)
    position = {cid: i for i, cid in enumerate(model.ids)}
    call_label = np.array([-1 if cid is None else position.get(cid, -2) for cid in assignment], dtype=np.int64)
    call_tagged = np.array([task_tag(c, model.task_tag_key) is not None for c in calls], dtype=bool)

    def request_path(rows: np.ndarray) -> np.ndarray:
        out = []
        for start in range(0, len(rows), 20_000):  # in chunks: the vectors of a million requests would not fit
            part = rows[start:start + 20_000].tolist()
            requests = [CallRecord(request=calls[i].request, agent=calls[i].agent) for i in part]
            out.extend(-1 if cid is None else position[cid] for cid in model.assign_many(requests, fast=False))
        return np.array(out, dtype=np.int64)

    return signature_table(model, list(index), call_sig, call_turn, call_label, call_tagged, min_size,
                           request_path)


__all__ = ["BLOCKS", "ClusterModel", "learn_signatures", "request_signature", "signature_table",
           "slug", "task_tag"]
