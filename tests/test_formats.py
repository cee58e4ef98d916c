"""Every log format on small hand-written fixtures (tests/fixtures/formats), through the real importer."""

import json

import pytest

from slmigrate.collect import formats
from slmigrate.collect.importer import import_calls
from slmigrate.collect.formats import ConvertContext, FormatError
from slmigrate.collect.formats._common import merge_stream, parse_sse, upgrade_messages, upgrade_request
from slmigrate.record import CallRecord

from conftest import FIXTURES

F = FIXTURES / "formats"


def _import(ws, name, **kw):
    result = import_calls(ws, [F / name], **kw)
    calls = {c.input_id: c for c in ws.store.iter_calls()}
    return result, calls


def _calls(answer):
    calls = (answer or {}).get("tool_calls") or []
    return [(t["id"], t["function"]["name"], t["function"]["arguments"]) for t in calls]


@pytest.mark.parametrize("name, expected, calls", [
    ("openai.jsonl", "openai", 3),
    ("openai_shapes.jsonl", "openai", 4),
    ("legacy_functions.jsonl", "openai", 1),
    ("openai_ft.jsonl", "openai-ft", 3),
    ("conversation.json", "conversation", 4),
    ("otel.jsonl", "otel", 3),
    ("langfuse.jsonl", "langfuse", 2),
    ("anthropic.jsonl", "anthropic", 3),
    ("toolbench_answer.json", "toolbench", 2),
])
def test_auto_detects_every_format(workspace, name, expected, calls):
    result = import_calls(workspace, [F / name])
    assert result.files[0].format == expected and result.files[0].detected
    assert (result.imported, result.skipped) == (calls, 0)
    assert {c.source for c in workspace.store.iter_calls()} == {f"import:{expected}"}


def test_registry_lists_builtins_and_accepts_plugins(workspace, tmp_path):
    assert {"openai", "openai-ft", "conversation", "otel", "langfuse", "anthropic", "toolbench"} <= set(formats.names())

    class Shout:  # a third-party format registered exactly like the built-ins
        name = "shout"
        description = "one {say, reply} per line"

        def detect(self, objs):
            return 1.0 if all(isinstance(o, dict) and "say" in o for o in objs) else 0.0

        def convert(self, obj, ctx):
            return [CallRecord(request={"messages": [{"role": "user", "content": obj["say"]}]},
                               response={"choices": [{"index": 0, "finish_reason": "stop",
                                                      "message": {"role": "assistant", "content": obj["reply"]}}]})]

    formats.register(Shout())
    try:
        path = tmp_path / "shout.jsonl"
        path.write_text('{"say": "HI", "reply": "HELLO"}\n')
        result = import_calls(workspace, [path])
        assert result.files[0].format == "shout" and result.imported == 1
        assert next(workspace.store.iter_calls()).source == "import:shout"
    finally:
        formats._REGISTRY.pop("shout")
    with pytest.raises(TypeError):
        formats.register(object())


def test_openai_plain_streamed_and_sse(workspace):
    _, calls = _import(workspace, "openai.jsonl")
    plain = calls["call-001"]
    assert _calls(plain.answer) == [("call_a1", "lookup_order", '{"order_id": "A-1042"}')]
    assert (plain.prompt_tokens, plain.completion_tokens, plain.latency_ms) == (61, 17, 812)
    assert plain.session == "sim-7" and plain.outcome == 1.0  # from metadata.simulation_id / reward
    assert plain.metadata["task"] == "tool_choice" and plain.request["tools"][0]["function"]["name"] == "lookup_order"
    streamed = calls["call-002"]  # tool-call arguments arrived in pieces
    assert _calls(streamed.answer) == [("call_s1", "lookup_order", '{"order_id": "B-7"}')]
    assert streamed.finish_reason == "tool_calls" and streamed.response["usage"]["prompt_tokens"] == 40
    assert streamed.timestamp == "2025-03-01T10:01:40.000Z"  # epoch seconds
    sse = calls["call-003"]
    assert sse.answer["content"] == "Your parcel ships tomorrow." and sse.finish_reason == "stop"
    assert (sse.agent, sse.session) == ("tracker", "conv-9")


