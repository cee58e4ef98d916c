"""Evaluate end to end on a tiny random Llama: variants, decision, plan, stored results, the CLI gate, the judge."""

import json
from pathlib import Path

import numpy as np
import pytest

from slmigrate.config import EvaluateConfig
from slmigrate.errors import GateFailed
from slmigrate.evaluate import run as E


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """On a shared 2-core box, torch's second thread spin-waits against other processes (15x slower here)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --- decision and gate (pure) ------------------------------------------------------------------------------

def _result(*rows):
    return {"clusters": [
        {"cluster": cid, "primary_metric": "exact", "variants": {"finetuned": {"primary": value}},
         "decision": {"migrate": migrate, "previously_migrated": before}}
        for cid, value, migrate, before in rows]}


def test_gate_fails_only_for_marked_clusters_below_the_bar():
    res = _result(("a", 0.95, True, False), ("b", 0.40, False, False))
    assert E.gate(res, 0.9) == []
    assert [f["cluster"] for f in E.gate(res, 0.97)] == ["a"]
    E.check_gate(res, None)
    with pytest.raises(GateFailed) as info:
        E.check_gate(res, 0.97)
    assert info.value.exit_code == 3 and "a: exact = 0.950" in str(info.value)


def test_gate_catches_a_regression_of_a_previously_migrated_cluster():
    # "c" migrated last time; now it scores under the threshold, so it is no longer marked - still a failure.
    res = _result(("c", 0.70, False, True))
    assert [f["cluster"] for f in E.gate(res, 0.9)] == ["c"]


def _finetuned(scores, metric="json_exact", p50=None):
    """A fine-tuned variant's result as evaluate_variant writes it: point estimate and 95% interval per metric."""
    from slmigrate.stats import estimate

    found = estimate(scores)
    return {"primary": found["score"] if found else None, "intervals": {metric: found},
            "efficiency": {"latency_p50_ms": p50, "latency_p95_ms": p50 and 2 * p50}}


def test_decide_refuses_a_passing_point_estimate_whose_lower_bound_fails():
    """9 of 10 is 0.900 >= 0.90 on the point estimate (the demo's old "yes"); its 95% interval is 0.596-0.982."""
    nine = _finetuned([1.0] * 9 + [0.0])
    d = E.decide("json", 10, nine, "json_exact", 0.9, 5)
    assert nine["primary"] == 0.9 and d["migrate"] is False
    assert d["value"] == 0.9 and d["lower"] == pytest.approx(0.5958, abs=1e-4)
    assert d["upper"] == pytest.approx(0.9821, abs=1e-4) and d["n"] == 10 and d["method"] == "wilson"
    # 10 calls cannot decide 0.9 at all: that is its own outcome, with the calls it needs (35 in all)
    assert d["outcome"] == "not_enough_evidence" and d["needs_calls"] == 25
    assert d["why"] == d["reason"] and "not enough evidence: needs 25 more calls" in d["why"]
    # With the calls a 0.9 bound needs, a point estimate just over the threshold still stays: 36 of 40 = 0.90
    forty = E.decide("json", 40, _finetuned([1.0] * 36 + [0.0] * 4), "json_exact", 0.9, 5)
    assert forty["outcome"] == "stay" and forty["migrate"] is False and forty["lower"] < 0.9 <= forty["value"]
    assert "lower bound" in forty["why"]
    # 60 of 60: lower bound 0.940 >= 0.9 migrates
    sixty = E.decide("json", 60, _finetuned([1.0] * 60), "json_exact", 0.9, 5)
    assert sixty["outcome"] == "migrate" and sixty["migrate"] is True and sixty["lower"] >= 0.9


def test_decide_not_enough_evidence_counts_the_calls_needed():
    from slmigrate.stats import calls_needed, wilson

    # smallest n' with a Wilson lower bound of n'/n' >= t, minus n
    for t in (0.5, 0.8, 0.9, 0.95):
        need = calls_needed(t)
        assert wilson(need, need)[0] >= t > wilson(need - 1, need - 1)[0]
    assert (calls_needed(0.9), calls_needed(0.95), calls_needed(1.0)) == (35, 73, None)
    d = E.decide("label", 20, _finetuned([1.0] * 20, "label_exact"), "label_exact", 0.95, 5)
    assert d["outcome"] == "not_enough_evidence" and d["needs_calls"] == 73 - 20
    # min_test_calls above what the threshold needs wins
    d = E.decide("label", 40, _finetuned([1.0] * 40, "label_exact"), "label_exact", 0.9, 50)
    assert d["outcome"] == "not_enough_evidence" and d["needs_calls"] == 10
    # clearly failing on few calls is a "stay", not a call for more evidence: more calls would not help
    bad = E.decide("json", 8, _finetuned([0.0] * 8), "json_exact", 0.9, 5)
    assert bad["outcome"] == "stay" and bad["needs_calls"] is None and "upper bound" in bad["why"]
    # a threshold of 1.0 is out of reach of any lower bound
    assert E.decide("json", 500, _finetuned([1.0] * 500), "json_exact", 1.0, 5)["outcome"] == "not_enough_evidence"


