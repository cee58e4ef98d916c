"""Measured replaceability (slmigrate.probe), the headline, token estimates and `audit` on real logs.

The fast tests build a curated dataset and clusters by hand (what curate and cluster would write) so the probe's
own logic is tested without models; the slow ones drive the real CLI on the examples log and tau-bench.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run_process

from slmigrate.curate import dataset as curated
from slmigrate.config import Config, PricesConfig
from slmigrate.probe import probe
from slmigrate.stats import bootstrap_mean, estimate, hoeffding, wilson
from slmigrate.record import CallRecord

ROOT = Path(__file__).resolve().parent.parent


# --- intervals -------------------------------------------------------------------------------------------------

def test_wilson_matches_published_values():
    # Newcombe (1998), table I: 0/10 -> 0 to 0.2775, 10/10 -> 0.7225 to 1, 81/263 -> 0.2553 to 0.3662.
    assert wilson(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson(10, 10) == pytest.approx((0.7225, 1.0), abs=1e-4)
    assert wilson(81, 263) == pytest.approx((0.2553, 0.3662), abs=1e-4)


def test_estimate_picks_wilson_for_exact_match_and_bootstrap_for_graded_scores():
    exact = estimate([1.0, 0.0, 1.0, 1.0, None])
    assert exact["interval"] == "wilson" and exact["n"] == 4 and exact["score"] == 0.75
    assert (exact["low"], exact["high"]) == pytest.approx(wilson(3, 4), abs=1e-4)
    graded = estimate([0.2, 0.4, 0.6, 0.8] * 10, seed=1)
    assert graded["interval"] == "bootstrap"
    assert graded["low"] < graded["score"] == 0.5 < graded["high"]
    assert estimate([None, None]) is None
    low, high = bootstrap_mean([0.5] * 20)
    assert low == high == 0.5


def test_few_graded_scores_get_a_distribution_free_interval():
    """Two ROUGE-L scores of 0.86 bootstrapped to 0.86-0.86 in a real audit: certainty from two calls."""
    few = estimate([0.86, 0.86])
    assert few["interval"] == "hoeffding" and few["low"] < 0.1 and few["high"] == 1.0
    assert estimate([0.5] * 29)["interval"] == "hoeffding"
    assert estimate([0.5] * 30)["interval"] == "bootstrap"
    low, high = hoeffding(0.5, 100)
    assert (low, high) == pytest.approx((0.3642, 0.6358), abs=1e-4)  # sqrt(ln(40) / 200) = 0.1358


# --- the probe on a hand-made workspace ------------------------------------------------------------------------

def _call(i: int, question: str, answer: str, split: str) -> dict:
    rec = CallRecord(request={"model": "gpt-4o", "messages": [{"role": "system", "content": "Classify."},
                                                              {"role": "user", "content": question}]},
                     response={"choices": [{"message": {"role": "assistant", "content": answer}}],
                               "usage": {"prompt_tokens": 100, "completion_tokens": 2}},
                     session=f"s{i}", timestamp="2025-01-01T00:00:00Z").finalise()
    return curated.to_row(rec, split)


def _workspace(tmp_path):
    """Two label tasks: in `fruit` the answer follows from the question (a neighbour knows it); in `coin` it is
    random (no neighbour can know it)."""
    import random

    from slmigrate.workspace import Workspace

    ws = Workspace.open(tmp_path / "ws")
    rng = random.Random(0)
    kinds = {"apple": "fruit", "carrot": "vegetable", "cherry": "fruit", "leek": "vegetable", "plum": "fruit"}
    rows, assignment = [], {}
    for i in range(200):
        split = "train" if i % 5 else ("test" if i % 10 else "validation")
        word = rng.choice(sorted(kinds))
        fruit = _call(i, f"what is a {word} number {i}", kinds[word], split)
        coin = _call(1000 + i, f"toss a coin, round {i}", rng.choice(["heads", "tails"]), split)
        rows += [fruit, coin]
        assignment[fruit["id"]], assignment[coin["id"]] = "fruit", "coin"
    curated.write_curated(ws, rows, {"calls_out": len(rows)}, {})
    ws.store.set_clusters(assignment.items())
    clusters = [{"id": cid, "label": cid, "size": 200, "output_kind": "label", "cost_usd": cost,
                 "replaceability": 0.7} for cid, cost in (("fruit", 3.0), ("coin", 1.0))]
    ws.path("clusters").mkdir(parents=True, exist_ok=True)
    ws.path("clusters", "clusters.json").write_text(json.dumps(
        {"calls": 400, "cost_usd": 4.0, "clusters": clusters, "unclustered": {"size": 0},
         "overall": {"call_share": 1.0, "cost_share": 1.0}}))
    ws.write_manifest("cluster", fingerprint="f1", counts={})
    return ws


def test_neighbour_probe_separates_a_predictable_task_from_a_random_one(tmp_path):
    ws = _workspace(tmp_path)
    cfg = Config()
    cfg.probe.fewshot_calls = 0
    result = probe(ws, cfg)
    tasks = {t["cluster"]: t for t in result.clusters}
    fruit, coin = tasks["fruit"]["neighbour"], tasks["coin"]["neighbour"]
    # Held-out calls only: validation + test, 40 of 200 per task; the pool is the 160 train calls.
    assert tasks["fruit"]["held_out_calls"] == 40 and tasks["fruit"]["train_calls"] == 160
    assert fruit["score"] == 1.0 and fruit["interval"] == "wilson" and fruit["low"] > 0.9
    assert coin["low"] <= 0.5 <= coin["high"] and coin["high"] < 0.9
    assert tasks["fruit"]["replaceable"] and not tasks["coin"]["replaceable"]
    assert tasks["fruit"]["fewshot"]["skipped"] and "turned off" in tasks["fruit"]["fewshot"]["reason"]
    assert tasks["fruit"]["lora"]["skipped"]
    overall = result.overall
    assert overall["replaceable_clusters"] == ["fruit"]
    assert overall["calls_share"] == {"value": 0.5, "low": 0.5, "high": 0.5}
    assert overall["cost_share"]["value"] == 0.75
    assert probe(ws, cfg).skipped  # unchanged: not measured again


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_lora_probe_trains_in_memory_and_scores_held_out_calls(tmp_path):
    """The LoRA probe on a CPU when asked: a few steps of the real fine-tuning recipe on SmolLM2, answers scored
    as evaluate scores them; nothing is written into the workspace's adapters."""
    ws = _workspace(tmp_path)
    cfg = Config()
    cfg.probe.fewshot_calls = 0
    cfg.probe.lora, cfg.probe.lora_steps, cfg.probe.lora_test_calls = "on", 4, 6
    cfg.probe.lora_train_calls, cfg.probe.lora_clusters = 32, ["fruit"]
    cfg.finetune.device = "cpu"
    tasks = {t["cluster"]: t for t in probe(ws, cfg).clusters}
    lora = tasks["fruit"]["lora"]
    assert not lora.get("skipped"), lora
    assert lora["n"] == 6 and lora["steps"] == 4 and lora["train_calls"] == 32 and lora["method"] == "lora"
    assert 0.0 <= lora["low"] <= lora["score"] <= lora["high"] <= 1.0 and lora["interval"] == "wilson"
    assert "lora_clusters" in tasks["coin"]["lora"]["reason"]
    assert not list(ws.path("adapters").rglob("*.safetensors"))  # in memory only
    cfg.probe.lora = "off"
    assert "turned off" in probe(ws, cfg).clusters[0]["lora"]["reason"]  # settings changed: measured again