def test_openai_shapes_of_other_tools(workspace):
    _, calls = _import(workspace, "openai_shapes.jsonl")
    flywheel = calls["chatcmpl-4"]
    assert flywheel.agent == "order_lookup" and flywheel.metadata["client_id"] == "acme-support"
    assert flywheel.model == "meta/llama-3.1-70b-instruct" and flywheel.completion_tokens == 8
    openpipe = calls["chatcmpl-5"]
    assert openpipe.metadata == {"prompt_id": "lookup.v2", "env": "prod", "timestamp_missing": True}
    assert _calls(openpipe.answer)[0][2] == '{"order_id":"A-1042"}'  # arguments kept byte for byte
    litellm = calls["litellm-6"]
    assert litellm.session == "trace-42" and litellm.request["temperature"] == 0.2
    assert (litellm.latency_ms, litellm.ttft_ms) == (900.0, 300.0)
    generic = calls["gen-7"]
    assert generic.messages[0]["content"].startswith("Summarise") and generic.answer["content"] == "Delayed by snow."


def test_legacy_functions_become_tools(workspace):
    _, calls = _import(workspace, "legacy_functions.jsonl")
    call = calls["legacy-1"]
    assert "functions" not in call.request and call.request["tools"][0]["function"]["name"] == "lookup_order"
    assert call.request["tool_choice"] == "auto"
    history = call.messages
    assert _calls(history[1]) == [("call_1", "lookup_order", '{"order_id": "A-1042"}')]
    assert history[2]["role"] == "tool" and history[2]["tool_call_id"] == "call_1"
    # The answer gets the id it will have as message 3 in the next call's history.
    assert _calls(call.answer) == [("call_3", "lookup_order", '{"order_id": "A-1043"}')]
    assert call.finish_reason == "tool_calls"


def test_upgrade_leaves_modern_messages_untouched():
    messages = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y", "function_call": None,
                                                   "tool_calls": None}]
    request = {"messages": messages}
    assert upgrade_request(request) is request and upgrade_messages(messages) is messages


def test_openai_ft(workspace):
    import_calls(workspace, [F / "openai_ft.jsonl"])
    calls = list(workspace.store.iter_calls())
    by_answer = {json.dumps(c.answer, sort_keys=True): c for c in calls}
    tool = next(c for c in calls
                if c.tools and c.answer.get("tool_calls") and c.answer["tool_calls"][0]["id"] == "call_f")
    assert len(tool.messages) == 2 and tool.finish_reason == "tool_calls"
    label = next(c for c in calls if (c.answer or {}).get("content") == "refund_request")
    assert label.tools == [] and label.messages[0]["content"].startswith("Classify")
    legacy = next(c for c in calls if c.answer.get("tool_calls") and c.answer["tool_calls"][0]["id"] == "call_1")
    assert legacy.tools[0]["function"]["name"] == "lookup_order"
    assert len(by_answer) == 3


def test_conversation_turns_tools_and_sessions(workspace):
    result, calls = _import(workspace, "conversation.json", tools_file=F / "tools.json")
    assert result.imported == 4
    first = calls["3:0#2"]
    assert len(first.messages) == 2 and first.tools[0]["function"]["name"] == "lookup_order"
    assert _calls(first.answer) == [("call_c1", "lookup_order", '{"order_id": "A-1042"}')]
    later = calls["3:0#4"]
    assert [m["role"] for m in later.messages] == ["system", "user", "assistant", "tool"]
    assert later.answer["content"].startswith("Order A-1042")
    assert {c.session for c in calls.values()} == {"3:0", "4:1"}
    assert calls["4:1#2"].outcome == 0.0 and first.outcome == 1.0 and first.metadata["task_id"] == 3
    # Without --tools, trajectories that carry no tools give requests without tools.
    other = type(workspace).open(workspace.root.parent / "ws2")
    import_calls(other, [F / "conversation.json"], format="conversation")
    assert all(not c.tools for c in other.store.iter_calls())


