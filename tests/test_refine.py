"""refine: new calls with a new task kind and a drifted cluster give a plan that proposes the new cluster and
retrains the drifted one; an unchanged workspace gives "nothing to do".

The workspace is built by the real stages (examples log -> import -> curate -> cluster with the real MiniLM).
Training and evaluating a model is out of scope here (finetune/evaluate have their own tests), so the deployed
adapter is declared in ``evals/latest.json`` and the fresh-call metric is injected.
"""

import json
import subprocess
import sys

import pytest

from conftest import ROOT
from slmigrate.config import load_config
from slmigrate.record import CallRecord
from slmigrate.refine import plan_refine, refine

pytestmark = pytest.mark.slow


ITEMS = ("parcel", "order", "package", "delivery", "shipment", "gift box")
PROBLEMS = ("arrived late and the box was damaged", "never arrived at my house", "was left at the wrong door",
            "came with a missing item")


def _translation_calls(n: int) -> list[CallRecord]:
    """Distinct messages (curate drops near-duplicates, as it would in `slmigrate curate`) of one new task."""
    out = []
    for i in range(n):
        item, problem = ITEMS[i % len(ITEMS)], PROBLEMS[(i // len(ITEMS)) % len(PROBLEMS)]
        text = f"My {item} number {1000 + i} {problem}, what can you do?"
        out.append(CallRecord(
            request={"model": "gpt-4o", "messages": [
                {"role": "system", "content": "Translate the customer's message into French. Answer with the "
                                              "translation only."},
                {"role": "user", "content": text}]},
            response={"model": "gpt-4o", "choices": [{"index": 0, "finish_reason": "stop", "message": {
                "role": "assistant", "content": f"Mon colis numero {1000 + i} est arrive en retard et la boite "
                                                "etait endommagee, que pouvez-vous faire ?"}}],
                      "usage": {"prompt_tokens": 40, "completion_tokens": 25}},
            session=f"translate-{i}", timestamp=f"2025-06-01T10:{i % 60:02d}:00Z", agent="acme-support"))
    return out


def _relabelled_intents(ws, n: int) -> list[CallRecord]:
    """Intent calls whose answers now use new label names (the agent's taxonomy changed): drift."""
    from slmigrate.curate.dataset import load_curated

    calls = [c for c in load_curated(ws) if "Classify the customer's message" in str(c.messages[0]["content"])][:n]
    out = []
    for i, c in enumerate(calls):
        answer = "ORDER/" + c.answer["content"].upper()
        out.append(CallRecord(request=c.request, response={**c.response, "choices": [
            {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": answer}}]},
            session=f"drift-{i}", timestamp=f"2025-06-02T10:{i % 60:02d}:00Z", agent="acme-support"))
    return out


@pytest.fixture(scope="module")
def pipeline_ws(tmp_path_factory):
    from slmigrate.cluster import cluster
    from slmigrate.collect.importer import import_calls
    from slmigrate.curate.run import curate
    from slmigrate.workspace import Workspace

    tmp = tmp_path_factory.mktemp("refine")
    log = tmp / "agent_log.jsonl"
    subprocess.run([sys.executable, str(ROOT / "examples" / "agent_log.py"), "--out", str(log), "--calls", "300"],
                   check=True, capture_output=True)
    ws = Workspace.open(tmp / "ws")
    import_calls(ws, [log])
    # The configured split shares (no test split sized per task): the drift test below counts on the intent task
    # keeping most of its calls for training, so 20 fresh calls are drift, not growth.
    config = load_config(None, {"curate": {"pii": "off", "test_calls_per_task": 0}})
    curate(ws, config.curate)
    cluster(ws, config)
    return ws, config


def _deploy(ws, cluster_id: str) -> None:
    """Declare the cluster migrated with an adapter, as `slmigrate evaluate` would have recorded it."""
    adapter = ws.path("adapters", cluster_id, "smollm2-135m-instruct")
    adapter.mkdir(parents=True, exist_ok=True)
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "smollm2-135m-instruct",
                                                             "r": 8}))
    ws.path("evals", "latest.json").write_text(json.dumps({"clusters": [{
        "cluster": cluster_id, "adapter": str(adapter), "kind": "label", "primary_metric": "label_exact",
        "decision": {"migrate": True}, "variants": {"finetuned": {"primary": 0.97}}}]}))


def test_new_task_and_drift_yield_a_plan_and_unchanged_yields_nothing(pipeline_ws):
    ws, config = pipeline_ws
    assert plan_refine(ws, config)["nothing_to_do"] is True

    from slmigrate.curate.dataset import load_curated

    membership = ws.store.clusters_of()
    intent_call = next(c for c in load_curated(ws) if "Classify the customer's message" in
                       str(c.messages[0]["content"]))
    intent = membership[intent_call.id]
    assert intent is not None
    _deploy(ws, intent)

    ws.store.insert_calls(_translation_calls(24) + _relabelled_intents(ws, 20))
    seen = {}

    def metric(deployment, calls):
        # The deployed intent model knows the old labels: score the fresh answers against them.
        seen[deployment.cluster] = len(calls)
        return sum(c.answer["content"].islower() for c in calls) / len(calls)

    plan = refine(ws, config, dry_run=True, metric_fn=metric)
    assert plan["nothing_to_do"] is False and plan["dry_run"] is True
    assert list(seen) == [intent] and seen[intent] >= 15  # nearly all relabelled calls still look like intents
    actions = {(a["action"], a["cluster"]) for a in plan["actions"]}
    assert ("retrain", intent) in actions, plan["actions"]
    assert ("propose_cluster", "new-1") in actions, plan
    assert len(plan["proposed"]) == 1 and plan["proposed"][0]["size"] >= 20  # one task, proposed once
    assert set(plan["clusters"]) == {intent}  # the translation calls belong to no existing cluster
    assert plan["clusters"][intent]["metric"] == 0.0
    # A dry run changes nothing: the same plan again.
    assert refine(ws, config, dry_run=True, metric_fn=metric)["actions"] == plan["actions"]

    # Carried out (with a model that still scores well, so nothing is retrained), the next run has nothing to do.
    done = refine(ws, config, metric_fn=lambda d, calls: 1.0)
    assert not [a for a in done["actions"] if a["action"] == "retrain"]
    again = refine(ws, config, metric_fn=lambda d, calls: 1.0)
    assert again["nothing_to_do"] is True


def test_router_answers_are_not_learned_from(pipeline_ws):
    ws, config = pipeline_ws
    [call] = _translation_calls(1)
    call.metadata = {"route": {"answered_by": "slm", "cluster": "x"}}
    call.session, call.timestamp = "router-1", "2025-07-01T00:00:00Z"  # not a duplicate of an earlier call
    assert ws.store.insert_calls([call]) == (1, 0)
    plan = refine(ws, config, dry_run=True, metric_fn=lambda d, calls: 1.0)
    assert plan["answered_by_slm"] == 1 and plan["nothing_to_do"] is True


def test_a_task_the_live_guard_demoted_is_retrained(pipeline_ws):
    """The router's live guard took a task back from the small model (serve/guard.json): refine retrains it even
    when the fresh calls alone would not ask for it (the metric holds, the data barely grew)."""
    import json

    from slmigrate.curate.dataset import load_curated
    from slmigrate.serve.guard import GUARD

    ws, config = pipeline_ws
    membership = ws.store.clusters_of()
    intent = membership[next(c for c in load_curated(ws) if "Classify the customer's message" in
                             str(c.messages[0]["content"])).id]
    _deploy(ws, intent)
    fresh = _relabelled_intents(ws, 4)
    for i, call in enumerate(fresh):  # not duplicates of the earlier test's drift calls
        call.session, call.timestamp = f"guarded-{i}", f"2025-07-02T10:0{i}:00Z"
    assert ws.store.insert_calls(fresh) == (4, 0)
    quiet = refine(ws, config, dry_run=True, metric_fn=lambda d, calls: 1.0)
    assert ("retrain", intent) not in {(a["action"], a["cluster"]) for a in quiet["actions"]}
    ws.path(*GUARD).parent.mkdir(parents=True, exist_ok=True)
    ws.path(*GUARD).write_text(json.dumps({"tasks": {intent: {
        "evaluation_run": None, "demoted": True, "reason": "live agreement upper bound 0.41 < 0.90"}}}))
    plan = refine(ws, config, dry_run=True, metric_fn=lambda d, calls: 1.0)
    [why] = [a["why"] for a in plan["actions"] if a["action"] == "retrain" and a["cluster"] == intent]
    assert "live guard demoted it (live agreement upper bound 0.41 < 0.90)" in why
