"""`select`: per-cluster hard filters (context, hardware, licence, size), ranking, reasons, and the saved
selection that finetune reads."""

import json

import pytest

from slmigrate import catalog
from slmigrate.cli import main
from slmigrate.config import SelectConfig
from slmigrate.errors import SlmigrateError
from slmigrate.selection.run import load_selection, select

# Shaped like the tau2-bench agent calls (airline / retail / telecom agent turns, p95 prompts of 5-9k tokens,
# short tool-call answers) plus the narrow tasks of examples/agent_log.py, in the cluster stage's layout.
TAU2_LIKE = {"clusters": [
    {"id": "0", "label": "airline agent", "output_kind": "tool_call", "size": 840,
     "prompt_tokens": {"p50": 4100, "p95": 6900}, "completion_tokens": {"p95": 140}},
    {"id": "1", "label": "retail agent", "output_kind": "tool_call", "size": 1310,
     "prompt_tokens": {"p50": 5200, "p95": 8100}, "completion_tokens": {"p95": 130}},
    {"id": "2", "label": "telecom agent", "output_kind": "text", "size": 1070,
     "prompt_tokens": {"p50": 4800, "p95": 9118}, "completion_tokens": {"p95": 133}},
    {"id": "3", "label": "intent", "output_kind": "label", "size": 150,
     "prompt_tokens": {"p95": 140}, "completion_tokens": {"p95": 5}},
    {"id": "4", "label": "extract", "output_kind": "json", "size": 120,
     "prompt_tokens": {"p95": 130}, "completion_tokens": {"p95": 45}},
]}


@pytest.fixture
def ws(workspace):
    workspace.path("clusters", "clusters.json").write_text(json.dumps(TAU2_LIKE))
    workspace.store  # a real workspace has its store: the CLI opens it with create=False
    return workspace


def _all_reasoned(result):
    names = {e.name for e in catalog.load().values()}
    for c in result.clusters:
        seen = [r["name"] for r in c["candidates"]] + [r["name"] for r in c["rejected"]]
        assert sorted(seen) == sorted(names), c["cluster"]  # every model is either chosen or rejected
        for r in c["candidates"] + c["rejected"]:
            assert isinstance(r["reason"], str) and len(r["reason"]) > 20 and "\n" not in r["reason"]


def test_cpu_only_picks_only_models_that_fit_24_gib_for_lora(ws):
    result = select(ws, SelectConfig(cpu_only=True, license="any", top=5))
    entries = catalog.load()
    _all_reasoned(result)
    assert result.hardware == {"device": "cpu", "memory_gib": 24.0, "policy": "LoRA fp32 on CPU"}
    for c in result.clusters:
        assert c["candidates"], c
        for r in c["candidates"]:
            fp = entries[r["name"]].footprint(c["seq_len"])
            assert r["method"] == "lora" and r["device"] == "cpu"
            assert fp.lora_cpu <= 24 and fp.serve_cpu <= 24 and r["train_memory_gib"] == round(fp.lora_cpu, 2)
            assert entries[r["name"]].params < 5e9
        big = {r["name"]: r["reason"] for r in c["rejected"] if entries[r["name"]].params > 7e9}
        assert big and all("GiB" in why for why in big.values())
    # long agent prompts exceed SmolLM2's 8K window; the short intent cluster does not
    by_id = {c["cluster"]: c for c in result.clusters}
    telecom = {r["name"]: r["reason"] for r in by_id["2"]["rejected"]}
    assert "context window 8,192 < p95 prompt + completion 9,251 tokens" in telecom["smollm2-135m-instruct"]
    assert "smollm2-135m-instruct" not in {r["name"] for r in by_id["3"]["rejected"]
                                           if "context" in r["reason"]}