def test_otel_new_and_old_conventions(workspace):
    _, calls = _import(workspace, "otel.jsonl")
    new = calls["eee19b7ec3c1b174"]
    assert [m["role"] for m in new.messages] == ["system", "user", "assistant", "tool"]
    assert _calls(new.messages[2]) == [("call_o1", "lookup_order", '{"order_id": "A-1042"}')]
    assert json.loads(new.messages[3]["content"]) == {"status": "in transit"}
    assert new.answer["content"] == "It is in transit." and new.model == "gpt-4o-2024-08-06"
    assert (new.agent, new.session, new.prompt_tokens, new.latency_ms) == (
        "parcel-agent", "5b8efff798038103d269b633813fc60c", 44, 900.0)
    assert new.request["tools"][0]["function"]["name"] == "lookup_order" and new.request["temperature"] == 0.1
    flat = calls["b7ad6b7169203331"]
    assert flat.messages[1]["content"] == "My card was charged twice."
    assert _calls(flat.answer) == [("call_f1", "route_ticket", '{"queue": "billing"}')]
    assert flat.agent == "ticket-router" and flat.completion_tokens == 11
    event = calls["c7ad6b7169203332"]
    assert event.messages == [{"role": "user", "content": "Say OK."}] and event.answer["content"] == "OK."
    assert "aaa19b7ec3c1b175" not in calls  # the tool span is not an LLM call


def test_langfuse_generations_only(workspace):
    _, calls = _import(workspace, "langfuse.jsonl")
    assert set(calls) == {"obs-1", "obs-3"}
    route = calls["obs-1"]
    assert route.agent == "router" and route.session == "trace-lf-1" and route.tools
    assert (route.prompt_tokens, route.completion_tokens, route.latency_ms, route.ttft_ms) == (55, 14, 1250.0, 400.0)
    assert _calls(route.answer)[0][1] == "lookup_order" and route.request["temperature"] == 0
    assert calls["obs-3"].answer["content"] == "Order A-1042 is on its way."


def test_anthropic_blocks_become_openai(workspace):
    _, calls = _import(workspace, "anthropic.jsonl")
    first = calls["msg-log-1"]
    assert first.messages[0] == {"role": "system", "content": "You are the support agent of Acme Parcel."}
    assert first.tools[0]["function"]["parameters"]["required"] == ["order_id"]
    assert first.request["tool_choice"] == "auto"
    assert first.answer["content"] == "Let me check."
    assert _calls(first.answer) == [("toolu_01", "lookup_order", '{"order_id": "A-1042"}')]
    assert (first.prompt_tokens, first.completion_tokens, first.finish_reason) == (310, 52, "tool_calls")
    second = calls["msg-log-2"]
    assert [m["role"] for m in second.messages] == ["system", "user", "assistant", "tool"]
    assert second.messages[3] == {"role": "tool", "tool_call_id": "toolu_01", "content": "in transit"}
    assert second.finish_reason == "stop"
    streamed = calls["msg-log-3"]  # raw SSE events, tool input streamed as partial JSON
    assert streamed.answer["content"] == "Checking now."
    assert _calls(streamed.answer) == [("toolu_03", "lookup_order", '{"order_id": "C-9"}')]
    assert (streamed.prompt_tokens, streamed.completion_tokens, streamed.finish_reason) == (120, 40, "tool_calls")


