"""Every metric against hand-made cases whose right answer is worked out by hand."""

import json

import numpy as np
import pytest

from slmigrate.evaluate import metrics as m
from slmigrate.errors import SlmigrateError


def call(name, args, raw=False):
    return {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function",
         "function": {"name": name, "arguments": args if raw else json.dumps(args)}}]}


def calls(*pairs):
    msg = {"role": "assistant", "content": None, "tool_calls": []}
    for name, args in pairs:
        msg["tool_calls"].append({"type": "function", "function": {"name": name, "arguments": json.dumps(args)}})
    return msg


def text(s):
    return {"role": "assistant", "content": s}


def one(kind, metric, pred, ref, ctx=None):
    return m.score(kind, [pred], [ref], ctx, only=[metric]).items[metric][0]


REQ = {"messages": [{"role": "user", "content": "weather?"}],
       "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {}}},
                 {"type": "function", "function": {"name": "get_time", "parameters": {}}}]}


# --- tool calls ---

def test_exact_ignores_argument_order_and_formatting():
    ref = call("get_weather", '{"city": "Paris", "unit": "c"}', raw=True)
    pred = call("get_weather", '{ "unit":"c",\n "city" : "Paris" }', raw=True)
    assert one("tool_call", "exact", pred, ref) == 1.0


def test_numbers_compare_by_value_but_strings_and_booleans_are_not_numbers():
    ref = call("f", {"n": 1, "x": 2.5, "flag": True})
    assert one("tool_call", "exact", call("f", {"n": 1.0, "x": 2.50, "flag": True}), ref) == 1.0
    assert one("tool_call", "exact", call("f", {"n": "1", "x": 2.5, "flag": True}), ref) == 0.0
    assert one("tool_call", "exact", call("f", {"n": 1, "x": 2.5, "flag": 1}), ref) == 0.0
    assert one("tool_call", "exact", call("f", {"n": 1, "x": "2.5", "flag": True}), ref) == 0.0


def test_nested_values_are_normalised_too():
    ref = call("f", {"pts": [[1, 2], [3, 4]], "opt": {"a": 1, "b": [1.0]}})
    pred = call("f", {"opt": {"b": [1], "a": 1.0}, "pts": [[1.0, 2], [3, 4]]})
    assert one("tool_call", "exact", pred, ref) == 1.0
    # list order matters (it is data, not formatting)
    assert one("tool_call", "exact", call("f", {"pts": [[3, 4], [1, 2]], "opt": {"a": 1, "b": [1]}}), ref) == 0.0


def test_extra_or_missing_argument_breaks_exact_but_keeps_partial_f1():
    ref = call("get_weather", {"city": "Paris", "unit": "c"})
    extra = call("get_weather", {"city": "Paris", "unit": "c", "days": 3})
    missing = call("get_weather", {"city": "Paris"})
    assert one("tool_call", "exact", extra, ref) == 0.0
    assert one("tool_call", "name_accuracy", extra, ref) == 1.0
    # extra: precision 2/3, recall 1 -> F1 0.8 ; missing: precision 1, recall 1/2 -> 2/3
    assert one("tool_call", "argument_f1", extra, ref) == pytest.approx(0.8)
    assert one("tool_call", "argument_f1", missing, ref) == pytest.approx(2 / 3)
    assert one("tool_call", "argument_f1", ref, ref) == 1.0


def test_wrong_name_scores_zero_everywhere_but_validity():
    ref = call("get_weather", {"city": "Paris"})
    pred = call("get_time", {"city": "Paris"})
    ctx = m.MetricContext(requests=[REQ])
    assert one("tool_call", "name_accuracy", pred, ref) == 0.0
    assert one("tool_call", "exact", pred, ref) == 0.0
    assert one("tool_call", "argument_f1", pred, ref) == 0.0
    assert one("tool_call", "valid_call", pred, ref, ctx) == 1.0