def test_decide_uses_a_bootstrap_for_graded_metrics():
    graded = [0.97, 0.99, 1.0, 0.98] * 15
    d = E.decide("json", 60, _finetuned(graded, "field_accuracy"), "field_accuracy", 0.9, 5)
    assert d["method"] == "bootstrap" and d["outcome"] == "migrate" and d["lower"] < d["value"] < d["upper"]
    again = E.decide("json", 60, _finetuned(graded, "field_accuracy"), "field_accuracy", 0.9, 5)
    assert again["lower"] == d["lower"]  # a fixed seed: the same scores give the same bound


def test_decide_without_a_model_or_a_figure():
    assert "finetune" in E.decide("json", 10, None, "json_exact", 0.9, 5)["reason"]
    assert E.decide("json", 10, {"primary": None}, "json_exact", 0.9, 5)["migrate"] is False
    assert "interval" in E.decide("json", 10, {"primary": 0.95}, "json_exact", 0.9, 5)["why"]


def test_max_latency_ratio_keeps_a_slow_model_on_the_llm():
    ft = _finetuned([1.0] * 60, p50=1122.0)
    llm = {"latency_p50_ms": 557.0}
    unchecked = E.decide("json", 60, ft, "json_exact", 0.9, 5, llm=llm)
    assert unchecked["migrate"] is True  # default: shown, not checked
    assert unchecked["latency"] == {"slm_p50_ms": 1122.0, "slm_p95_ms": 2244.0, "llm_p50_ms": 557.0,
                                    "ratio": pytest.approx(2.014, abs=1e-3), "max_ratio": None}
    slow = E.decide("json", 60, ft, "json_exact", 0.9, 5, llm=llm, max_latency_ratio=1.5)
    assert slow["outcome"] == "stay" and slow["migrate"] is False
    assert "too slow" in slow["why"] and "2.01x" in slow["why"]
    assert E.decide("json", 60, ft, "json_exact", 0.9, 5, llm=llm, max_latency_ratio=2.5)["migrate"] is True
    # no recorded LLM latency: nothing to compare, said so
    blind = E.decide("json", 60, ft, "json_exact", 0.9, 5, llm={"latency_p50_ms": None}, max_latency_ratio=1.0)
    assert blind["migrate"] is True and "latency not checked" in blind["why"]


def test_icl_examples_are_inserted_after_the_system_prompt_in_answer_form():
    from slmigrate.curate.dataset import CuratedCall

    ex = CuratedCall(request={"messages": [{"role": "user", "content": "weather in Rome"}]},
                     response={"choices": [{"message": {"role": "assistant", "content": None, "tool_calls": [
                         {"type": "function", "function": {"name": "w", "arguments": '{"city": "Rome"}'}}]}}]},
                     id="ex1")
    req = {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "weather in Oslo"}],
           "tools": [{"type": "function", "function": {"name": "w"}}]}
    out = E.with_examples(req, [ex])
    assert [m["role"] for m in out["messages"]] == ["system", "user", "assistant", "user"]
    assert out["messages"][1]["content"] == "weather in Rome"
    assert out["messages"][2]["content"] == '<tool_call>{"name": "w", "arguments": {"city": "Rome"}}</tool_call>'
    assert out["tools"] == req["tools"] and req["messages"][1]["content"] == "weather in Oslo"
    picked = E.icl_examples([ex] * 1, 3, 0)
    assert [p.id for p in picked] == ["ex1"]


# --- a workspace with two clusters on a tiny model ---------------------------------------------------------

LABELS = 24
# 8 label test calls: a 95% lower bound reaches 0.9 only from 35 calls, so these tests decide on a smaller bar
SMALL_BAR = {"threshold": {"label": 0.6, "text": 0.9}, "min_test_calls": 5}
SMALL_BAR_TOML = 'threshold = {label = 0.6, text = 0.9}\nmin_test_calls = 5\n'
TEXTS = 12


def _call(i, system, user, answer, usage=(40, 2)):
    from slmigrate.record import CallRecord

    return CallRecord(
        request={"model": "gpt-4o", "messages": [{"role": "system", "content": system},
                                                 {"role": "user", "content": user}]},
        response={"model": "gpt-4o", "choices": [{"message": {"role": "assistant", "content": answer},
                                                  "finish_reason": "stop"}],
                  "usage": {"prompt_tokens": usage[0], "completion_tokens": usage[1]}},
        session=f"s{i}", timestamp=f"2025-01-01T00:00:{i:02d}Z", latency_ms=900.0 + i, source="import",
    ).finalise()


