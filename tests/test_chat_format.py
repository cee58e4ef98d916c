"""chat_format: answers round-trip to OpenAI messages; prompts use the template; cuts keep what matters."""

import json

import pytest

from slmigrate import chat_format as cf
from tiny_model import tiny_tokenizer

TOOLS = [{"type": "function", "function": {
    "name": "get_order", "description": "Look up an order.",
    "parameters": {"type": "object", "properties": {"order_id": {"type": "string"}}, "required": ["order_id"]},
}}]


def call(name, args, id_="call_x"):
    return {"id": id_, "type": "function", "function": {"name": name, "arguments": json.dumps(args)}}


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.mark.parametrize("message", [
    {"role": "assistant", "content": "The order shipped yesterday."},
    {"role": "assistant", "content": '{"intent": "refund", "order_id": "#W1"}'},
    {"role": "assistant", "content": None, "tool_calls": [call("get_order", {"order_id": "#W1"})]},
    {"role": "assistant", "content": "Let me check both.", "tool_calls": [
        call("get_order", {"order_id": "#W1"}), call("get_order", {"order_id": "ünï <b>"})]},
    {"role": "assistant", "content": None, "tool_calls": [call("list_all", {})]},
    {"role": "assistant", "content": None, "tool_calls": [call("nested", {"a": {"b": [1, {"c": "}"}]}})]},
])
def test_answers_round_trip(message):
    parsed = cf.parse_answer(cf.serialise_answer(message))
    assert parsed["content"] == message["content"]
    want = [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in message.get("tool_calls", [])]
    got = [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in parsed.get("tool_calls", [])]
    assert got == want
    for c in parsed.get("tool_calls", []):
        assert isinstance(c["function"]["arguments"], str) and c["type"] == "function" and c["id"]


def test_parse_tolerates_cut_output_and_keeps_broken_calls_visible():
    cut = cf.parse_answer('<tool_call>{"name": "get_order", "arguments": {"order_id": "#W1"}}')
    assert cut["tool_calls"][0]["function"]["name"] == "get_order" and cut["content"] is None
    broken = cf.parse_answer('<tool_call>{"name": "get_order", "argu</tool_call>')
    assert "tool_calls" not in broken and "get_order" in broken["content"]
    plain = cf.parse_answer("  just text \n")
    assert plain == {"role": "assistant", "content": "just text"}


def test_prompt_uses_template_and_documents_tools_without_native_support(tok):
    assert not cf.template_supports_tools(tok)
    rendered = cf.render_prompt(tok, [{"role": "system", "content": "You are a shop agent."},
                                      {"role": "user", "content": "Where is #W1?"}], TOOLS)
    assert rendered.text.startswith("<|im_start|>system\nYou are a shop agent.")
    assert "# Tools" in rendered.text and '"name": "get_order"' in rendered.text
    assert rendered.text.endswith("<|im_start|>assistant\n")


def test_native_tool_templates_get_tools_argument(tok):
    native = tiny_tokenizer()
    native.chat_template = ("{% if tools %}TOOLS:{{ tools | length }}\n{% endif %}"
                            "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}"
                            "{% if m.tool_calls %}{{ m.tool_calls[0].function.arguments.order_id }}{% endif %}\n"
                            "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}")
    assert cf.template_supports_tools(native)
    text = cf.render_prompt(native, [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": None, "tool_calls": [call("get_order", {"order_id": "#W9"})]},
        {"role": "tool", "content": "shipped", "tool_call_id": "call_x"},
    ], TOOLS).text
    # tools went through the template, and history arguments reached it as an object, not a JSON string
    assert text.startswith("TOOLS:1\n") and "#W9" in text and "# Tools" not in text


def test_answer_target_ends_with_the_templates_end_of_turn(tok):
    target = cf.render_answer(tok, {"role": "assistant", "content": None,
                                    "tool_calls": [call("get_order", {"order_id": "#W1"})]})
    assert target == '<tool_call>{"name": "get_order", "arguments": {"order_id": "#W1"}}</tool_call><|im_end|>\n'


