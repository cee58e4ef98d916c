"""The router: the real openai client against `slmigrate serve`'s app, a stub upstream LLM behind it.

Most tests use a scripted SLM engine (its answers chosen per test) so each routing path - answered by the SLM,
unknown task, invalid SLM answer, SLM error or timeout, shadow, canary - is checked exactly; one test runs
the real engine (a tiny random Llama with two LoRA adapters on one base) end to end.
"""

import json
import time
from pathlib import Path

import openai
import pytest
from stub_llm import ServerThread, StubLLM, expected_completion, stored_calls

from slmigrate.serve import RouterSettings, build_app
from slmigrate.serve.deployment import Deployment
from slmigrate.serve.engine import SlmAnswer
from slmigrate.serve.router import Canary
from slmigrate.serve.validation import validate_answer
from slmigrate.store import Store
from slmigrate.collect.writer import RecordWriter

LOOKUP_TOOL = {"type": "function", "function": {
    "name": "lookup_order", "description": "Find an order.",
    "parameters": {"type": "object", "properties": {"order_id": {"type": "string"}}, "required": ["order_id"]}}}


def _ask(kind: str, text: str) -> list[dict]:
    system = {"label": "Classify the customer's intent.", "tool": "Use the order tools.",
              "other": "You are a poet."}[kind]
    return [{"role": "system", "content": system}, {"role": "user", "content": text}]


def assign(request):
    """Fake assigner: the task is named by the system prompt."""
    system = request["messages"][0]["content"]
    if system.startswith("Classify"):
        return "intent", 0.1
    if system.startswith("Use the order"):
        return "lookup", 0.2
    return None, None


class ScriptedEngine:
    def __init__(self, tmp_path: Path):
        self.deployments = {
            "intent": Deployment("intent", tmp_path, "base", "label"),
            "lookup": Deployment("lookup", tmp_path, "base", "tool_call"),
        }
        self.script = {}  # cluster -> message, or an exception to raise, or ("sleep", seconds)
        self.calls = 0

    def answer(self, cluster, request):
        self.calls += 1
        reply = self.script[cluster]
        if isinstance(reply, Exception):
            raise reply
        if isinstance(reply, tuple):
            time.sleep(reply[1])
            reply = {"role": "assistant", "content": "late"}
        return SlmAnswer(message=reply, text=json.dumps(reply), prompt_tokens=12, completion_tokens=3,
                         latency_ms=5.0, finish_reason="stop")


@pytest.fixture(scope="module")
def stub():
    with StubLLM() as server:
        yield server


class Running:
    def __init__(self, tmp_path, stub, **settings):
        self.db = tmp_path / "ws" / "slmigrate.sqlite"
        from slmigrate.workspace import Workspace

        self.ws = Workspace.open(tmp_path / "ws")
        self.engine = ScriptedEngine(tmp_path)
        self.writer = RecordWriter(lambda: Store(self.db))
        self.app, self.router = build_app(self.ws, RouterSettings(upstream=stub.url, **settings), writer=self.writer,
                                          engine=self.engine, assign=assign)
        self.server = ServerThread(self.app).start()
        self.client = openai.OpenAI(base_url=self.server.base + "/v1", api_key="sk-test", max_retries=0)

    def records(self, expect: int = 1):
        return stored_calls(self.writer, self.db, expect)

    def stop(self):
        self.server.stop()
        self.writer.close()


@pytest.fixture
def router(tmp_path, stub):
    made = []

    def make(**settings):
        made.append(Running(tmp_path / str(len(made)), stub, **settings))
        return made[-1]

    yield make
    for r in made:
        r.stop()


def test_migrated_task_is_answered_by_the_slm_and_logged(router):
    r = router()
    r.engine.script["intent"] = {"role": "assistant", "content": "refund_request"}
    out = r.client.chat.completions.create(model="gpt-4o", messages=_ask("label", "I want my money back"))
    assert out.choices[0].message.content == "refund_request"
    assert out.model == "slmigrate/intent" and out.usage.completion_tokens == 3
    [rec] = r.records()
    assert rec.source == "router" and rec.model == "slmigrate/intent"
    assert rec.metadata["route"]["answered_by"] == "slm" and rec.metadata["route"]["cluster"] == "intent"
    assert rec.request["messages"][1]["content"] == "I want my money back"
    snap = r.router.metrics.snapshot()
    assert snap["clusters"]["intent"]["routed"] == 1