def _train_constant_adapter(base_dir, out_dir, target: str, prompts: list[str], steps: int = 60):
    """A LoRA adapter that makes the tiny model answer ``target``: a real PEFT folder, trained in seconds."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base_dir)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir),
                           LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "o_proj"],
                                      modules_to_save=["lm_head"]))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    torch.manual_seed(0)
    for step in range(steps):
        p = prompts[step % len(prompts)]
        ids_p = tok(p, add_special_tokens=False)["input_ids"]
        ids_t = tok(target + "<|im_end|>", add_special_tokens=False)["input_ids"]
        ids = torch.tensor([ids_p + ids_t])
        labels = torch.tensor([[-100] * len(ids_p) + ids_t])
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(out_dir)
    return float(loss.detach())


@pytest.fixture(scope="module")
def two_cluster_ws(tmp_path_factory):
    from tiny_model import tiny_model_dir

    from slmigrate.curate.dataset import to_row, write_curated
    from slmigrate.evaluate.run import render
    from slmigrate.workspace import Workspace

    root = tmp_path_factory.mktemp("eval")
    base = tiny_model_dir(root)
    ws = Workspace.open(root / "ws")
    label_calls = [_call(i, "Route the ticket.", f"ticket {i}: I want my money back", "refund")
                   for i in range(LABELS)]
    text_calls = [_call(30 + i, "Write a reply.", f"thank customer {i}",
                        f"Dear customer {i}, thank you for your order, we appreciate it.", (60, 15))
                  for i in range(TEXTS)]
    ws.store.insert_calls(label_calls + text_calls)
    # The first two thirds of each task train, the rest is the held-out test split.
    rows = [to_row(c, "train" if i < LABELS * 2 // 3 else "test") for i, c in enumerate(label_calls)]
    rows += [to_row(c, "train" if i < TEXTS * 2 // 3 else "test") for i, c in enumerate(text_calls)]
    write_curated(ws, rows, {}, {})
    ws.store.set_clusters({**{c.id: "c0" for c in label_calls}, **{c.id: "c1" for c in text_calls}})
    (ws.path("clusters") / "clusters.json").write_text(json.dumps({"clusters": [
        {"id": "c0", "label": "route ticket", "output_kind": "label", "replaceability": 0.9,
         "likely_replaceable": True, "reasons": ["short answers"]},
        {"id": "c1", "label": "write reply", "output_kind": "text", "replaceability": 0.3,
         "likely_replaceable": False, "reasons": ["long free text"]},
    ], "overall": {"replaceable_clusters": ["c0"], "call_share": 0.6667, "cost_share": 0.5}}))
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    prompts = [render(tok, c.request) for c in label_calls[: LABELS * 2 // 3]]
    loss = _train_constant_adapter(base, ws.path("adapters", "c0", "tiny-llama"), "refund", prompts)
    assert loss < 0.5, loss
    return ws, base, label_calls, text_calls


def test_evaluate_end_to_end(two_cluster_ws):
    from fakes import HashEmbedder

    ws, base, label_calls, text_calls = two_cluster_ws
    cfg = EvaluateConfig(model=str(base), embedder="hash", batch_size=4, device="cpu", **SMALL_BAR)
    res = E.evaluate(ws, cfg, embedder=HashEmbedder())
    by = {r["cluster"]: r for r in res.clusters}
    lbl, txt = by["c0"], by["c1"]
    assert lbl["kind"] == "label" and lbl["test_calls"] == LABELS - LABELS * 2 // 3
    assert lbl["variants"]["finetuned"]["primary"] == 1.0
    assert lbl["variants"]["base"]["primary"] == 0.0  # a random model does not say "refund" by chance
    assert set(lbl["variants"]) == {"base", "icl", "finetuned"}
    assert lbl["variants"]["icl"]["efficiency"]["mean_prompt_tokens"] > \
        lbl["variants"]["base"]["efficiency"]["mean_prompt_tokens"]
    assert lbl["decision"]["migrate"] is True and lbl["decision"]["outcome"] == "migrate"
    # 8 of 8: the lower bound 8 / (8 + 1.96^2) = 0.676 clears the small bar of 0.6, and the decision says so
    assert lbl["decision"]["lower"] == pytest.approx(0.6756, abs=1e-3) and lbl["decision"]["n"] == 8
    assert lbl["variants"]["finetuned"]["intervals"]["label_exact"]["interval"] == "wilson"
    assert txt["decision"]["migrate"] is False and txt["variants"]["finetuned"]["skipped"]
    assert {"rouge_l", "embedding_similarity"} <= set(txt["variants"]["base"]["metrics"])
    eff = lbl["variants"]["finetuned"]["efficiency"]
    assert eff["latency_p50_ms"] > 0 and eff["tokens_per_s"] > 0 and eff["peak_memory_mb"] > 0
    # the plan's latency is what a served request waits: the fine-tuned model's calls one at a time, as the
    # router generates them, not the wall time of the batch of 4 a call was scored in
    assert eff["latency_of"] == "8 calls one at a time" and eff["batch_latency_p50_ms"] > 0
    assert lbl["variants"]["base"]["efficiency"]["latency_of"] == "batches of 4"
    assert lbl["llm"]["latency_p50_ms"] >= 900 and lbl["llm"]["cost_per_1k_usd"] == pytest.approx(
        1000 * (40 * 2.5 + 2 * 10) / 1e6)
    assert eff["cost_per_1k_usd"] > 0 and eff["llm_to_slm_cost_ratio"] == pytest.approx(
        lbl["llm"]["cost_per_1k_usd"] / eff["cost_per_1k_usd"])
    plan = res.plan
    assert plan["migrating_clusters"] == ["c0"]
    assert plan["measured"]["calls"]["share"] == pytest.approx(LABELS / (LABELS + TEXTS))
    assert plan["measured"]["tokens"]["share"] == pytest.approx(LABELS * 42 / (LABELS * 42 + TEXTS * 75))
    assert plan["estimate_per_cluster"]["c0"] == {"score": 0.9, "likely_replaceable": True,
                                                  "reasons": ["short answers"]}
    assert plan["estimate"]["call_share"] == 0.6667
    line = plan["decisions"]["c0"]
    assert line["outcome"] == "migrate" and line["lower"] == lbl["decision"]["lower"] and line["n"] == 8
    assert line["latency"]["slm_p50_ms"] == eff["latency_p50_ms"] and line["latency"]["llm_p50_ms"] >= 900
    assert plan["not_enough_evidence"] == {}
    # stored for report and refine
    latest = json.loads(ws.path("evals", "latest.json").read_text())
    assert latest["run"] == res.run
    run_dir = ws.path("evals", res.run)
    assert (run_dir / "results.json").exists()
    preds = [json.loads(line) for line in (run_dir / "predictions" / "c0.jsonl").read_text().splitlines()]
    assert {p["variant"] for p in preds} == {"base", "icl", "finetuned"}
    assert all(p["prediction"]["content"] == "refund" for p in preds if p["variant"] == "finetuned")
    assert ws.manifest("evaluate")["counts"] == {"clusters": 2, "migrate": 1, "test_calls": 12}
    # unchanged inputs: the stored run is returned without generating again
    again = E.evaluate(ws, cfg, embedder=HashEmbedder())
    assert again.run == res.run and again.skipped_unchanged


def test_cli_gate_exit_codes(two_cluster_ws, tmp_path, monkeypatch, capsys):
    from slmigrate.cli import main

    ws, base, *_ = two_cluster_ws
    monkeypatch.chdir(tmp_path)
    (tmp_path / "slmigrate.toml").write_text('[evaluate]\nembedder = "hash"\nbatch_size = 4\n' + SMALL_BAR_TOML)
    args = ["evaluate", "-w", str(ws.root), "--model", str(base), "--variants", "finetuned", "--device", "cpu"]
    assert main(args + ["--fail-under", "0.95", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["gate"] == {"fail_under": 0.95, "failing": []}
    # c0 migrates with 1.0; a bar above that fails the gate with exit code 3 (the run itself is reused)
    assert main(args + ["--fail-under", "1.01"]) == 3
    err = capsys.readouterr()
    assert "quality gate failed" in err.err and "c0" in err.err
    assert "Migration plan" in err.out
    assert main(args + ["--cluster", "nope"]) == 1


def test_run_applies_the_configured_gate(two_cluster_ws, tmp_path, capsys):
    """`[evaluate] fail_under` in slmigrate.toml is the CI gate of `slmigrate run` too (it was a flag of
    `evaluate` only), and changing the bar does not re-run the evaluation."""
    from slmigrate.cli import main

    ws, base, *_ = two_cluster_ws
    cfg = tmp_path / "slmigrate.toml"
    settings = (f'[evaluate]\nmodel = "{base}"\nembedder = "hash"\nbatch_size = 4\ndevice = "cpu"\n'
                'variants = ["finetuned"]\n' + SMALL_BAR_TOML)
    run = ["-w", str(ws.root), "run", "--config", str(cfg), "--from", "evaluate", "--to", "evaluate"]
    cfg.write_text(settings + "fail_under = 0.95\n")
    assert main(run + ["--json"]) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["gate"] == {"fail_under": 0.95, "failing": []}
    cfg.write_text(settings + "fail_under = 1.01\n")
    run_id = ws.manifest("evaluate")["run"]
    assert main(run) == 3
    err = capsys.readouterr().err
    assert "quality gate failed" in err and "c0" in err
    assert ws.manifest("evaluate")["run"] == run_id  # only the bar changed: the evaluation was reused


def test_a_copied_workspace_still_serves_and_reports(two_cluster_ws, tmp_path):
    """Evaluations name adapters relative to the workspace, so a copy (another folder, another machine) loads
    its own adapters, not the original's."""
    import shutil

    from fakes import HashEmbedder
    from slmigrate.report import report
    from slmigrate.serve.deployment import load_deployments
    from slmigrate.serve.engine import SlmEngine
    from slmigrate.workspace import Workspace

    ws, base, *_ = two_cluster_ws
    E.evaluate(ws, EvaluateConfig(model=str(base), embedder="hash", batch_size=4, device="cpu", **SMALL_BAR),
               embedder=HashEmbedder())
    stored = [r["adapter"] for r in json.loads(ws.path("evals", "latest.json").read_text())["clusters"]]
    assert "adapters/c0/tiny-llama" in stored
    copy = Workspace.open(shutil.copytree(ws.root, tmp_path / "moved"), create=False)
    deployments = load_deployments(copy)
    assert [d.cluster for d in deployments] == ["c0"]
    assert deployments[0].adapter == copy.path("adapters", "c0", "tiny-llama")
    engine = SlmEngine(deployments, device="cpu")  # loads the base and the copied adapter
    assert engine.deployments
    html = report(copy, out=tmp_path / "report.html")
    assert "route ticket" in Path(html.html).read_text()