def _conversation(turns):
    msgs = [{"role": "system", "content": "SYSTEM-START " + "rules. " * 20}]
    for i in range(turns):
        msgs += [{"role": "user", "content": f"question {i} " + "x" * 40},
                 {"role": "assistant", "content": None, "tool_calls": [call("get_order", {"order_id": str(i)})]},
                 {"role": "tool", "content": f"result {i}", "tool_call_id": "call_x"},
                 {"role": "assistant", "content": f"answer {i}"}]
    msgs.append({"role": "user", "content": "LATEST question"})
    return msgs


def test_long_prompts_lose_old_turns_but_keep_system_start_and_latest_turn(tok):
    msgs = _conversation(6)
    full = cf.render_prompt(tok, msgs)
    limit = cf.count_tokens(tok, full.text) // 2
    cut = cf.render_prompt(tok, msgs, max_tokens=limit)
    assert cut.fits and cut.dropped_messages > 0 and cut.system_chars_cut == 0
    assert cf.count_tokens(tok, cut.text) <= limit
    assert "SYSTEM-START" in cut.text and "LATEST question" in cut.text
    assert "question 0 " not in cut.text  # the oldest turn went first
    # whole turns are dropped: the kept history starts with a user or assistant turn, never a tool result
    after_system = cut.text.split("<|im_end|>\n", 1)[1]
    assert not after_system.startswith("<|im_start|>tool")
    assert cut.dropped_messages % 4 == 0


def test_system_tail_is_cut_only_as_last_resort(tok):
    msgs = _conversation(2)
    limit = cf.count_tokens(tok, cf.render_prompt(tok, [msgs[0], msgs[-1]]).text) - 30
    cut = cf.render_prompt(tok, msgs, max_tokens=limit)
    assert cut.fits and cut.system_chars_cut > 0 and cut.dropped_messages == 8
    assert "SYSTEM-START" in cut.text and "LATEST question" in cut.text
    assert cf.count_tokens(tok, cut.text) <= limit


def test_static_prefix_found_and_pruned():
    shared = "You are the order desk of ACME. Policies:\n" + "- be kind and precise.\n" * 5
    calls = [[{"role": "system", "content": shared + f"Customer tier: {t}."}, {"role": "user", "content": "hi"}]
             for t in ("gold", "silver", "bronze")]
    prefix = cf.static_prefix(calls)
    assert prefix == shared + "Customer tier: "  # cut back to a space: never mid-word of the varying part
    pruned = cf.prune_prefix(calls[0], prefix)
    assert pruned[0]["content"] == "gold." and calls[0][0]["content"].startswith(shared)
    assert cf.static_prefix(calls[:1] + [[{"role": "user", "content": "no system"}]]) == ""
    short = [[{"role": "system", "content": "Hi A"}], [{"role": "system", "content": "Hi B"}]]
    assert cf.static_prefix(short) == ""


class _Call:
    def __init__(self, messages, tools):
        self.messages, self.tools = messages, tools


def test_static_prompt_drops_a_fixed_tool_list_only_when_unchanged(tmp_path):
    shared = "You are the order desk of ACME. Pick one tool.\n" * 3
    tools = [{"type": "function", "function": {"name": "get_order", "parameters": {"type": "object"}}},
             {"type": "function", "function": {"name": "refund", "parameters": {"type": "object"}}}]
    calls = [_Call([{"role": "system", "content": shared + f"Shift {i}."}, {"role": "user", "content": "hi"}],
                   tools) for i in range(3)]
    static = cf.StaticPrompt.of(calls)
    assert static.prefix == shared + "Shift "
    assert [t["function"]["name"] for t in static.tools] == ["get_order", "refund"]
    # Same tools (key order is not a difference): dropped; other tools: kept for the model to read.
    reordered = [{"function": dict(reversed(list(t["function"].items()))), "type": "function"} for t in tools]
    messages, kept = static.apply(calls[0].messages, reordered)
    assert kept == [] and messages[0]["content"] == "0."
    assert static.apply(calls[0].messages, tools[:1]) == (messages, tools[:1])
    # Calls that offer different tools have no static tool list.
    assert cf.StaticPrompt.of(calls + [_Call(calls[0].messages, tools[:1])]).tools == ()
    assert not cf.StaticPrompt.of([_Call([{"role": "user", "content": "x"}], None)] * 2)
    # Saved next to an adapter and loaded back; an adapter folder without the files has nothing static.
    static.save(tmp_path)
    assert cf.StaticPrompt.load(tmp_path) == static and not cf.StaticPrompt.load(tmp_path / "none")