def test_a_task_with_only_train_calls_is_probed_across_its_own_sessions(tmp_path):
    """A small task whose sessions all landed in the train split still gets a measured figure: a third of its
    sessions is held out, and a held-out call never finds a call of its own session."""
    from slmigrate.probe import _Call, split_by_session
    from slmigrate.workspace import Workspace

    calls = [_Call(f"c{i}", {}, {}, "", f"s{i // 2}") for i in range(30)]  # 15 sessions of 2 calls
    pool, queries = split_by_session(calls, seed=0)
    assert len(queries) == 10 and len(pool) == 20 and not {c.session for c in pool} & {c.session for c in queries}
    assert split_by_session(calls[:2], seed=0) == (calls[:2], [])  # one session: nothing can be held out

    ws = Workspace.open(tmp_path / "ws")
    rows = [_call(i, f"what is a plum number {i}", "fruit", "train") for i in range(30)]
    curated.write_curated(ws, rows, {"calls_out": len(rows)}, {})
    ws.store.set_clusters((r["id"], "fruit") for r in rows)
    ws.path("clusters").mkdir(parents=True, exist_ok=True)
    ws.path("clusters", "clusters.json").write_text(json.dumps(
        {"calls": 30, "cost_usd": 1.0, "clusters": [{"id": "fruit", "label": "fruit", "size": 30,
                                                      "output_kind": "label", "cost_usd": 1.0}],
         "unclustered": {"size": 0}, "overall": {"call_share": 1.0, "cost_share": 1.0}}))
    ws.write_manifest("cluster", fingerprint="f1", counts={})
    cfg = Config()
    cfg.probe.fewshot_calls = 0
    [task] = probe(ws, cfg).clusters
    assert task["held_out_calls"] == 10 and "train sessions" in task["held_out"]
    assert task["measured"]["score"] == 1.0 and task["measured"]["n"] == 10