# --- the judge through a real HTTP endpoint ----------------------------------------------------------------

def _judge_app(position_biased: bool):
    """An OpenAI-compatible judge: rubric 5 when candidate == reference else 2; pairwise either always "A"
    (a maximally position-biased judge) or the answer that equals the reference text "gold"."""
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    async def chat(request):
        body = await request.json()
        prompt = body["messages"][-1]["content"]
        if "Score the candidate" in prompt:
            ref = prompt.split("Reference answer:\n", 1)[1].split("\n\nCandidate answer:", 1)[0]
            cand = prompt.split("Candidate answer:\n", 1)[1].split("\n\nScore the candidate", 1)[0]
            reply = json.dumps({"score": 5 if cand == ref else 2})
        else:
            a = prompt.split("Answer A:\n", 1)[1].split("\n\nAnswer B:", 1)[0]
            reply = json.dumps({"winner": "A" if position_biased or a == "gold" else "B"})
        return JSONResponse({"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                             "choices": [{"index": 0, "finish_reason": "stop",
                                          "message": {"role": "assistant", "content": reply}}]})

    return Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])])


def test_judge_rubric_and_pairwise_cancel_position_bias():
    from stub_llm import ServerThread

    from slmigrate.evaluate import metrics as M
    from slmigrate.evaluate.judge import Judge

    preds = [{"content": "gold"}, {"content": "tin"}]
    refs = [{"content": "gold"}, {"content": "gold"}]
    reqs = [{"messages": [{"role": "user", "content": "q"}]}] * 2
    with ServerThread(_judge_app(position_biased=False)) as srv:
        rubric = Judge(srv.base + "/v1", "judge", "rubric", api_key="k")
        s = M.score("text", preds, refs, M.MetricContext(reqs, judge=rubric), only=["judge"])
        assert s.items["judge"] == [1.0, 0.25]
        fair = Judge(srv.base + "/v1", "judge", "pairwise", api_key="k")
        # identical answers: each order picks A ("gold" == reference) -> one win, one loss -> 0.5 (parity);
        # "tin" loses in both orders -> 0
        assert fair.score(["gold", "tin"], ["gold", "gold"], reqs) == [0.5, 0.0]
        assert fair.calls == 4
    with ServerThread(_judge_app(position_biased=True)) as srv:
        biased = Judge(srv.base + "/v1", "judge", "pairwise", api_key="k")
        # a judge that always says "A" favours nobody once positions are swapped
        assert biased.score(["tin", "gold"], ["gold", "gold"], reqs) == [0.5, 0.5]


