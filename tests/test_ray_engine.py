"""The engine seam (slmigrate/engines.py) and `--engine ray` for curate and cluster: same output as local."""

from __future__ import annotations

import functools
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

from slmigrate import engines
from slmigrate.curate import dataset as curated
from slmigrate.cli import main
from slmigrate.cluster.run import _embed_pass, cluster_calls
from slmigrate.config import ClusterConfig, Config, CurateConfig
from slmigrate.curate.run import curate
from fakes import HashEmbedder
from slmigrate.errors import SlmigrateError
from slmigrate.record import CallRecord
from conftest import skip_unless_required  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
HAS_RAY = importlib.util.find_spec("ray") is not None


def _agent_log(n: int, seed: int = 0) -> list[dict]:
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import agent_log
    finally:
        sys.path.pop(0)
    return agent_log.generate(n, seed=seed)


def _calls(n: int) -> list[CallRecord]:
    return [CallRecord(request=r["request"], response=r["response"], metadata=r.get("metadata") or {}).finalise()
            for r in _agent_log(n)]


def _texts(n: int) -> list[str]:
    return [f"text {i} about {'orders' if i % 3 else 'refunds'} number {i * 7}" for i in range(n)]


# --- fast: the engine seam without Ray ---
def test_local_engine_keeps_order_in_process_and_in_worker_processes():
    texts = _texts(150)
    factory = functools.partial(_embed_pass, HashEmbedder(dim=32))
    direct = HashEmbedder(dim=32).encode(texts)
    one = engines.map_batches(texts, factory, engine="local", workers=1, batch_size=16)
    two = engines.map_batches(texts, factory, engine="local", workers=2, batch_size=16)
    assert np.array_equal(np.stack(one), direct)
    assert np.array_equal(np.stack(two), direct)
    assert engines.map_batches([], factory) == []


def test_unknown_engine_and_address_without_ray_are_errors():
    with pytest.raises(SlmigrateError, match="unknown engine 'spark'"):
        engines.check_engine("spark")
    with pytest.raises(SlmigrateError, match="needs --engine ray"):
        engines.check_engine("local", "ray://head:10001")