def test_no_held_out_call_is_its_own_neighbour(tmp_path):
    """The pool is the train split only: a held-out call never finds itself (that would score a perfect 1)."""
    from slmigrate.probe import nearest, task_calls

    ws = _workspace(tmp_path)
    pools, held = task_calls(ws, {"coin"}, 300, 0)
    pool_ids = {c.id for c in pools["coin"]}
    assert not pool_ids & {c.id for c in held["coin"]}
    links = nearest(pools["coin"], held["coin"])
    assert all(pools["coin"][ix[0]].id in pool_ids for ix in links)


def test_headline_puts_measured_share_beside_the_prior(tmp_path):
    from slmigrate.headline import headline

    ws = _workspace(tmp_path)
    cfg = Config()
    cfg.probe.fewshot_calls = 0
    probe(ws, cfg)
    h = headline(ws, cfg)
    assert h["tasks"] == 2 and h["cost_usd"] == 4.0
    assert h["calls_share"] == {"value": 0.5, "low": 0.5, "high": 0.5, "prior": 1.0}
    per = {t["cluster"]: t for t in h["per_task"]}
    assert per["fruit"]["measured"] == 1.0 and per["fruit"]["low"] > 0.9 and per["fruit"]["probe"] == "neighbour"
    assert "50% of calls" in h["text"] and "75% of cost" in h["text"]
    assert h["evaluated"] is None and "evaluated fine-tuned" not in h["text"]


def test_headline_says_what_the_evaluation_decided_beside_the_probe(tmp_path):
    """After `run` trained and evaluated, the answer must not contradict the migration plan: the probe's
    prediction and the evaluated decision stand side by side."""
    from slmigrate import artifacts
    from slmigrate.headline import headline

    ws = _workspace(tmp_path)
    cfg = Config()
    cfg.probe.fewshot_calls = 0
    probe(ws, cfg)
    fruit = {"outcome": "migrate", "value": 1.0, "lower": 0.9404, "upper": 1.0, "n": 60, "needs_calls": None}
    veg = {"outcome": "not_enough_evidence", "value": 0.9, "lower": 0.5958, "upper": 0.9821, "n": 10,
           "needs_calls": 25}
    artifacts.write_evaluation(ws, {"clusters": [
        {"cluster": "fruit", "variants": {"finetuned": {"primary": 1.0}}, "decision": {"migrate": True, **fruit}},
        {"cluster": "veg", "variants": {"finetuned": {"primary": 0.9}}, "decision": {"migrate": False, **veg}}],
        "plan": {"migrating_clusters": ["fruit"], "measured": {"calls": {"share": 0.5}, "cost_usd": {"share": 0.25}},
                 "not_enough_evidence": {"veg": 25}}})
    h = headline(ws, cfg)
    assert h["evaluated"] == {"migrating": ["fruit"], "evaluated": ["fruit", "veg"], "calls_share": 0.5,
                              "cost_share": 0.25, "decisions": {"fruit": fruit, "veg": veg},
                              "not_enough_evidence": {"veg": 25}}
    assert ("evaluated fine-tuned on held-out calls (2 task(s)): migrating fruit (fruit 1.000, 95% lower bound "
            "0.940, n=60), 50% of calls and 25% of cost") in h["text"]
    assert "veg: not enough evidence: needs 25 more calls" in h["text"]

    # With the evaluation's totals and the fine-tuned model's measured cost, the saving follows the tasks the
    # evaluation migrates (fruit: 200 of 400 calls, $3 of $4), not the probe's prediction.
    artifacts.write_evaluation(ws, {"clusters": [
        {"cluster": "fruit", "decision": {"migrate": True, **fruit},
         "variants": {"finetuned": {"primary": 1.0, "efficiency": {"cost_per_1k_usd": 0.5, "latency_p50_ms": 80}}}}],
        "plan": {"migrating_clusters": ["fruit"], "measured": {
            "calls": {"total": 400, "migrate": 200, "share": 0.5},
            "cost_usd": {"total": 4.0, "migrate": 3.0, "share": 0.75}}}})
    h = headline(ws, cfg)
    # 1e6 * (3.0 / 400 - 0.5 * 0.0005) = 7,250
    assert h["savings_per_million_calls_usd"] == {"value": 7250.0, "low": None, "high": None, "basis": "evaluation"}
    assert "saving $7,250.00 per million calls on the tasks the evaluation migrates" in h["text"]
    assert {t["cluster"]: t["finetuned"] for t in h["per_task"]}["fruit"] == 1.0