def test_judge_unreachable_endpoint_is_a_user_error():
    from slmigrate.errors import SlmigrateError
    from slmigrate.evaluate.judge import Judge

    judge = Judge("http://127.0.0.1:9/v1", "judge", api_key="k", timeout=2)
    with pytest.raises(SlmigrateError, match="--judge"):
        judge.score(["a"], ["b"], [None])


# --- BFCL as a cluster -------------------------------------------------------------------------------------

def test_bfcl_questions_become_openai_requests_with_ground_truth_calls():
    from conftest import shared_file

    from slmigrate.collect import bfcl
    from slmigrate.evaluate import metrics as M

    root = shared_file("bfcl/BFCL_v4_simple_python.json").parent
    records = bfcl.load(root)
    assert len(records) == 400 + 200
    by_id = {r.input_id: r for r in records}
    first = by_id["simple_python_0"]
    fn = first.request["tools"][0]["function"]
    assert fn["name"] == "calculate_triangle_area" and fn["parameters"]["type"] == "object"
    assert fn["parameters"]["properties"]["base"]["type"] == "integer"
    call = first.answer["tool_calls"][0]["function"]
    assert call["name"] == "calculate_triangle_area"
    assert json.loads(call["arguments"]) == {"base": 10, "height": 5, "unit": "units"}
    # "z": ["", 0] - the first acceptable value is "may be omitted"
    assert json.loads(by_id["simple_python_2"].answer["tool_calls"][0]["function"]["arguments"]) == {"x": 4, "y": 5}
    assert len(by_id["multiple_0"].request["tools"]) == 2
    # a property literally named "type" keeps its schema; BFCL's Python type names become JSON Schema ones
    kinds = {json.dumps(t) for r in records for t in r.request["tools"]}
    assert not any('"type": "dict"' in k or '"type": "float"' in k or '"type": "tuple"' in k for k in kinds)
    # the reference scores perfectly against itself
    answers = [r.answer for r in records]
    s = M.score("tool_call", answers, answers, M.MetricContext([r.request for r in records]))
    assert s.means["exact"] == 1.0 and s.means["valid_call"] == 1.0
    # ... and the metric is not blind: each answer's arguments emptied, or given to the wrong function, scores 0
    wrong = []
    for i, a in enumerate(answers):
        fn = dict(a["tool_calls"][0]["function"])
        fn["arguments"] = "{}" if i % 2 else json.dumps({"no_such_argument": 1})
        wrong.append({**a, "tool_calls": [{**a["tool_calls"][0], "function": fn}]})
    bad = M.score("tool_call", wrong, answers, M.MetricContext([r.request for r in records]))
    assert bad.means["exact"] == 0.0


