"""Batched generation: left padding and length sorting must not change what greedy decoding produces."""

import pytest

torch = pytest.importorskip("torch")

from slmigrate.evaluate.generate import generate, max_new_tokens_for  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """On a shared 2-core box, torch's second thread spin-waits against other processes (15x slower here)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny():
    from tiny_model import tiny_model, tiny_tokenizer

    tok = tiny_tokenizer()
    return tiny_model(tok), tok


PROMPTS = ["hello there", "a much longer prompt with many more words in it than the others", "x",
           "what is the weather in paris today", "tool call please"]


def test_batched_equals_one_by_one_and_keeps_order(tiny):
    model, tok = tiny
    single = generate(model, tok, PROMPTS, batch_size=1, max_new_tokens=12)
    batched = generate(model, tok, PROMPTS, batch_size=4, max_new_tokens=12)
    assert batched.texts == single.texts
    assert batched.new_tokens == single.new_tokens
    assert batched.prompt_tokens == [len(tok(p, add_special_tokens=False)["input_ids"]) for p in PROMPTS]
    assert all(0 <= n <= 12 for n in batched.new_tokens) and sum(batched.new_tokens) > 0
    assert batched.tokens_per_s > 0 and batched.peak_memory_mb > 0 and batched.memory_kind == "rss"
    # Longest first: prompts 1, 3, 4, 0 form the first batch, "x" (2) is alone in the second. A call's latency
    # is its batch's wall time; its compute time is its share of that batch.
    assert batched.latency_ms[0] == batched.latency_ms[1] == batched.latency_ms[3]
    assert batched.compute_ms[0] == pytest.approx(batched.latency_ms[0] / 4)
    assert batched.compute_ms[2] == pytest.approx(batched.latency_ms[2])
    assert batched.summary()["calls"] == len(PROMPTS)


def test_max_new_tokens_stops_and_counts_truncation(tiny):
    model, tok = tiny
    # A random model rarely emits its stop token in 3 steps: every answer is cut at the limit.
    out = generate(model, tok, PROMPTS, batch_size=2, max_new_tokens=3)
    assert all(n <= 3 for n in out.new_tokens)
    assert out.truncated == sum(1 for n in out.new_tokens if n == 3)


def test_max_new_tokens_sized_from_references(tiny):
    _, tok = tiny
    n = len(tok("one two three four five six seven eight", add_special_tokens=False)["input_ids"])
    assert max_new_tokens_for(tok, ["one two three four five six seven eight", "one"]) == int(
        max(16, -(-n * 1.25 // 1) + 16))
    assert max_new_tokens_for(tok, []) == 16
    assert max_new_tokens_for(tok, ["word " * 5000], cap=64) == 64


def test_empty_prompt_list(tiny):
    model, tok = tiny
    out = generate(model, tok, [], batch_size=4)
    assert out.texts == [] and out.tokens_per_s == 0.0


# --- the fast batch-1 decoder (slmigrate.evaluate.greedy) -----------------------------------------------------

def test_draft_follows_the_latest_earlier_ngram_then_the_sources():
    from slmigrate.evaluate.greedy import draft

    # '{"a": 1, "b": 2}' as made-up ids: 7 8 9 | 8 9 appears twice, the later occurrence wins
    history = [7, 8, 9, 1, 8, 9, 2, 5, 8, 9]
    assert draft(history, [], ngram=2, k=3) == [2, 5, 8]
    # the trailing n-gram itself is not an earlier occurrence: nothing else matches, so no draft
    assert draft([1, 2, 3], [], ngram=3, k=4) == []
    # not in the history: the first source holding it gives the continuation (an earlier answer's skeleton)
    assert draft([4, 1, 2], [[9, 9], [0, 1, 2, 6, 7, 8]], ngram=2, k=2) == [6, 7]
    # the 3-gram is unknown, the 2-gram is known: back off to it
    assert draft([5, 1, 2], [[3, 1, 2, 4]], ngram=3, k=8) == [4]
    # an occurrence at the very end of a source has no continuation: look further back
    assert draft([1, 2], [[1, 2, 3, 1, 2]], ngram=2, k=2) == [3, 1]
    assert draft([], [[1, 2]], ngram=2) == []
    # one token is enough when no longer n-gram matches: a value's first word, found in the prompt [6 7 8 1]
    assert draft([6, 7, 8, 1, 5, 6], [], ngram=3, k=2, start=4) == [7, 8]


def test_draft_takes_a_source_occurrence_by_count():
    from slmigrate.evaluate.greedy import draft

    # an earlier answer {k1: v1, k2: v2, k3: v3}: 12 separates the fields, 11 is the colon
    earlier = [10, 1, 11, 50, 12, 2, 11, 60, 12, 3, 11, 70, 13]
    # the prompt is [99 98]; this answer wrote its first value and separator: the second key follows, not the third
    assert draft([99, 98, 10, 1, 11, 51, 12], [earlier], ngram=2, k=4, start=2) == [2, 11, 60, 12]
    # after its second separator, the third key: the earlier answer's second separator, not this answer's first
    assert draft([99, 98, 10, 1, 11, 51, 12, 2, 11, 61, 12], [earlier], ngram=1, k=2, start=2) == [3, 11]
    # the prompt comes first: a value copied from it continues as there
    assert draft([12, 7, 10, 1, 11, 51, 12], [earlier], ngram=1, k=2, start=2) == [7, 10]


def test_answer_lookup_keeps_the_latest_answers_first():
    from slmigrate.evaluate.greedy import AnswerLookup

    lookup = AnswerLookup(keep=2)
    for answer in ([1], [], [2], [3]):
        lookup.add(answer)
    assert lookup.sequences() == [[3], [2]]


def test_fast_decoder_gives_hf_generates_answers_with_drafts_accepted(tiny):
    model, tok = tiny
    # Repetitive prompts: a random model copies enough of them that drafts are proposed and some confirmed.
    prompts = [p * 3 for p in PROMPTS]
    plain = generate(model, tok, prompts, batch_size=1, max_new_tokens=24, fast=False)
    fast = generate(model, tok, prompts, batch_size=1, max_new_tokens=24)
    assert fast.texts == plain.texts and fast.new_tokens == plain.new_tokens
    assert fast.truncated == plain.truncated
    assert fast.extra["drafted"] > 0 and 0 < fast.extra["accepted"] <= fast.extra["drafted"]
    # fewer forward passes than tokens: confirmed drafts came several per pass
    assert fast.extra["forwards"] < sum(fast.new_tokens) + len(prompts)
    assert fast.latency_ms == fast.compute_ms  # batch 1: a call's latency is its own time


@pytest.mark.slow
def test_fast_decoder_matches_plain_generate_on_smollm2():
    """The real model on extraction and labelling prompts: merged-free base weights, fast vs HF generate."""
    from tiny_model import smollm2_dir

    from slmigrate.evaluate.generate import load_model

    model, tok, _ = load_model(str(smollm2_dir()), device="cpu")
    asks = ["Extract the order id and the e-mail as JSON with keys order_id and email: order GD-741829, "
            "reach me at bday7545@example.com.",
            "Label the intent (order_status, return_request, billing_issue): where is my order HN-129934?",
            "Return JSON {\"name\": ..., \"city\": ...} for: Danielle Mercer lives in Lyon."]
    prompts = [tok.apply_chat_template([{"role": "user", "content": a}], tokenize=False,
                                       add_generation_prompt=True) for a in asks]
    plain = generate(model, tok, prompts, batch_size=1, max_new_tokens=40, fast=False)
    fast = generate(model, tok, prompts, batch_size=1, max_new_tokens=40)
    assert fast.texts == plain.texts
    assert fast.extra["accepted"] > 0


def test_served_number_format_follows_the_cpu_or_the_setting(tiny, monkeypatch):
    import copy

    import torch

    from slmigrate.evaluate.greedy import Decoded, cpu_bf16, for_serving

    model, _ = tiny
    monkeypatch.setenv("SLMIGRATE_CPU_BF16", "0")
    assert not cpu_bf16()
    assert next(for_serving(copy.deepcopy(model)).parameters()).dtype == torch.float32
    monkeypatch.setenv("SLMIGRATE_CPU_BF16", "1")
    assert cpu_bf16()
    assert next(for_serving(copy.deepcopy(model)).parameters()).dtype == torch.bfloat16
    # an earlier answer keeps its stop token for the next answer's drafts; a cut-off one has none
    assert Decoded([5, 6], True, 2, 0, 0, stop=2).with_stop() == [5, 6, 2]
    assert Decoded([5, 6], False, 2, 0, 0).with_stop() == [5, 6]


# --- tool calls decoded inside the request's schemas (slmigrate.evaluate.guide) -----------------------------

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                                     "days": {"type": "integer"}, "loud": {"type": "boolean"}},
    "required": ["unit", "loud"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"type": "string", "enum": ["utc", "cet"]}}, "required": ["zone"]}}}


def test_guide_accepts_the_trained_answer_format_and_rules_out_what_the_schema_does_not_offer(tiny):
    from slmigrate import chat_format
    from slmigrate.evaluate.guide import Guide

    _, tok = tiny
    request = {"tools": [WEATHER, TIME]}
    answer = chat_format.serialise_answer({"role": "assistant", "tool_calls": [{"function": {
        "name": "get_weather", "arguments": '{"unit": "celsius", "loud": false}'}}]})
    ids = tok(answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]

    def accepted(tokens):
        g = Guide.for_request(tok, request, {tok.eos_token_id})
        for t in tokens:
            if not g.active or not g.allows(t):
                return False
            g.advance(t)
        return True

    assert accepted(ids)  # exactly what serialise_answer writes, separators included
    for text in ("I cannot help with that.", "<b>No</b> such city", "<tool"):  # plain text stays free
        assert accepted(tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]), text
    for wrong in (answer.replace("get_weather", "get_wether"),  # a function not offered
                  answer.replace('"unit"', '"units"'),  # a key the function does not take
                  answer.replace("celsius", "kelvin"),  # a value outside the enum
                  answer.replace('"loud": false', '"loud": "no"'),  # a string for a boolean
                  answer.replace(', "loud": false', ""),  # a required argument missing
                  answer.replace('": "', '":"')):  # other separators than training's
        assert not accepted(tok(wrong, add_special_tokens=False)["input_ids"]), wrong
    # tool_choice "required" drops the plain-text branch; "none" turns the guide off
    assert Guide.for_request(tok, {"tools": [WEATHER], "tool_choice": "none"}, {tok.eos_token_id}) is None
    required = Guide.for_request(tok, {"tools": [WEATHER], "tool_choice": "required"}, {tok.eos_token_id})
    assert not required.allows(tok("I", add_special_tokens=False)["input_ids"][0])
    assert Guide.for_request(tok, {"messages": []}, {tok.eos_token_id}) is None


def test_guided_decoding_makes_a_random_model_write_a_valid_call_in_both_loops(tiny):
    """A random model never writes a tool call by itself; guided, every answer is one the schema allows."""
    import json

    from slmigrate import chat_format
    from slmigrate.evaluate.generate import guides_for

    model, tok = tiny
    requests = [{"tools": [WEATHER, TIME], "tool_choice": "required"}] * 3
    prompts = ["weather in paris", "what time is it", "x"]
    free = generate(model, tok, prompts, batch_size=1, max_new_tokens=120)
    assert not any(chat_format.parse_answer(t).get("tool_calls") for t in free.texts)
    for batch_size in (1, 2):
        out = generate(model, tok, prompts, batch_size=batch_size, max_new_tokens=120,
                       guides=guides_for(model, tok, requests))
        for text, stopped_early in zip(out.texts, [n < 120 for n in out.new_tokens]):
            calls = chat_format.parse_answer(text).get("tool_calls") or []
            assert calls and stopped_early, text
            for call in calls:
                args = json.loads(call["function"]["arguments"])
                if call["function"]["name"] == "get_weather":
                    assert args["unit"] in ("celsius", "fahrenheit") and isinstance(args["loud"], bool)
                    assert set(args) <= {"unit", "days", "loud"}
                else:
                    assert call["function"]["name"] == "get_time" and args == {"zone": args["zone"]}
