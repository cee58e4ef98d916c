"""The router's assignment: the signature fast path, its fallback to the embedding path, the bounded cache.

Unit tests use the hash embedder on the synthetic log of tests/test_cluster.py; the slow tests check the direct
MiniLM encode against SentenceTransformer.encode, and the fast path against the embedding path with the real
MiniLM on the examples generator's log.
"""

import json
import random
import subprocess
import sys

import numpy as np
import pytest
from test_cluster import _call, hash_cfg, synthetic_log

from slmigrate.cluster import cluster_calls
from slmigrate.cluster.model import MODEL_FILE, ClusterModel, learn_signatures, request_signature
from fakes import HashEmbedder
from slmigrate.errors import SlmigrateError
from slmigrate.record import CallRecord
from slmigrate.serve.assign import request_assigner

from conftest import ROOT


class CountingEmbedder(HashEmbedder):
    """The hash embedder, remembering every text it really encoded (cache misses)."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.seen: list[str] = []

    def _encode_unique(self, texts, *, progress, desc):
        self.seen.extend(texts)
        return super()._encode_unique(texts, progress=progress, desc=desc)


def request_of(call: CallRecord, **changes) -> CallRecord:
    """The call as the router sees it: the request alone, no answer."""
    return CallRecord(request={**call.request, **changes}, agent=call.agent)


ITEMS = ("parcel", "box", "jacket", "tent")
STATES = ("late", "damaged", "lost", "wet")
CITIES = ("paris", "lima", "oslo", "cairo")


def varied_log(seed=0, per_task=30, one_offs=6):
    """tests/test_cluster.py's three narrow tasks and one-offs, with latest turns that vary in their words too
    (not only in numbers, which the task view masks), as real turns do."""
    rng = random.Random(seed)
    calls, truth = [], []
    for n in range(per_task):
        item, state, city = rng.choice(ITEMS), rng.choice(STATES), rng.choice(CITIES)
        calls.append(_call("Classify the shipping complaint into a category. Answer with the category only.",
                           f"My {item} is {state}, sent to {city}", f"{state}_delivery"))
        truth.append("classify")
        calls.append(_call("Extract the invoice fields as JSON with keys amount and currency.",
                           f"Invoice for the {item}: please pay {n} euros from {city}",
                           json.dumps({"amount": n, "currency": "EUR"})))
        truth.append("extract")
        calls.append(_call("Look up the weather using the tool.", f"Will it be {state} weather in {city}?",
                           ("get_weather", {"city": city}), tools=["get_weather", "get_time"]))
        truth.append("weather")
    one_off_calls, _ = synthetic_log(seed=seed, per_task=0, one_offs=one_offs)
    return calls + one_off_calls, truth + ["one_off"] * len(one_off_calls)


@pytest.fixture(scope="module")
def clustered():
    calls, truth = varied_log(seed=0)
    embedder = CountingEmbedder()
    _, model, assignment, _ = cluster_calls(calls, hash_cfg(), embedder=embedder)
    return calls, truth, model, assignment, embedder


def fresh_requests(seed=7):
    """New calls of the same tasks: same prompts and tools, new latest turns (new to the embedder's cache)."""
    calls, truth = varied_log(seed=seed)
    return [request_of(c) for c in calls], truth


def test_unique_signature_assigns_without_embedding_to_the_embedding_paths_cluster(clustered):
    calls, truth, model, assignment, embedder = clustered
    # One signature per narrow task; the one-offs (a prompt each, too few turns) have none.
    assert sorted(model.signatures.values()) == sorted({a for a in assignment if a is not None})
    requests, new_truth = fresh_requests()
    narrow = [(r, t) for r, t in zip(requests, new_truth) if t != "one_off"]
    before = len(embedder.seen)
    fast = [model.fast_assign(r) for r, _ in narrow]
    assert all(f is not None for f in fast)
    assert [model.assign_many([r])[0] for r, _ in narrow] == fast
    assert len(embedder.seen) == before, "the fast path must not embed anything"
    # ... and it lands where the embedding path (fast=False) puts the same request.
    assert model.assign_many([r for r, _ in narrow], fast=False) == fast
    assert len(embedder.seen) > before
    # Each task keeps its own cluster.
    by_task = {t: {f for f, (_, tt) in zip(fast, narrow) if tt == t} for t in ("classify", "extract", "weather")}
    assert all(len(v) == 1 for v in by_task.values()) and len(set().union(*by_task.values())) == 3


def test_unknown_signature_takes_the_embedding_path(clustered):
    _, _, model, _, embedder = clustered
    request = CallRecord(request={"messages": [{"role": "system", "content": "You translate poems into Latin."},
                                               {"role": "user", "content": "Roses are red, violets are blue"}]})
    assert model.fast_assign(request) is None
    before = len(embedder.seen)
    assert model.assign_many([request]) == model.assign_many([request], fast=False)
    assert "user: Roses are red, violets are blue" in embedder.seen[before:]
    # A known prompt with another tool list is another signature, so it is embedded too.
    weather = next(c for c in varied_log()[0] if c.tools)
    assert model.fast_assign(request_of(weather)) is not None
    assert model.fast_assign(request_of(weather, tools=weather.request["tools"][:1])) is None


def test_ambiguous_signature_takes_the_embedding_path():
    # One generic prompt serves two tasks (labels and JSON extraction): fine clusters split them, so the prompt
    # alone cannot say which; the router must look at the turn.
    system = "You are the back-office assistant."
    calls = []
    for n in range(20):
        calls.append(_call(system, f"Classify this complaint: parcel {n} late and box damaged", "late_delivery"))
        calls.append(_call(system, f"Extract the invoice amount and currency: pay {n} euros by friday",
                           json.dumps({"amount": n, "currency": "EUR"})))
    embedder = CountingEmbedder()
    _, model, assignment, _ = cluster_calls(calls, hash_cfg(granularity="fine"), embedder=embedder)
    assert len({a for a in assignment if a}) == 2, assignment
    assert model.signatures == {}
    label = request_of(_call(system, "Classify this complaint: parcel 77 late and box damaged", "x"))
    before = len(embedder.seen)
    assert model.fast_assign(label) is None
    assert model.assign_many([label]) == model.assign_many([label], fast=False)
    assert len(embedder.seen) > before


def test_learn_signatures_refuses_mixed_unclustered_tagged_and_thin_signatures(clustered):
    calls, truth, model, assignment, _ = clustered
    clean = learn_signatures(model, calls, assignment, 5)
    assert clean == model.signatures and len(clean) == 3
    classify = request_signature(calls[truth.index("classify")])
    extract = request_signature(calls[truth.index("extract")])
    weather = request_signature(calls[truth.index("weather")])
    # One extract call in another cluster: ambiguous. One classify call unclustered (a one-off turn of a real
    # task, which the request path still puts in the cluster) is tolerated; three of 30 (10%) are not.
    changed = list(assignment)
    changed[truth.index("extract")] = assignment[truth.index("weather")]
    changed[truth.index("classify")] = None
    table = learn_signatures(model, calls, changed, 5)
    assert extract not in table and table[classify] == clean[classify] and table[weather] == clean[weather]
    for i in [i for i, t in enumerate(truth) if t == "classify"][1:3]:
        changed[i] = None
    assert classify not in learn_signatures(model, calls, changed, 5)
    # The request path has the last word: with request radii of zero it assigns no new turn, so no signature.
    strict = ClusterModel(**{**vars(model), "request_radius": np.zeros_like(model.request_radius)})
    assert learn_signatures(strict, calls, assignment, 5) == {}
    # A tagged call with the weather signature: live requests need not carry the tag, so no fast path.
    tagged = list(calls)
    i = truth.index("weather")
    tagged[i] = CallRecord(request=calls[i].request, response=calls[i].response, metadata={"task_tag": "w"})
    assert weather not in learn_signatures(model, tagged, assignment, 5)
    # Support counts distinct latest turns: 30 calls but fewer distinct turns than min_size -> no fast path.
    assert learn_signatures(model, calls, assignment, 31) == {}
    # Deterministic: the order of the calls does not matter.
    order = list(range(len(calls)))[::-1]
    assert learn_signatures(model, [calls[j] for j in order], [assignment[j] for j in order], 5) == clean


def test_request_signature_ignores_numbers_and_tool_order_but_not_format_or_agent():
    def req(system, tools=(), fmt=None, agent=None):
        body = {"messages": [{"role": "system", "content": system}, {"role": "user", "content": "hi"}],
                "tools": [{"type": "function", "function": {"name": t}} for t in tools]}
        if fmt:
            body["response_format"] = {"type": fmt}
        return CallRecord(request=body, agent=agent)

    base = request_signature(req("Today is 2026-11-22. Triage tickets.", ("b", "a")))
    assert request_signature(req("Today is 2027-01-03. Triage tickets.", ("a", "b"))) == base
    assert request_signature(req("Today is 2026-11-22. Triage tickets.", ("a",))) != base
    assert request_signature(req("Today is 2026-11-22. Triage tickets.", ("a", "b"), fmt="json_object")) != base
    assert request_signature(req("Today is 2026-11-22. Triage tickets.", ("a", "b"), agent="x")) == base
    assert (request_signature(req("Triage.", agent="x"), by="agent")
            != request_signature(req("Triage.", agent="y"), by="agent"))


def test_table_saved_with_the_model_and_older_models_still_load(clustered, tmp_path, workspace):
    _, _, model, _, _ = clustered
    model.save(workspace.path("clusters"))
    loaded = ClusterModel.load(workspace, embedder=HashEmbedder())
    assert loaded.signatures == model.signatures
    requests, truth = fresh_requests(seed=11)
    assign = request_assigner(workspace, embedder=loaded.embedder)
    assert [assign(r.request)[0] for r in requests] == model.assign_many(requests)
    # A model file written before the table existed (no keys in its metadata) loads, with no fast path.
    path = workspace.path("clusters", MODEL_FILE)
    with np.load(path) as data:
        arrays = {k: data[k] for k in data.files}
    meta = json.loads(str(arrays["meta"]))
    for key in ("signatures", "signature_version"):
        meta.pop(key)
    arrays["meta"] = np.array(json.dumps(meta))
    with open(path, "wb") as fh:
        np.savez(fh, **arrays)
    old = ClusterModel.load(workspace, embedder=HashEmbedder())
    assert old.signatures == {}
    assert old.fast_assign(requests[0]) is None
    assert old.assign_many(requests) == model.assign_many(requests, fast=False)


def test_router_assigner_uses_a_bounded_cache(clustered, workspace, monkeypatch):
    _, _, model, _, _ = clustered
    model.save(workspace.path("clusters"))
    monkeypatch.delenv("SLMIGRATE_EMBED_CACHE", raising=False)
    assert request_assigner(workspace).model.embedder.cache_max == 20_000
    monkeypatch.setenv("SLMIGRATE_EMBED_CACHE", "64")
    assert request_assigner(workspace).model.embedder.cache_max == 64


def test_lru_cache_bound_and_knob(monkeypatch):
    emb = CountingEmbedder(dim=16, cache_size=2)
    a = emb.encode(["a", "b"])
    emb.encode(["a"])  # a is now the most recently used
    emb.encode(["c"])  # evicts b
    assert emb.cache_size == 2 and emb.seen == ["a", "b", "c"]
    emb.encode(["a", "b"])
    assert emb.seen == ["a", "b", "c", "b"]
    # A batch larger than the cache is still answered in full and in order.
    out = emb.encode(["x", "y", "z", "a", "x"])
    assert out.shape == (5, 16) and np.array_equal(out[0], out[4]) and np.array_equal(out[3], a[0])
    assert emb.cache_size == 2
    none = CountingEmbedder(cache_size=0)
    none.encode(["q"])
    none.encode(["q"])
    assert none.seen == ["q", "q"] and none.cache_size == 0
    monkeypatch.setenv("SLMIGRATE_EMBED_CACHE", "3")
    assert HashEmbedder().cache_max == 3
    monkeypatch.setenv("SLMIGRATE_EMBED_CACHE", "lots")
    with pytest.raises(SlmigrateError, match="SLMIGRATE_EMBED_CACHE"):
        HashEmbedder()


@pytest.mark.slow
def test_direct_minilm_encode_matches_sentence_transformers():
    from slmigrate.cluster.embed import MiniLMEmbedder

    emb = MiniLMEmbedder(cache_size=0)
    model = emb._load()
    texts = ["user: where is my order 0?", "tools offered: get_weather, get_time", "no answer (failed call)",
             "tool result: " + "the parcel left the depot and is on its way " * 30,  # past 128 word pieces
             "", "user: Ich möchte meine Bestellung stornieren 🙂"]
    reference = model.encode(texts, batch_size=64, convert_to_numpy=True, normalize_embeddings=True)
    together = emb.encode(texts)  # <= DIRECT_MAX_TEXTS: one padded direct batch
    one_by_one = np.stack([emb.encode([t])[0] for t in texts])
    assert np.abs(together - reference).max() < 1e-5
    assert np.abs(one_by_one - reference).max() < 1e-5


@pytest.mark.slow
def test_fast_path_agrees_with_the_embedding_path_on_real_minilm(tmp_path):
    """The examples generator's agent, clustered with the real MiniLM; new requests of another seed."""
    from slmigrate.cluster import cluster
    from slmigrate.collect.importer import import_calls
    from slmigrate.config import load_config
    from slmigrate.curate.run import curate
    from slmigrate.workspace import Workspace

    logs = {}
    # 600 calls: with fewer, the one-off filter and the request radii leave 10-20% of the narrow tasks' calls out,
    # and those signatures rightly stay on the embedding path (only one task qualified at 300 calls).
    for name, seed, n in (("train", 0, 600), ("live", 1, 60)):
        logs[name] = tmp_path / f"{name}.jsonl"
        subprocess.run([sys.executable, str(ROOT / "examples" / "agent_log.py"), "--out", str(logs[name]),
                        "--calls", str(n), "--seed", str(seed)], check=True, capture_output=True)
    ws = Workspace.open(tmp_path / "ws")
    import_calls(ws, [logs["train"]])
    config = load_config(None, {"curate": {"pii": "off"}, "cluster": {"map": False}})
    curate(ws, config.curate)
    cluster(ws, config)
    model = ClusterModel.load(ws)
    assert model.signatures, "the narrow tasks' prompts should be unambiguous"
    live = [json.loads(line) for line in logs["live"].read_text().splitlines()]
    requests = [CallRecord(request=rec["request"]) for rec in live]
    fast = [model.fast_assign(r) for r in requests]
    full = model.assign_many(requests, fast=False)
    hits = [i for i, f in enumerate(fast) if f is not None]
    assert len(hits) >= len(requests) // 2
    agree = sum(fast[i] == full[i] for i in hits) / len(hits)
    assert agree >= 0.95, (agree, [(fast[i], full[i]) for i in hits if fast[i] != full[i]])
    # Open-ended one-off requests never take the fast path.
    tasks = [rec.get("metadata", {}).get("task") for rec in live]
    assert not any(fast[i] is not None for i, t in enumerate(tasks) if t == "open_ended")