def test_bfcl_prepare_makes_a_workspace_finetune_and_evaluate_read(tmp_path):
    from conftest import shared_file

    from slmigrate.collect import bfcl
    from slmigrate.curate.dataset import load_curated
    from slmigrate.workspace import Workspace

    root = shared_file("bfcl/BFCL_v4_multiple.json").parent
    ws = Workspace.open(tmp_path / "ws")
    info = bfcl.prepare(ws, root, limit=60)
    assert info["calls"] == 60 and sum(info["splits"].values()) == 60 and info["splits"]["test"] > 5
    assert {c.split for c in load_curated(ws)} == {"train", "validation", "test"}
    assert set(ws.store.clusters_of().values()) == {"bfcl"}
    assert E.load_clusters(ws)["bfcl"]["output_kind"] == "tool_call"
    # the probe measures the hand-made task too (it has no cluster-stage manifest to key on)
    from slmigrate.config import Config
    from slmigrate.probe import probe

    cfg = Config()
    cfg.probe.fewshot_calls = 0
    measured = probe(ws, cfg).clusters[0]["measured"]
    assert measured["probe"] == "neighbour" and measured["n"] == info["splits"]["validation"] + \
        info["splits"]["test"]
    assert measured["low"] <= measured["score"] <= measured["high"]
    again = bfcl.split_of("simple_python_7", 0.3, 0.1, 0)
    assert again == bfcl.split_of("simple_python_7", 0.3, 0.1, 0)


def _tool_calls(name: str, **args) -> list[dict]:
    import json

    return [{"id": "c", "type": "function", "function": {"name": name, "arguments": json.dumps(args)}}]


def test_bfcl_acceptance_follows_the_leaderboards_rule():
    from slmigrate.collect.bfcl import accepts

    truth = [{"math.hypot": {"x": [4], "y": [5.0], "z": ["", 0], "unit": ["Meters", "m"]}}]
    assert accepts(_tool_calls("math.hypot", x=4, y=5, unit="meters"), truth)  # int for float, case ignored
    assert accepts(_tool_calls("math.hypot", x=4, y=5.0, z=0, unit="m"), truth)  # the second listed value
    assert not accepts(_tool_calls("math.hypot", x=4.0, y=5, unit="m"), truth)  # a float where an int is listed
    assert not accepts(_tool_calls("math.hypot", x=4, unit="m"), truth)  # y is not optional
    assert not accepts(_tool_calls("math.hypot", x=4, y=5, unit="m", w=1), truth)  # an argument nobody asked for
    assert not accepts(_tool_calls("math.hypot", x="4", y=5, unit="m"), truth)  # a string is not a number
    assert not accepts(_tool_calls("hypot", x=4, y=5, unit="m"), truth)
    assert not accepts([], truth) and not accepts(_tool_calls("math.hypot") * 2, truth)
    dated = [{"book": {"date": ["2024-04-01", "April 1, 2024"], "flags": [[True, "a b"]], "who": [{"n": ["Ann"]}]}}]
    assert accepts(_tool_calls("book", date="april 1 2024", flags=[True, "A-B"], who={"n": "ann"}), dated)
    assert not accepts(_tool_calls("book", date="2024-04-02", flags=[True, "a b"], who={"n": "Ann"}), dated)
    assert not accepts(_tool_calls("book", date="2024-04-01", flags=[1, "a b"], who={"n": "Ann"}), dated)