def test_invalid_json_arguments_and_unknown_tools_are_not_valid_calls():
    ref = call("get_weather", {"city": "Paris"})
    broken = call("get_weather", '{"city": "Paris"', raw=True)
    not_object = call("get_weather", '["Paris"]', raw=True)
    unknown = call("get_wether", {"city": "Paris"})
    ctx = m.MetricContext(requests=[REQ])
    assert one("tool_call", "valid_call", broken, ref, ctx) == 0.0
    assert one("tool_call", "valid_call", not_object, ref, ctx) == 0.0
    assert one("tool_call", "valid_call", unknown, ref, ctx) == 0.0
    assert one("tool_call", "valid_call", unknown, ref) == 1.0  # no tool list -> the name cannot be checked
    assert one("tool_call", "exact", broken, ref) == 0.0
    assert one("tool_call", "name_accuracy", broken, ref) == 1.0
    assert one("tool_call", "argument_f1", broken, ref) == 0.0


def test_empty_and_missing_arguments_are_an_empty_object():
    ref = call("get_time", {})
    assert one("tool_call", "exact", call("get_time", "", raw=True), ref) == 1.0
    assert one("tool_call", "argument_f1", call("get_time", "{}", raw=True), ref) == 1.0
    assert one("tool_call", "argument_f1", call("get_weather", "{}", raw=True), ref) == 0.0


def test_parallel_calls_match_as_a_multiset():
    ref = calls(("get_weather", {"city": "Paris"}), ("get_weather", {"city": "Rome"}))
    swapped = calls(("get_weather", {"city": "Rome"}), ("get_weather", {"city": "Paris"}))
    one_only = calls(("get_weather", {"city": "Rome"}))
    assert one("tool_call", "exact", swapped, ref) == 1.0
    assert one("tool_call", "exact", one_only, ref) == 0.0
    assert one("tool_call", "name_accuracy", one_only, ref) == 0.0
    assert one("tool_call", "argument_f1", one_only, ref) == pytest.approx(2 / 3)


def test_choice_between_tool_and_text():
    ref_call, ref_text = call("get_weather", {"city": "Paris"}), text("Which city?")
    assert one("tool_call", "tool_choice", text("Paris?"), ref_call) == 0.0
    assert one("tool_call", "tool_choice", call("get_time", {}), ref_call) == 1.0
    assert one("tool_call", "tool_choice", text("Where?"), ref_text) == 1.0
    assert one("tool_call", "tool_choice", ref_call, ref_text) == 0.0
    # a text reference is matched by any text answer on exact/name, and is out of scope for F1 and validity
    assert one("tool_call", "exact", text("Where?"), ref_text) == 1.0
    assert one("tool_call", "exact", ref_call, ref_text) == 0.0
    assert one("tool_call", "argument_f1", text("x"), ref_text) is None
    assert one("tool_call", "valid_call", text("x"), ref_text) is None


def test_empty_or_missing_prediction():
    ref = call("get_weather", {"city": "Paris"})
    for pred in (None, text(""), {"role": "assistant", "content": None}):
        assert one("tool_call", "exact", pred, ref) == 0.0
        assert one("tool_call", "valid_call", pred, ref) == 0.0
        assert one("tool_call", "argument_f1", pred, ref) == 0.0


def test_score_means_skip_out_of_scope_items():
    preds = [call("a", {"x": 1}), text("hi"), call("a", {"x": 2})]
    refs = [call("a", {"x": 1}), text("hello"), call("a", {"x": 1})]
    s = m.score("tool_call", preds, refs)
    assert s.means["exact"] == pytest.approx(2 / 3)
    assert s.means["argument_f1"] == pytest.approx(0.5)
    assert s.counts["argument_f1"] == 2
    assert s.means["tool_choice"] == 1.0


# --- JSON ---

def test_json_metrics():
    ref = text('{"name": "Ann", "age": 31, "tags": ["a", "b"]}')
    same = text('```json\n{"age": 31.0, "tags": ["a", "b"], "name": "Ann"}\n```')
    wrong_value = text('{"name": "Ann", "age": "31", "tags": ["a", "b"]}')
    extra = text('{"name": "Ann", "age": 31, "tags": ["a", "b"], "x": null}')
    invalid = text('{"name": "Ann", "age": 31')
    assert [one("json", "json_valid", p, ref) for p in (same, wrong_value, extra, invalid)] == [1, 1, 1, 0]
    assert [one("json", "json_exact", p, ref) for p in (same, wrong_value, extra, invalid)] == [1, 0, 0, 0]
    assert [one("json", "same_keys", p, ref) for p in (same, wrong_value, extra, invalid)] == [1, 1, 0, 0]
    # leaf fields: name, age, tags[0], tags[1] -> 3 of 4 right; with extra x: 4 of 5
    assert one("json", "field_accuracy", wrong_value, ref) == pytest.approx(3 / 4)
    assert one("json", "field_accuracy", extra, ref) == pytest.approx(4 / 5)
    assert one("json", "field_accuracy", invalid, ref) == 0.0
    assert one("json", "field_accuracy", same, ref) == 1.0