def test_gpu_80_admits_7_to_8b_models_and_small_gpus_use_qlora(ws):
    entries = catalog.load()
    result = select(ws, SelectConfig(gpu_memory_gb=80, license="any", top=30), force=True)
    _all_reasoned(result)
    airline = result.clusters[0]
    admitted = {r["name"]: r for r in airline["candidates"]}
    large = [n for n in admitted if 7e9 <= entries[n].params <= 8.5e9]
    assert len(large) >= 4  # mistral-7b, qwen2.5-7b, llama-3.1-8b, granite-8b, xlam-8b
    assert all(admitted[n]["train_memory_gib"] <= 80 for n in large)
    # 12 GB: the 7-8B models only get in through QLoRA on 4-bit weights
    small_gpu = select(ws, SelectConfig(gpu_memory_gb=12, license="any", top=30), force=True)
    got = {r["name"]: r for r in small_gpu.clusters[3]["candidates"]}
    for name in ("qwen2.5-7b-instruct", "llama-3.1-8b-instruct", "mistral-7b-instruct-v0.3"):
        assert got[name]["method"] == "qlora" and "QLoRA 4-bit needs" in got[name]["reason"]
    assert got["qwen2.5-0.5b-instruct"]["method"] == "lora"


def test_licence_policy_and_max_params(ws):
    result = select(ws, SelectConfig(cpu_only=True, license="permissive", max_params=2e9, top=30))
    entries = catalog.load()
    for c in result.clusters:
        for r in c["candidates"]:
            assert entries[r["name"]].permissive and entries[r["name"]].params <= 2e9
        reasons = {r["name"]: r["reason"] for r in c["rejected"]}
        assert "licence CC-BY-NC-4.0 (no commercial use)" in reasons["xlam-2-1b-fc-r"]
        assert "> --max-params" in reasons["phi-4-mini-instruct"]
    only = select(ws, SelectConfig(cpu_only=True, license="MIT,apache-2.0", top=30), force=True)
    assert {entries[r["name"]].license for c in only.clusters for r in c["candidates"]} <= {"MIT", "Apache-2.0"}
    with pytest.raises(SlmigrateError, match="unknown licence"):
        select(ws, SelectConfig(license="GPL-9"), force=True)
    with pytest.raises(SlmigrateError, match="contradict"):
        select(ws, SelectConfig(cpu_only=True, gpu_memory_gb=24), force=True)


def test_ranking_follows_the_task(ws):
    result = select(ws, SelectConfig(gpu_memory_gb=80, license="any", top=30))
    by_id = {c["cluster"]: c for c in result.clusters}
    for c in result.clusters:
        scores = [r["score"] for r in c["candidates"]]
        assert scores == sorted(scores, reverse=True) and [r["rank"] for r in c["candidates"]] == list(
            range(1, len(scores) + 1))
    tool = {r["name"]: r for r in by_id["0"]["candidates"]}
    label = {r["name"]: r for r in by_id["3"]["candidates"]}
    # tool calling values BFCL + native tools: Llama 3.2 3B (BFCL 67) beats Gemma 2 2B (no tools, no BFCL)
    assert tool["llama-3.2-3b-instruct"]["score"] > tool["gemma-2-2b-it"]["score"]
    assert "BFCL 67" in tool["llama-3.2-3b-instruct"]["reason"] and "native tools" in tool["qwen3-4b"]["reason"]
    # narrow labels penalise size twice as hard as tool calls: a small model wins the label task, while the
    # tool-calling task goes to a model with native tools and a published BFCL figure
    big = "qwen2.5-7b-instruct"
    assert label[big]["size_penalty"] == pytest.approx(2 * tool[big]["size_penalty"], abs=0.02)
    assert catalog.load()[by_id["3"]["choice"]].params < 1e9
    top_tool = by_id["0"]["candidates"][0]
    assert "native tools" in top_tool["reason"] and "BFCL n/a" not in top_tool["reason"]


