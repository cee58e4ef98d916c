"""Scaling paths of the data stages, on small inputs (fast; the hash embedder stands in for MiniLM).

- cluster: when the distinct task views exceed ``max_points``, a deterministic sample is clustered and the rest
  assigned to the nearest centroid. With ``max_points`` >= the views it must be exactly the full fit; below, the
  assignment must still agree with the full fit and with the generator's true tasks.
- cluster streams the curated calls (``iter_compact``): the same clusters as from the loaded calls.
- curate streams the store into the dataset with ``--pii off``: same rows and report as before.
"""

from __future__ import annotations

import importlib.util
from collections import Counter
from pathlib import Path

import pytest

from slmigrate.curate import dataset as curated
from slmigrate.cluster.run import cluster_calls, iter_compact
from slmigrate.cluster.views import task_view
from slmigrate.config import ClusterConfig
from fakes import HashEmbedder
from slmigrate.record import CallRecord

ROOT = Path(__file__).resolve().parent.parent


def _agent_calls(n: int, seed: int = 0) -> list[CallRecord]:
    spec = importlib.util.spec_from_file_location("agent_log", ROOT / "examples" / "agent_log.py")
    agent_log = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(agent_log)
    return [CallRecord(request=r["request"], response=r["response"], input_id=r["id"], timestamp=r["timestamp"],
                       session=r["metadata"]["session"], metadata=r["metadata"]).finalise()
            for r in agent_log.generate(n, seed)]


@pytest.fixture(scope="module")
def calls() -> list[CallRecord]:
    return _agent_calls(500)


def _run(calls, max_points: int):
    cfg = ClusterConfig(embedder="hash", max_points=max_points, map=False)
    body, model, assignment, _ = cluster_calls(calls, cfg, embedder=HashEmbedder())
    return body, model, assignment


def test_sample_fit_equals_full_fit_when_max_points_covers_the_views(calls):
    distinct = len(set(task_view(c) for c in calls))
    assert distinct > 150  # the generator's turns vary: most calls are their own view
    full = _run(calls, 100_000)
    exact = _run(calls, distinct)  # the boundary: every view still fits
    assert exact[2] == full[2]
    assert exact[1].ids == full[1].ids
    assert (exact[1].centroids == full[1].centroids).all()


def test_sampled_fit_assigns_the_rest_like_the_full_fit(calls):
    full_body, full_model, full = _run(calls, 100_000)
    body, model, sampled = _run(calls, 250)  # about half of the distinct views are clustered
    assert model.centroids.shape[1] == full_model.centroids.shape[1]
    # Each sampled cluster corresponds to one full cluster: calls clustered in both agree on it.
    pairs = Counter((a, b) for a, b in zip(full, sampled) if a is not None and b is not None)
    both = sum(pairs.values())
    match: dict[str, str] = {}
    for (a, b), _n in pairs.most_common():
        match.setdefault(b, a)
    agree = sum(n for (a, b), n in pairs.items() if match[b] == a)
    # A task too rare to reach min_size within the sample (here: SQL, 8% of the calls) can be missed.
    assert both >= 0.75 * sum(a is not None for a in full)
    assert agree >= 0.95 * both
    # And the clusters are the generator's recurring tasks: each is (almost) one true task kind.
    tasks = [c.metadata["task"] for c in calls]
    for cid in set(s for s in sampled if s is not None):
        kinds = Counter(t for t, s in zip(tasks, sampled) if s == cid)
        assert kinds.most_common(1)[0][1] >= 0.9 * sum(kinds.values()), (cid, kinds)
    # The one-off requests stay out of the recurring tasks.
    open_calls = [s for t, s in zip(tasks, sampled) if t == "open_ended"]
    assert sum(s is None for s in open_calls) >= 0.8 * len(open_calls)
    # Deterministic: the sample is chosen by content, so shuffled input gives the same assignment per call.
    order = list(reversed(range(len(calls))))
    _, _, again = _run([calls[i] for i in order], 250)
    assert [again[order.index(i)] for i in range(len(calls))] == sampled


def test_compact_calls_cluster_like_the_full_calls(workspace, calls):
    some = calls[:300]
    curated.write_curated(workspace, (curated.to_row(c, "train") for c in some), {}, {})
    compact = list(iter_compact(workspace))
    assert [c.id for c in compact] == [c.id for c in some]
    assert [task_view(c) for c in compact] == [task_view(c) for c in some]
    full = curated.load_curated(workspace)
    body_full, _, assign_full, _ = cluster_calls(full, ClusterConfig(embedder="hash", map=False),
                                                 embedder=HashEmbedder())
    body_compact, _, assign_compact, _ = cluster_calls(compact, ClusterConfig(embedder="hash", map=False),
                                                       embedder=HashEmbedder())
    assert assign_compact == assign_full
    for a, b in zip(body_full["clusters"], body_compact["clusters"]):
        for key in ("id", "size", "cost_usd", "prompt_tokens", "completion_tokens", "replaceability", "keywords"):
            assert a[key] == b[key], key


def test_curate_streams_with_pii_off(workspace, calls):
    from slmigrate.config import CurateConfig
    from slmigrate.curate.run import curate

    some = calls[:200]
    workspace.store.insert_calls(some + some[:20])  # the repeats are kept by the store? then curate drops them
    report = curate(workspace, CurateConfig(pii="off"))
    stored = workspace.store.count_calls()
    assert report.calls_in == stored
    kept = curated.load_curated(workspace)
    assert report.calls_out == len(kept) == stored - sum(report.dropped.values())
    assert sum(report.splits.values()) == len(kept)
    assert [c.id for c in kept] == sorted(c.id for c in kept)  # store order (ids are time-sortable)
    by_id = {c.id: c for c in some}
    assert all(k.request == by_id[k.id].request for k in kept)  # --pii off: unchanged


def _repeated(calls: list[CallRecord], n: int):
    """``n`` calls cycling over ``calls``'s requests and answers (so the distinct task views stay the same), each a
    new call with its own id, made one at a time as the consumer asks."""
    for i in range(n):
        c = calls[i % len(calls)]
        yield CallRecord(request=c.request, response=c.response, id=f"call-{i:08d}", model=c.model, agent=c.agent,
                         prompt_tokens=c.prompt_tokens, completion_tokens=c.completion_tokens,
                         metadata=c.metadata)


def test_cluster_memory_does_not_grow_with_calls_beyond_their_views(calls):
    """Calls stream through cluster_calls and are not kept: with the same distinct views, 4x the calls may add
    only the per-call columns (tens of bytes each), not the calls (several KB each as objects)."""
    import tracemalloc

    base = calls[:300]
    cfg = ClusterConfig(embedder="hash", map=False)
    embedder = HashEmbedder()
    cluster_calls(_repeated(base, 300), cfg, embedder=embedder)  # warm caches (embedder, masks) first

    def peak(n: int) -> tuple[int, dict]:
        tracemalloc.start()
        try:
            body = cluster_calls(_repeated(base, n), cfg, embedder=embedder)[0]
            return tracemalloc.get_traced_memory()[1], body
        finally:
            tracemalloc.stop()

    small, body_small = peak(3_000)
    large, body_large = peak(12_000)
    per_call = (large - small) / 9_000
    assert body_large["calls"] == 12_000 and body_large["clustered_calls"] == 4 * body_small["clustered_calls"]
    assert [c["size"] for c in body_large["clusters"]] == [4 * c["size"] for c in body_small["clusters"]]
    # A trimmed call object alone is ~2.5 KB; the columns, the assignment list and the passes' temporaries
    # stay far below that.
    assert per_call < 250, f"{per_call:.0f} bytes per added call"