def test_toolbench_answer_file(workspace):
    _, calls = _import(workspace, "toolbench_answer.json")
    step0, step1 = calls["formats/toolbench_answer#0"], calls["formats/toolbench_answer#1"]
    assert {t["function"]["name"] for t in step0.tools} == {"get_weather_for_weatherapi", "Finish"}
    assert _calls(step0.answer)[0][:2] == ("call_2", "get_weather_for_weatherapi")
    assert step1.messages[3] == {"role": "tool", "tool_call_id": "call_2", "name": "get_weather_for_weatherapi",
                                 "content": '{"temp_c": -3}'}
    assert step0.outcome == 1.0 and step0.session == step1.session


def test_stream_merge_and_sse_errors():
    merged = merge_stream([
        {"id": "x", "model": "m", "choices": [{"index": 0, "delta": {"role": "assistant", "content": "a"}}]},
        {"choices": [{"index": 0, "delta": {"content": "b"}, "finish_reason": "stop"}]},
    ])
    assert merged["choices"][0]["message"]["content"] == "ab" and merged["model"] == "m"
    assert parse_sse("data: {\"a\": 1}\n\ndata: [DONE]\n\ndata: {\"b\": 2}\n") == [{"a": 1}]
    with pytest.raises(FormatError):
        parse_sse("data: {broken\n")
    with pytest.raises(FormatError):
        merge_stream([])


@pytest.mark.parametrize("sentinel", ["[DONE]", "data: [DONE]"])
def test_stream_event_list_ending_in_done_imports_like_the_sse_text(workspace, tmp_path, sentinel):
    # Loggers that keep every streamed event keep the end sentinel too; the list must mean what the SSE text means.
    logged = json.loads((F / "openai.jsonl").read_text().splitlines()[1])  # call-002: a streamed tool call
    chunks = logged["response"]
    sse = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"
    path = tmp_path / "streams.jsonl"
    path.write_text("\n".join(json.dumps(dict(logged, id=name, response=response)) for name, response in
                              [("sse", sse), ("events", chunks + [sentinel]), ("after", chunks + [sentinel, "x"])]))
    result = import_calls(workspace, [path])
    assert (result.imported, result.skipped, result.errors) == (3, 0, [])
    calls = {c.input_id: c for c in workspace.store.iter_calls()}
    assert calls["events"].request == calls["sse"].request == logged["request"]
    assert calls["events"].response == calls["sse"].response == calls["after"].response  # events after it ignored
    assert _calls(calls["events"].answer) == [("call_s1", "lookup_order", '{"order_id": "B-7"}')]


@pytest.mark.parametrize("name, obj", [
    ("openai", {"request": {"model": "x"}, "response": None}),
    ("openai", {"request": {"messages": []}, "response": {"no": "choices"}}),
    ("openai-ft", {"messages": [{"role": "user", "content": "no answer"}]}),
    ("conversation", {"traj": [{"content": "no role"}]}),
    ("anthropic", {"request": {"messages": [{"role": "user", "content": [{"type": "mystery"}]}]}}),
    ("toolbench", {"answer_generation": {"valid_data": False}}),
    ("langfuse", {"type": "GENERATION", "traceId": "t", "input": 42, "output": "x"}),
])
def test_malformed_records_raise_format_error(name, obj):
    with pytest.raises(FormatError):
        formats.get(name).convert(obj, ConvertContext(file="x.jsonl", line=1))


def test_otel_bad_span_skips_only_itself(workspace, tmp_path):
    doc = json.loads((F / "otel.jsonl").read_text().splitlines()[1])
    spans = doc["resourceSpans"][0]["scopeSpans"][0]["spans"]
    broken = json.loads(json.dumps(spans[1]))
    broken["spanId"] = "badbadbadbadbad0"
    for attr in broken["attributes"]:
        if attr["key"] == "gen_ai.request.model":
            attr["key"], attr["value"] = "gen_ai.input.messages", {"stringValue": "[not json"}
    spans.append(broken)
    path = tmp_path / "otel.json"
    path.write_text(json.dumps(doc))
    result = import_calls(workspace, [path])
    assert (result.imported, result.skipped) == (2, 1)
    assert "gen_ai.input.messages" in result.errors[0]["reason"] and result.errors[0]["line"] == 1