def test_selection_is_saved_with_manifest_and_rerun_is_skipped(ws):
    everywhere = lambda name: "local"  # noqa: E731 - every model's weights on this machine
    first = select(ws, SelectConfig(cpu_only=True), weights_of=everywhere)
    saved = load_selection(ws)
    assert saved["clusters"][0]["choice"] == saved["clusters"][0]["candidates"][0]["name"]
    assert saved["clusters"][0]["choice_reason"] == "rank 1, weights local"
    assert saved["config"]["cpu_only"] is True and ws.manifest("select")["counts"]["clusters"] == 5
    again = select(ws, SelectConfig(cpu_only=True), weights_of=everywhere)
    assert again.fresh is True and again.to_dict()["created"] == first.to_dict()["created"]
    changed = select(ws, SelectConfig(cpu_only=True, top=1), weights_of=everywhere)
    assert changed.fresh is False and all(len(c["candidates"]) <= 1 for c in changed.clusters)


def test_workspace_catalog_entry_takes_part(ws):
    ws.path("catalog.json").write_text(json.dumps([
        {"name": "qwen2.5-0.5b-instruct", "scores": {"bfcl": {"value": 90.0, "source": "https://example.org/x"}}}]))
    result = select(ws, SelectConfig(cpu_only=True, license="any"), weights_of=lambda name: "hub")
    assert result.clusters[0]["choice"] == "qwen2.5-0.5b-instruct"
    assert "BFCL 90" in result.clusters[0]["candidates"][0]["reason"]


def test_choice_falls_back_to_a_model_whose_weights_are_here(ws):
    offline = {"smollm2-135m-instruct": "builtin"}.get  # the offline machine: only the built-in GGUF
    result = select(ws, SelectConfig(cpu_only=True, license="any", top=2), weights_of=offline)
    by_id = {c["cluster"]: c for c in result.clusters}
    intent = by_id["3"]  # SmolLM2 is in the top 2 for the label task
    assert intent["choice"] == "smollm2-135m-instruct"
    extract = by_id["4"]
    assert extract["choice"] == "smollm2-135m-instruct"
    for c in (intent, extract):
        chosen = next(r for r in c["candidates"] if r["name"] == c["choice"])
        assert chosen["weights"] == "builtin"
        if chosen["rank"] > 1:
            assert "ranks higher but its weights are not on this machine" in c["choice_reason"]
    # telecom prompts (9K tokens) exceed SmolLM2's context: nothing obtainable, so the top model stays the
    # choice and the reason says how to get it
    telecom = by_id["2"]
    assert telecom["choice"] == telecom["candidates"][0]["name"]
    assert "models pull" in telecom["choice_reason"]
    # a fallback beyond --top is added to the candidates and leaves the rejections
    narrow = select(ws, SelectConfig(cpu_only=True, license="any", top=1), weights_of=offline, force=True)
    fallbacks = 0
    for c in narrow.clusters:
        if c["choice"] == "smollm2-135m-instruct" and c["candidates"][0]["name"] != c["choice"]:
            assert c["candidates"][-1]["fallback"] is True and len(c["candidates"]) == 2
            assert "smollm2-135m-instruct" not in {r["name"] for r in c["rejected"]}
            fallbacks += 1
    assert fallbacks >= 1  # the airline agent turns (retail needs 8,230 tokens: beyond SmolLM2's 8K window)


def test_reads_the_cluster_stage_token_layout(workspace):
    workspace.path("clusters", "clusters.json").write_text(json.dumps({"clusters": [
        {"id": "c3", "group": "airline", "output_kind": "tool_call", "size": 40,
         "prompt_tokens": {"total": 1, "p50": 4000, "p95": 9000}, "completion_tokens": {"p50": 50, "p95": 120}}]}))
    (c,) = select(workspace, SelectConfig(cpu_only=True)).clusters
    assert c["seq_len"] == 9120 and c["tokens_known"] and c["label"] == "airline"


def test_missing_clusters_is_a_clear_error(workspace):
    with pytest.raises(SlmigrateError, match="run `slmigrate cluster` first"):
        select(workspace, SelectConfig())