def test_unknown_task_goes_upstream_unchanged(router, stub):
    r = router()
    messages = _ask("other", "Write about the sea")
    out = r.client.chat.completions.create(model="gpt-4o", messages=messages)
    expected = expected_completion({"model": "gpt-4o", "messages": messages})
    assert out.choices[0].message.content == expected["choices"][0]["message"]["content"]
    assert r.engine.calls == 0
    [rec] = r.records()
    assert rec.source == "router" and rec.metadata["route"]["answered_by"] == "llm"
    assert rec.metadata["route"]["reason"] == "no confident cluster"
    # the route facts are internal: they never reach the upstream
    assert not any(k.startswith("x-slmigrate") for k in stub.requests[-1]["headers"])


def test_invalid_tool_call_falls_back_to_the_llm(router):
    r = router()
    r.engine.script["lookup"] = {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c0", "type": "function", "function": {"name": "delete_everything", "arguments": "{}"}}]}
    messages = _ask("tool", "Where is order 42?")
    out = r.client.chat.completions.create(model="gpt-4o", messages=messages, tools=[LOOKUP_TOOL])
    call = out.choices[0].message.tool_calls[0]
    assert call.function.name == "lookup_order"  # the stub LLM's answer, not the SLM's broken one
    [rec] = r.records()
    assert rec.metadata["route"]["answered_by"] == "llm"
    assert "did not offer" in rec.metadata["route"]["fallback"]
    assert r.router.metrics.snapshot()["clusters"]["lookup"]["fallback"] == 1


def test_valid_tool_call_is_returned_in_openai_form_streaming_too(router):
    r = router()
    r.engine.script["lookup"] = {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c0", "type": "function", "function": {"name": "lookup_order", "arguments": '{"order_id": "42"}'}}]}
    out = r.client.chat.completions.create(model="gpt-4o", messages=_ask("tool", "order 42?"), tools=[LOOKUP_TOOL])
    assert out.choices[0].finish_reason == "tool_calls"
    assert json.loads(out.choices[0].message.tool_calls[0].function.arguments) == {"order_id": "42"}
    chunks = list(r.client.chat.completions.create(model="gpt-4o", messages=_ask("tool", "order 42?"),
                                                   tools=[LOOKUP_TOOL], stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    calls = [tc for d in deltas for tc in (d.tool_calls or [])]
    assert calls[0].function.name == "lookup_order" and chunks[-1].choices[0].finish_reason == "tool_calls"


def test_slm_error_and_timeout_fall_back(router):
    r = router(slm_timeout=0.3)
    r.engine.script["intent"] = RuntimeError("CUDA out of memory")
    out = r.client.chat.completions.create(model="gpt-4o", messages=_ask("label", "hello"))
    assert out.choices[0].message.content.startswith("Echo:")
    r.engine.script["intent"] = ("sleep", 1.0)
    out = r.client.chat.completions.create(model="gpt-4o", messages=_ask("label", "hello again"))
    assert out.choices[0].message.content.startswith("Echo:")
    reasons = [rec.metadata["route"]["fallback"] for rec in r.records(expect=2)]
    assert reasons[0].startswith("slm error") and reasons[1].startswith("slm timeout")


def test_shadow_mode_answers_with_the_llm_and_records_agreement(router):
    r = router(shadow=True)
    r.engine.script["intent"] = {"role": "assistant", "content": "Echo: same words"}
    out = r.client.chat.completions.create(model="gpt-4o", messages=_ask("label", "same words"))
    assert out.choices[0].message.content == "Echo: same words"  # the LLM answered
    deadline = time.monotonic() + 10
    while r.router.metrics.snapshot()["clusters"].get("intent", {}).get("shadow", 0) < 1:
        assert time.monotonic() < deadline, "shadow comparison never ran"
        time.sleep(0.05)
    assert r.router.metrics.snapshot()["clusters"]["intent"]["agreement"] == 1.0
    rows = [json.loads(line) for line in r.router.settings.shadow_log.read_text().splitlines()]
    assert rows[0]["cluster"] == "intent" and rows[0]["agreement"] == 1.0
    metrics = r.client._client.get(r.server.base + "/slmigrate/metrics").text
    assert 'slmigrate_router_agreement{cluster="intent"} 1.0' in metrics
    assert r.records()[0].metadata["route"]["answered_by"] == "llm"


def test_canary_sends_the_configured_share():
    canary = Canary(25)
    picks = [canary.pick("c") for _ in range(8)]
    assert sum(picks) == 2
    assert sum(Canary(0).pick("c") for _ in range(10)) == 0
    assert sum(Canary(100).pick("c") for _ in range(10)) == 10


def test_validation_rules():
    tools = [LOOKUP_TOOL]
    def call(name, args):
        return {"role": "assistant", "content": None, "tool_calls": [
            {"id": "x", "type": "function", "function": {"name": name, "arguments": args}}]}
    assert validate_answer(call("lookup_order", '{"order_id": "1"}'), tools, "tool_call") == []
    assert "not valid JSON" in validate_answer(call("lookup_order", '{"order_id": '), tools, "tool_call")[0]
    assert "required" in validate_answer(call("lookup_order", "{}"), tools, "tool_call")[0]
    assert "is not of type" in validate_answer(call("lookup_order", '{"order_id": 5}'), tools, "tool_call")[0]
    assert validate_answer({"role": "assistant", "content": "sure"}, tools, "tool_call") == [
        "the task calls a tool, but the answer is text"]
    assert validate_answer({"role": "assistant", "content": "{\"a\": 1}"}, None, "json") == []
    assert validate_answer({"role": "assistant", "content": "a: 1"}, None, "json")
    assert validate_answer({"role": "assistant", "content": "  "}, None, "label") == ["empty answer"]


def test_real_engine_serves_two_adapters_on_one_base(tmp_path, stub):
    """The real SlmEngine: a tiny random Llama, two LoRA adapters loaded by name and switched per request."""
    import torch
    from peft import LoraConfig, get_peft_model
    from tiny_model import tiny_model_dir
    from transformers import AutoModelForCausalLM

    from slmigrate.serve.engine import SlmEngine

    base = tiny_model_dir(tmp_path)
    deployments = []
    for i, name in enumerate(("intent", "summary")):
        torch.manual_seed(i)
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                               LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
        model.save_pretrained(tmp_path / name)
        deployments.append(Deployment(name, tmp_path / name, str(base), "text", max_new_tokens=8))
    engine = SlmEngine(deployments, device="cpu")
    request = {"messages": [{"role": "user", "content": "hi"}]}
    a, b = engine.answer("intent", request), engine.answer("summary", request)
    assert 0 < a.completion_tokens <= 8 and a.prompt_tokens > 0
    assert a.text != b.text  # different adapters, different answers from the same base
    assert engine.answer("intent", request).text == a.text  # switching back restores the first adapter
    # each task is generated from its own merged copy by the batch-1 decoder: the same answer as HF generate
    # with the adapter unmerged
    from slmigrate import chat_format
    from slmigrate.evaluate.generate import generate

    assert list(engine._merged) == ["summary", "intent"]  # least recently used first
    engine.model.set_adapter(deployments[0].name)
    prompt = chat_format.render_prompt(engine.tokenizer, request["messages"], None).text
    plain = generate(engine.model, engine.tokenizer, [prompt], batch_size=1, max_new_tokens=8, fast=False)
    assert plain.texts == [a.text]


def test_real_engine_drops_the_static_prompt_its_adapter_was_trained_without(tmp_path):
    """A specialist trained without its task's fixed system prefix and tool list is served without them too;
    a request offering other tools keeps them."""
    import torch
    from peft import LoraConfig, get_peft_model
    from tiny_model import tiny_model_dir
    from transformers import AutoModelForCausalLM

    from slmigrate.chat_format import StaticPrompt
    from slmigrate.serve.engine import SlmEngine

    base = tiny_model_dir(tmp_path)
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.save_pretrained(tmp_path / "orders")
    prefix = "You are the order desk of ACME. Follow the refund policy. " * 3
    tools = [{"type": "function", "function": {"name": n, "description": "Look it up. " * 8,
                                               "parameters": {"type": "object"}}} for n in ("get_order", "refund")]
    static = StaticPrompt(prefix, tuple(tools))
    plain = Deployment("plain", tmp_path / "orders", str(base), "tool_call", max_new_tokens=4)
    pruned = Deployment("pruned", tmp_path / "orders", str(base), "tool_call", static=static, max_new_tokens=4)
    engine = SlmEngine([plain, pruned], device="cpu")
    request = {"messages": [{"role": "system", "content": prefix + "Shift 3."},
                            {"role": "user", "content": "Where is order 12?"}], "tools": tools}
    full = engine.answer("plain", request).prompt_tokens
    short = engine.answer("pruned", request).prompt_tokens
    other_tools = engine.answer("pruned", {**request, "tools": tools[:1]}).prompt_tokens
    assert short < other_tools < full


def test_admin_endpoints_need_the_token_when_one_is_set(router):
    import httpx

    r = router(admin_token="adm-2")
    for path in ("/slmigrate/health", "/slmigrate/metrics", "/slmigrate/routes"):
        assert httpx.get(r.server.base + path).status_code == 401
        assert httpx.get(r.server.base + path, headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert httpx.get(r.server.base + path, headers={"Authorization": "Bearer adm-2"}).status_code == 200