def test_bfcl_score_reads_the_latest_evaluations_predictions(tmp_path):
    import json

    from conftest import shared_file

    from slmigrate import artifacts
    from slmigrate.collect import bfcl
    from slmigrate.workspace import Workspace

    root = shared_file("bfcl/BFCL_v4_simple_python.json").parent
    ws = Workspace.open(tmp_path / "ws")
    records = {r.input_id: r for r in bfcl.load(root, ("simple_python",))}
    right, wrong = records["simple_python_1"], records["simple_python_2"]
    (ws.path("evals", "R1", "predictions")).mkdir(parents=True)
    rows = [{"variant": "finetuned", "id": right.id, "exact": 1.0,
             "prediction": {"role": "assistant", "tool_calls": _tool_calls("math.factorial", number=5)}},
            # BFCL accepts z=0 for math.hypot (its list is ["", 0]); the first-answer exact does not
            {"variant": "finetuned", "id": wrong.id, "exact": 0.0,
             "prediction": {"role": "assistant", "tool_calls": _tool_calls("math.hypot", x=4, y=5, z=0)}},
            {"variant": "finetuned", "id": "not-a-bfcl-call", "exact": 1.0, "prediction": {}}]
    ws.path("evals", "R1", "predictions", "bfcl.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    artifacts.write_evaluation(ws, {"run": "R1", "clusters": []})
    got = bfcl.score(ws, root, ("simple_python",))["variants"]["finetuned"]
    assert got["n"] == 2 and got["exact"]["count"] == 1 and got["accepted"]["count"] == 2
    assert got["accepted"]["interval"][0] < 1.0 == got["accepted"]["value"]


# --- refine re-checks a deployed adapter the way evaluate scores it -----------------------------------------

class _OneCluster:
    """A stand-in for the saved cluster model that puts every call in ``c0`` (clustering is not under test)."""

    ids = ["c0", "c1"]
    centroids = np.zeros((2, 4), dtype="float32")
    radius = np.ones(2)

    def assign_many(self, calls, fast=True):
        return ["c0"] * len(calls)

    def vectors(self, calls):
        return np.zeros((len(calls), 4), dtype="float32")


def test_refine_dry_run_scores_fresh_calls_as_evaluate_does(two_cluster_ws, tmp_path, monkeypatch, capsys):
    """The same calls give the same score through `evaluate` (as the test split) and `refine --dry-run` (as fresh
    traffic): both go through evaluate's code path. The CLI's refine takes the workspace's settings, so a
    ./slmigrate.toml in the current directory changes nothing; --config does."""
    import shutil

    from slmigrate.cli import main
    from slmigrate.cluster.model import ClusterModel
    from slmigrate.config import CurateConfig, workspace_config
    from slmigrate.curate.dataset import load_curated, to_row, write_curated
    from slmigrate.record import CallRecord
    from slmigrate.refine import refine
    from slmigrate.workspace import Workspace

    src, base, label_calls, text_calls = two_cluster_ws
    ws = Workspace.open(shutil.copytree(src.root, tmp_path / "ws"), create=False)
    # Half of c0's held-out calls now want another label: the constant "refund" adapter scores 0.5 on them.
    n_train = LABELS * 2 // 3
    test = [_call(i, "Route the ticket.", f"ticket {i}: I want my money back", "exchange" if i % 2 else "refund")
            for i in range(n_train, LABELS)]
    ws.store.insert_calls(test)
    ws.store.set_clusters({c.id: "c0" for c in test})
    rows = [to_row(c, c.split) for c in load_curated(ws) if c.split == "train"] + [to_row(c, "test") for c in test]
    write_curated(ws, rows, {}, {})
    curate_cfg = CurateConfig(pii="off", near_duplicates=False)  # the fixture's tickets differ only by number
    ws.write_manifest("curate", fingerprint="test", config=curate_cfg.model_dump(mode="json"))
    # 4 of 8 right: the 95% lower bound (0.215) clears a 0.2 bar, so the task migrates.
    cfg = EvaluateConfig(model=str(base), embedder="hash", batch_size=4, device="cpu", threshold={"label": 0.2},
                         min_test_calls=1, variants=["finetuned"])
    evaluated = E.evaluate(ws, cfg, clusters=["c0"])
    [c0] = evaluated.clusters
    score = c0["variants"]["finetuned"]["primary"]
    assert score == pytest.approx(0.5) and c0["decision"]["migrate"]

    # The same calls arrive again as new traffic.
    ws.write_manifest("refine", fingerprint="0", extra={"last_seq": ws.store.max_seq()})
    fresh = [CallRecord(request=c.request, response=c.response, session=f"fresh-{k}", latency_ms=c.latency_ms,
                        timestamp="2025-02-01T00:00:00Z", source="import").finalise() for k, c in enumerate(test)]
    assert ws.store.insert_calls(fresh) == (len(fresh), 0)
    monkeypatch.setattr(ClusterModel, "load", classmethod(lambda cls, ws, embedder=None: _OneCluster()))
    config = workspace_config(ws)
    assert config.evaluate.threshold["label"] == 0.2 and config.curate == curate_cfg
    plan = refine(ws, dry_run=True)
    assert plan["curated"] == len(fresh)
    assert plan["clusters"]["c0"]["metric"] == score
    assert not [a for a in plan["actions"] if a["action"] == "retrain"]

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "slmigrate.toml").write_text(
        f'[curate]\npii = "off"\nnear_duplicates = false\n[evaluate]\nmodel = "{base}"\ndevice = "cpu"\n'
        'batch_size = 4\nthreshold = {label = 0.99}\n')
    monkeypatch.chdir(elsewhere)
    assert main(["refine", "--dry-run", "-w", str(ws.root), "--json"]) == 0
    from_elsewhere = json.loads(capsys.readouterr().out)
    assert from_elsewhere["clusters"]["c0"]["metric"] == score
    assert from_elsewhere["clusters"]["c0"]["threshold"] == 0.2 and from_elsewhere["actions"] == plan["actions"]
    assert main(["refine", "--dry-run", "-w", str(ws.root), "--config", "slmigrate.toml", "--json"]) == 0
    named = json.loads(capsys.readouterr().out)
    assert named["clusters"]["c0"]["threshold"] == 0.99
    assert ("retrain", "c0") in {(a["action"], a["cluster"]) for a in named["actions"]}


