"""The example log generator: deterministic, every task kind present, valid `openai` records, learnable answers."""

import collections
import importlib.util
import json
import subprocess
import sys

import pytest

from conftest import ROOT

SCRIPT = ROOT / "examples" / "agent_log.py"


def _load():
    spec = importlib.util.spec_from_file_location("agent_log", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def agent_log():
    return _load()


@pytest.fixture(scope="module")
def records(agent_log):
    return agent_log.generate(300, seed=7)


def test_same_seed_gives_byte_identical_file(tmp_path):
    a, b, c = tmp_path / "a.jsonl", tmp_path / "b.jsonl", tmp_path / "c.jsonl"
    for out, seed in ((a, 3), (b, 3), (c, 4)):
        subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), "--calls", "120", "--seed", str(seed)],
                       check=True, capture_output=True)
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()
    assert len(a.read_text().splitlines()) == 120


def test_every_task_kind_present_even_in_a_short_log(agent_log, records):
    assert set(agent_log.TASKS) <= {r["metadata"]["task"] for r in records}
    short = agent_log.generate(8, seed=1)
    assert len(short) == 8
    assert set(agent_log.TASKS) <= {r["metadata"]["task"] for r in short}


def test_records_are_valid_openai_calls(records):
    ids = set()
    for r in records:
        assert {"id", "timestamp", "latency_ms", "model", "request", "response", "metadata"} <= set(r)
        ids.add(r["id"])
        req, resp = r["request"], r["response"]
        assert req["model"] == r["model"] and req["messages"][0]["role"] == "system"
        assert req["messages"][-1]["role"] == "user" and "temperature" in req
        assert resp["object"] == "chat.completion"
        choice = resp["choices"][0]
        assert choice["message"]["role"] == "assistant"
        assert choice["finish_reason"] in ("stop", "tool_calls")
        usage = resp["usage"]
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"] > 0
        assert r["latency_ms"] > 0 and r["timestamp"].endswith("Z")
    assert len(ids) == len(records)
    stamps = [r["timestamp"] for r in records]
    assert stamps == sorted(stamps)


def test_json_answers_copy_fields_from_the_message(records):
    extracts = [r for r in records if r["metadata"]["task"] == "extract"]
    assert extracts
    for r in extracts:
        answer = json.loads(r["response"]["choices"][0]["message"]["content"])
        text = r["request"]["messages"][-1]["content"]
        assert set(answer) == {"customer_name", "email", "order_id", "product", "quantity"}
        for key in ("customer_name", "email", "order_id", "product"):
            assert answer[key] in text
        assert isinstance(answer["quantity"], int) and str(answer["quantity"]) in text


def test_tool_calls_have_parsable_arguments_for_offered_tools(records):
    tools = [r for r in records if r["metadata"]["task"] == "tool"]
    assert tools
    for r in tools:
        offered = {t["function"]["name"]: t["function"] for t in r["request"]["tools"]}
        message = r["response"]["choices"][0]["message"]
        assert message["content"] is None and r["response"]["choices"][0]["finish_reason"] == "tool_calls"
        (call,) = message["tool_calls"]
        fn = call["function"]
        assert isinstance(fn["arguments"], str)
        args = json.loads(fn["arguments"])
        assert fn["name"] in offered
        assert set(offered[fn["name"]]["parameters"]["required"]) <= set(args)


def test_intent_labels_come_from_the_fixed_set_and_match_the_tool(agent_log, records):
    by_session = collections.defaultdict(dict)
    for r in records:
        by_session[r["metadata"]["session"]][r["metadata"]["task"]] = r
    labels = [r["response"]["choices"][0]["message"]["content"] for r in records if r["metadata"]["task"] == "intent"]
    assert set(labels) <= set(agent_log.INTENTS) and len(set(labels)) == len(agent_log.INTENTS)
    tool_for = {"order_status": "get_order_status", "return_request": "create_return",
                "cancel_order": "cancel_order", "change_address": "update_shipping_address",
                "product_question": "search_products", "billing_issue": "open_billing_case"}
    pairs = 0
    for calls in by_session.values():
        if "intent" in calls and "tool" in calls:
            label = calls["intent"]["response"]["choices"][0]["message"]["content"]
            tool = calls["tool"]["response"]["choices"][0]["message"]["tool_calls"][0]["function"]["name"]
            assert tool_for[label] == tool
            pairs += 1
    assert pairs > 10  # sessions really group several calls of one workflow


def test_open_ended_requests_are_each_different(records):
    asks = [r["request"]["messages"][-1]["content"] for r in records if r["metadata"]["task"] == "open_ended"]
    assert len(asks) >= 5 and len(set(asks)) == len(asks)


def test_contains_fake_pii(records):
    text = " ".join(r["request"]["messages"][-1]["content"] for r in records)
    assert "@" in text and "AO-" in text and "(" in text