# --- logs as they come -----------------------------------------------------------------------------------------

def test_calls_without_usage_get_estimated_tokens_and_say_with_what():
    from slmigrate import usage

    bare = CallRecord(request={"messages": [{"role": "user", "content": "Book a flight from Boston to Denver."}]},
                      response={"choices": [{"message": {"role": "assistant", "content": "Which date?"}}]}
                      ).finalise()
    # o200k_base: "Book a flight from Boston to Denver." is 9 tokens, plus the per-message and reply overheads.
    assert bare.prompt_tokens == usage.count("user\nBook a flight from Boston to Denver.") + 3 + 3
    assert bare.completion_tokens == usage.count("assistant\nWhich date?")
    assert bare.metadata["usage_estimated"] == "o200k_base (bpe-openai)"
    assert bare.metadata["timestamp_missing"] is True
    logged = CallRecord(request={"messages": [{"role": "user", "content": "hi"}]}, timestamp="2025-01-01T00:00:00Z",
                        response={"choices": [{"message": {"content": "yo"}}],
                                  "usage": {"prompt_tokens": 7, "completion_tokens": 1}}).finalise()
    assert (logged.prompt_tokens, logged.completion_tokens) == (7, 1) and logged.metadata == {}


def test_assumed_model_prices_calls_that_name_none():
    prices = PricesConfig(default_model="gpt-4o-mini")
    assert prices.cost(None, 1_000_000, 0) == pytest.approx(0.15)
    assert prices.cost("gpt-4.1", 1_000_000, 0) == pytest.approx(2.0)  # a named model keeps its own price
    assert PricesConfig().cost(None, 1_000_000, 0) == pytest.approx(2.5)  # the table's default