# --- the gate with the real SmolLM2 ---------------------------------------------------------------------------

def _smollm2_label_ws(root, base, answers: list[str]):
    """Ten label calls in the test split of cluster c0, whose "fine-tuned model" is SmolLM2-135M itself (a full
    model folder under adapters/: evaluate loads it as the finetuned variant), with the given reference answers."""
    from slmigrate.curate.dataset import to_row, write_curated
    from slmigrate.workspace import Workspace

    ws = Workspace.open(root)
    questions = ["What colour is the sky?", "What is 2 + 2?", "Name a fruit.", "What do cows drink?",
                 "Say hello.", "What is the capital of France?", "Name a planet.", "What colour is grass?",
                 "Count to three.", "Name an animal."]
    calls = [_call(i, "Answer in a few words.", q, a) for i, (q, a) in enumerate(zip(questions, answers))]
    ws.store.insert_calls(calls)
    write_curated(ws, [to_row(c, "test") for c in calls], {}, {})
    ws.store.set_clusters({c.id: "c0" for c in calls})
    (ws.path("clusters") / "clusters.json").write_text(json.dumps({"clusters": [
        {"id": "c0", "label": "short answers", "output_kind": "label"}]}))
    (ws.path("adapters", "c0")).mkdir(parents=True)
    (ws.path("adapters", "c0", "smollm2")).symlink_to(base, target_is_directory=True)
    return ws


@pytest.mark.slow
def test_real_smollm2_point_estimate_passes_but_the_bound_refuses(tmp_path):
    """The real SmolLM2 path (load, render, generate, parse, score, decide): its own greedy answers are the
    reference on 9 of 10 calls, so it scores exactly 0.900 >= 0.90 - and does not migrate, because the 95%
    lower bound of 9/10 is 0.596 (10 calls cannot show 0.9: it needs 35)."""
    from tiny_model import smollm2_dir

    base = smollm2_dir()
    cfg = EvaluateConfig(variants=["finetuned"], model=str(base), device="cpu", batch_size=5, max_new_tokens=12,
                         embedder="none")
    first = E.evaluate(_smollm2_label_ws(tmp_path / "a", base, ["-"] * 10), cfg)
    run = tmp_path / "a" / "evals" / first.run / "predictions" / "c0.jsonl"
    said = [json.loads(line)["prediction"]["content"] for line in run.read_text().splitlines()]
    assert len(said) == 10 and all(s.strip() for s in said)
    res = E.evaluate(_smollm2_label_ws(tmp_path / "b", base, said[:9] + ["certainly not this"]), cfg)
    (c0,) = res.clusters
    d = c0["decision"]
    assert c0["variants"]["finetuned"]["primary"] == pytest.approx(0.9) and c0["threshold"] == 0.9
    assert d["migrate"] is False and res.plan["migrating_clusters"] == []
    assert d["lower"] == pytest.approx(0.5958, abs=1e-3) and d["n"] == 10 and d["method"] == "wilson"
    assert d["outcome"] == "not_enough_evidence" and d["needs_calls"] == 25
    assert res.plan["not_enough_evidence"] == {"c0": 25}