def test_missing_ray_names_the_extra(workspace, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # makes `import ray` raise ImportError
    with pytest.raises(SlmigrateError, match=r"pip install 'slmigrate\[ray\]'"):
        engines.require_ray()
    # The stages check before they touch any data (this workspace holds no calls, which would fail later).
    with pytest.raises(SlmigrateError, match=r"slmigrate\[ray\]"):
        curate(workspace, CurateConfig(engine="ray"))
    cfg = Config()
    cfg.cluster.engine = "ray"
    with pytest.raises(SlmigrateError, match=r"slmigrate\[ray\]"):
        from slmigrate.cluster import cluster

        cluster(workspace, cfg)
    ws = str(workspace.root.parent / "cli-ws")
    assert main(["init", "--workspace", ws]) == 0
    assert main(["curate", "--workspace", ws, "--engine", "ray"]) == 1
    assert "pip install 'slmigrate[ray]'" in capsys.readouterr().err


def test_ray_is_not_imported_by_the_local_engine(workspace):
    from slmigrate.collect.importer import import_calls

    rows = _agent_log(40)
    path = workspace.root / "log.jsonl"
    import json

    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    import_calls(workspace, [path])
    before = "ray" in sys.modules
    curate(workspace, CurateConfig(pii="off"))
    cluster_calls([c for c in curated.load_curated(workspace)], ClusterConfig(map=False, embedder="hash"))
    assert ("ray" in sys.modules) == before


def test_cluster_with_local_worker_processes_matches_in_process():
    calls = _calls(120)
    base = ClusterConfig(map=False, embedder="hash", min_size=3)
    _, _, one, _ = cluster_calls(calls, base, embedder=HashEmbedder())
    _, _, two, _ = cluster_calls(calls, base.model_copy(update={"workers": 2}), embedder=HashEmbedder())
    assert one == two and any(one)


class _CostlyHash(HashEmbedder):
    """The hash embedder, marked as costly to encode the way MiniLM is."""

    worth_workers = True


def test_cluster_spreads_a_large_embedding_pass_over_the_cores_by_default(monkeypatch):
    from slmigrate.cluster import run as cluster_run

    asked = []
    real = engines.map_batches

    def spy(items, factory, **kw):
        asked.append((len(items), kw["workers"]))
        return real(items, factory, **{**kw, "workers": 1})  # in this process: the test checks the choice

    monkeypatch.setattr(engines, "map_batches", spy)
    monkeypatch.setattr(engines, "usable_cpus", lambda: 2)
    monkeypatch.setattr(cluster_run, "PARALLEL_MIN_TEXTS", 50)
    calls = _calls(120)
    cfg = ClusterConfig(map=False, embedder="hash", min_size=3)
    _, _, spread, _ = cluster_calls(calls, cfg, embedder=_CostlyHash())
    assert asked and asked[0][0] >= 50 and all(workers == 2 for _, workers in asked)
    asked.clear()
    # An embedder cheap to run, or fewer texts than the threshold: embedded here, the same clusters.
    _, _, cheap, _ = cluster_calls(calls, cfg, embedder=HashEmbedder())
    monkeypatch.setattr(cluster_run, "PARALLEL_MIN_TEXTS", 10**6)
    _, _, few, _ = cluster_calls(calls, cfg, embedder=_CostlyHash())
    assert not asked and cheap == spread == few and any(spread)


def test_engine_settings_do_not_change_the_fingerprints(workspace):
    from slmigrate.curate.run import fingerprint

    assert fingerprint(workspace, CurateConfig()) == fingerprint(
        workspace, CurateConfig(engine="ray", ray_address="auto", workers=8))


# --- slow: real presidio/spaCy and MiniLM on a local Ray with 2 workers ---
def _curated_rows(ws) -> list[dict]:
    import dataclasses

    return [dataclasses.asdict(c) for c in curated.load_curated(ws)]


@pytest.mark.slow
def test_ray_engine_gives_the_local_results(tmp_path):
    if not HAS_RAY:
        skip_unless_required("ray", "ray is not installed (pip install 'slmigrate[ray]')")
    import json

    from slmigrate.collect.importer import import_calls
    from slmigrate.workspace import Workspace

    path = tmp_path / "log.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _agent_log(150)))
    ws = Workspace.open(tmp_path / "ws")
    import_calls(ws, [path])

    local = curate(ws, CurateConfig(pii="placeholder"))
    local_rows = _curated_rows(ws)
    # The CLI path, with 2 workers on a local Ray; --force because the result is expected to be the same.
    assert main(["curate", "--workspace", str(ws.root), "--engine", "ray", "--workers", "2", "--force",
                 "--json"]) == 0
    ray_report = curated.load_report(ws)
    assert ray_report["version"] != local.version
    ray_rows = _curated_rows(ws)
    assert local.entities and local.calls_out > 100  # the comparison is about real scrubbing
    assert ray_rows == local_rows
    for key in ("dropped", "splits", "sessions", "entities", "distinct_texts_analysed", "examples"):
        assert ray_report[key] == local.to_dict()[key], key

    calls = list(curated.load_curated(ws))
    body, _, by_local, _ = cluster_calls(calls, ClusterConfig(map=False))
    assert len(body["clusters"]) >= 3
    # The CLI command on Ray; its assignments land in the store
    toml = tmp_path / "slmigrate.toml"
    toml.write_text("[cluster]\nmap = false\n")
    assert main(["cluster", "--workspace", str(ws.root), "--config", str(toml), "--engine", "ray", "--workers", "2",
                 "--json"]) == 0
    stored = ws.store.clusters_of([c.id for c in calls])
    assert [stored[c.id] for c in calls] == by_local


@pytest.fixture(autouse=True, scope="module")
def _stop_ray():
    """Stop a Ray this module started, so the rest of the suite does not share the box with its daemons."""
    yield
    if "ray" in sys.modules and sys.modules["ray"] is not None and sys.modules["ray"].is_initialized():
        sys.modules["ray"].shutdown()