def test_cli_select_json_and_table(ws, capsys):
    root = str(ws.root)
    assert main(["select", "-w", root, "--gpu-memory", "24", "--license", "any", "--max-params", "4B",
                 "--top", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["hardware"]["device"] == "cuda"
    assert all(len([r for r in c["candidates"] if not r.get("fallback")]) == 2 for c in out["clusters"])
    assert out["config"]["max_params"] == 4e9
    assert main(["select", "-w", root, "--cpu-only", "--force"]) == 0
    text = capsys.readouterr().out
    assert "rejected" in text and "LoRA fp32 on CPU" in text
    assert main(["select", "-w", root, "--max-params", "lots"]) == 1


def test_probe_scores_blend_into_the_ranking(ws):
    seen = []

    def fake_probe(ws_, cluster, names, n):
        seen.append((cluster["cluster"], tuple(names), n))
        # pretend only the last-ranked candidate is local, and it is perfect few-shot
        return {names[-1]: {"calls": n, "metric": "exact", "zero_shot": 0.5, "few_shot": 1.0},
                names[0]: {"skipped": True, "reason": "weights not available locally"}}

    result = select(ws, SelectConfig(cpu_only=True, license="any", top=3, probe=4), probe_runner=fake_probe,
                    weights_of=lambda name: "local")
    assert len(seen) == 5 and all(n == 4 and len(names) == 3 for _, names, n in seen)
    for c, (_, names, _) in zip(result.clusters, seen):
        probed = {r["name"]: r for r in c["candidates"]}[names[-1]]
        assert probed["score"] == round(0.5 * probed["published_score"] + 50.0, 2)
        assert "probe on 4 calls (exact): zero-shot 0.50, few-shot 1.00" in probed["reason"]
        assert {r["name"]: r for r in c["candidates"]}[names[0]]["probe"]["skipped"] is True
        assert c["choice"] == c["candidates"][0]["name"]
        assert [r["rank"] for r in c["candidates"]] == [1, 2, 3]
    assert "blended" in result.probe


def test_probe_without_curated_calls_is_a_clear_error(ws):
    with pytest.raises(SlmigrateError, match="needs the curated calls"):
        select(ws, SelectConfig(cpu_only=True, probe=2))


@pytest.mark.slow
def test_probe_runs_the_offline_smollm2_on_validation_calls(workspace):
    """Real probe: SmolLM2-135M (the built-in offline model) on intent calls of the example log."""
    import importlib.util

    from conftest import ROOT
    from slmigrate.curate.dataset import to_row, write_curated
    from slmigrate.record import CallRecord

    spec = importlib.util.spec_from_file_location("agent_log", ROOT / "examples" / "agent_log.py")
    agent_log = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(agent_log)
    intents = [r for r in agent_log.generate(120, seed=3) if r["metadata"]["task"] == "intent"][:16]
    rows, assign = [], {}
    for i, r in enumerate(intents):
        call = CallRecord(request=r["request"], response=r["response"], input_id=r["id"],
                          timestamp=r["timestamp"], session=r["metadata"]["session"]).finalise()
        rows.append(to_row(call, "validation" if i < 2 else "train"))
        assign[call.id] = "1"
    write_curated(workspace, rows, {}, {})
    workspace.store.set_clusters(assign)
    workspace.path("clusters", "clusters.json").write_text(json.dumps({"clusters": [
        {"id": "1", "label": "intent", "output_kind": "label", "size": 16,
         "prompt_tokens": {"p95": 150}, "completion_tokens": {"p95": 5}}]}))
    result = select(workspace, SelectConfig(cpu_only=True, top=2, probe=2, max_params=4e8))
    cands = {r["name"]: r for r in result.clusters[0]["candidates"]}
    probed = cands["smollm2-135m-instruct"]["probe"]
    assert probed["calls"] == 2 and probed["metric"] == "label_exact"
    # exact match on 2 calls: each score is 0, 1/2 or 1 (a score averaged over anything else is a wrong count)
    assert probed["zero_shot"] in (0.0, 0.5, 1.0) and probed["few_shot"] in (0.0, 0.5, 1.0)
    assert "probe on 2 calls" in cands["smollm2-135m-instruct"]["reason"]
    others = [r for n, r in cands.items() if n != "smollm2-135m-instruct"]
    assert all(r["probe"]["skipped"] for r in others)  # no other weights on this machine