def test_json_reference_that_is_not_json_is_out_of_scope():
    assert one("json", "json_exact", text("{}"), text("not json")) is None
    assert one("json", "json_exact", text("[1, 2]"), text("[1.0, 2]")) == 1.0
    assert one("json", "same_keys", text("[3]"), text("[1, 2]")) == 1.0
    assert one("json", "same_keys", text('{"a": 1}'), text("[1, 2]")) == 0.0
    assert one("json", "json_exact", text(""), text("{}")) == 0.0


# --- labels ---

def test_label_normalisation():
    ref = text("Billing")
    for p in ("billing", "  BILLING.", '"Billing"', "billing\n"):
        assert one("label", "label_exact", text(p), ref) == 1.0
    assert one("label", "label_exact", text("billing issue"), ref) == 0.0
    assert one("label", "label_exact", text(""), ref) == 0.0
    assert one("label", "label_exact", text("Needs   review"), text("needs review")) == 1.0


# --- free text ---

def test_rouge_l_known_values():
    # LCS("the cat sat on the mat", "the cat lay on the mat") = the cat on the mat = 5; P = R = 5/6
    assert m.rouge_l("the cat sat on the mat", "the cat lay on the mat") == pytest.approx(5 / 6)
    # LCS = "a c" = 2; P = 2/3, R = 2/4 -> F = 2PR/(P+R) = 4/7
    assert m.rouge_l("a b c", "a x c y") == pytest.approx(4 / 7)
    assert m.rouge_l("Hello, World!", "hello world") == 1.0
    assert m.rouge_l("", "") == 1.0
    assert m.rouge_l("", "x") == 0.0
    assert m.rouge_l("p q", "r s") == 0.0
    assert m.lcs_length(list("ABCBDAB"), list("BDCABA")) == 4


class FakeEmbedder:
    """Bag-of-letters vectors, L2-normalised, as the real Embedder's encode() returns."""

    def __init__(self):
        self.calls = 0

    def encode(self, texts):
        self.calls += 1
        out = np.zeros((len(texts), 26))
        for i, t in enumerate(texts):
            for ch in t.lower():
                if "a" <= ch <= "z":
                    out[i, ord(ch) - 97] += 1
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return out / np.where(norms == 0, 1, norms)


def test_embedding_similarity_uses_the_given_embedder_once():
    emb = FakeEmbedder()
    preds = [text("abc"), text("xyz"), text(""), text("cab")]
    refs = [text("abc"), text("abc"), text(""), text("abc")]
    s = m.score("text", preds, refs, m.MetricContext(embedder=emb))
    assert emb.calls == 1
    assert s.items["embedding_similarity"] == pytest.approx([1.0, 0.0, 1.0, 1.0])
    assert "embedding_similarity" not in m.score("text", preds, refs).means  # no embedder -> skipped


# --- registry ---

def test_every_kind_has_a_primary_metric_and_overrides_are_checked():
    assert {k: m.primary_metric(k) for k in m.KINDS} == {
        "tool_call": "exact", "json": "json_exact", "label": "label_exact", "text": "rouge_l"}
    assert m.primary_metric("text", {"text": "embedding_similarity"}) == "embedding_similarity"
    with pytest.raises(SlmigrateError):
        m.primary_metric("text", {"text": "nope"})
    with pytest.raises(SlmigrateError):
        m.metrics_for("poem")


def test_third_party_metric_registers_like_builtins():
    @m.register_metric("label", "first_letter")
    def first_letter(preds, refs, ctx):
        return [float(m.message_text(p)[:1].lower() == m.message_text(r)[:1].lower()) for p, r in zip(preds, refs)]

    try:
        s = m.score("label", [text("Bill"), text("x")], [text("billing"), text("y")])
        assert s.means["first_letter"] == 0.5
        assert s.means["label_exact"] == 0.0
    finally:
        m._REGISTRY["label"].pop("first_letter")