def test_cluster_json_shows_the_current_result_without_reclustering(tmp_path):
    ws = _workspace(tmp_path)
    out = subprocess.run([sys.executable, "-m", "slmigrate", "--workspace", str(ws.root), "cluster", "--json"],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    shown = json.loads(out.stdout)
    # There is no curated dataset a re-cluster could have read here: the output is the stored result.
    assert [c["id"] for c in shown["clusters"]] == ["fruit", "coin"] and shown["skipped"] is True


# --- the real CLI on real logs ---------------------------------------------------------------------------------

def _audit(*args: str, timeout: int = 900) -> dict:
    out = run_process([sys.executable, "-m", "slmigrate", *args, "--json"], cwd=ROOT, timeout=timeout,
                      env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_audit_of_tau_bench_airline_estimates_tokens_and_measures_every_task(tmp_path):
    from conftest import shared_file

    log = shared_file("tau-bench/gpt-4o-airline.json")
    tools = shared_file("tau-bench/airline_tools.derived.json")
    result = _audit("--workspace", str(tmp_path / "ws"), "audit", str(log), "--tools", str(tools),
                    "--assume-model", "gpt-4o", "--out", str(tmp_path / "report"), "--no-fewshot")
    h = result["headline"]
    assert h["tokens_estimated"] >= h["calls"]  # every call in the store (the headline counts curated calls)
    assert "o200k_base" in h["tokenizer"] and h["cost_usd"] > 0 and h["assumed_model"] == "gpt-4o"
    for key in ("calls_share", "cost_share"):
        assert h[key]["low"] <= h[key]["value"] <= h[key]["high"] and h[key]["prior"] is not None
    assert h["per_task"] and all(t["measured"] is not None and t["low"] <= t["measured"] <= t["high"]
                                 for t in h["per_task"])
    assert (tmp_path / "ws" / "probe" / "probe.json").exists()  # the global --workspace holds the audit
    html = (tmp_path / "report" / "report.html").read_text()
    assert "no timestamps" in html and "o200k_base" in html
    # The cost is estimated, never a $0 for unknown: the overview's tile carries the positive total.
    import re

    tile = re.search(r'class="v">([^<]*)</div><div class="k">LLM cost of these calls \(estimated\)', html)
    assert tile and tile.group(1).startswith("$") and float(tile.group(1)[1:].replace(",", "")) > 0
    # ... and the report renders in a real browser: no console error, no network request, every chart drawn
    from test_report import OUT, render_in_chromium

    OUT.mkdir(parents=True, exist_ok=True)
    shown = render_in_chromium(tmp_path / "report" / "report.html", OUT / "report-audit-tau-bench.png")
    assert shown["errors"] == [] and [r for r in shown["requests"] if not r.startswith(("file:", "data:"))] == []
    assert shown["charts"] and all(c["ok"] for c in shown["charts"]), shown["charts"]
    assert "replaceability" in {c["name"] for c in shown["charts"]}


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_audit_of_the_examples_log_reports_the_probe_per_task(tmp_path):
    sys.path.insert(0, str(ROOT / "examples"))
    import agent_log

    log = tmp_path / "calls.jsonl"
    agent_log.write(log, calls=240, seed=3)
    result = _audit("audit", str(log), "--out", str(tmp_path / "audit"))
    h = result["headline"]
    assert h["tasks"] >= 3 and h["measured"]
    probed = json.loads((tmp_path / "audit" / "probe" / "probe.json").read_text())
    for task in probed["clusters"]:
        assert task["measured"] is not None and task["measured"]["low"] <= task["measured"]["score"]
        assert task["measured"]["score"] <= task["measured"]["high"]
    # The small model's few-shot probe ran on the biggest task (within the default budget).
    assert not probed["clusters"][0]["fewshot"].get("skipped"), probed["clusters"][0]["fewshot"]
    assert "What could move" not in result  # JSON mode prints JSON only
    assert h["text"].startswith(f"{h['tasks']} recurring tasks")


@pytest.mark.slow
@pytest.mark.timeout(3000)
def test_lora_probe_interval_meets_the_fine_tuned_interval_of_the_demo_tasks(tmp_path):
    """The budgeted LoRA probe predicts what fine-tuning will measure: on the examples log, run as `make demo`
    runs it (examples/demo.py: import -> curate -> cluster -> select -> finetune -> evaluate with the demo's
    config), then `slmigrate probe --lora` on the tasks the demo trained; each task's probe interval must
    agree with the score evaluate gave its fine-tuned model: the two 95% intervals overlap (both are estimates
    from a few dozen calls; a fine-tuned 70 of 70 has an upper bound of 1.0 that only a flawless probe reaches,
    so the probe's interval must meet the evaluation's, not contain its point estimate)."""
    import os

    ws = tmp_path / "demo"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = run_process([sys.executable, "examples/demo.py", "--workspace", str(ws)], cwd=ROOT, timeout=2000,
                       env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    evals = json.loads((ws / "evals" / "latest.json").read_text())
    trained = {c["cluster"]: c["variants"]["finetuned"]["intervals"][c["primary_metric"]] for c in evals["clusters"]
               if not c["variants"].get("finetuned", {}).get("skipped")}
    assert trained, evals
    args = ["--workspace", str(ws), "probe", "-c", str(ws / "slmigrate.toml"), "--lora", "--no-fewshot"]
    for cid in trained:
        args += ["--cluster", cid]
    probed = {t["cluster"]: t for t in _audit(*args, timeout=1500)["clusters"]}
    for cid, finetuned in trained.items():
        lora = probed[cid]["lora"]
        assert not lora.get("skipped"), lora
        assert lora["low"] <= finetuned["high"] and finetuned["low"] <= lora["high"], (cid, lora, finetuned)
        assert probed[cid]["measured"]["probe"] in {"lora", "neighbour"}
