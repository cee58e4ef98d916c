"""`slmigrate serve --slm-endpoint`: migrated tasks answered by an OpenAI-compatible server of the adapters.

The router is the real one (``build_app`` with its own ``load_deployments`` over a workspace with an evaluation
and an adapter folder), behind the real openai client, with the stub LLM upstream. The adapter server is a small
scripted HTTP app on a real port - what it answers is chosen per test (a tool call written as the adapter's text,
garbage, an error, nothing in time) - or no server at all. The same router against the real adapter server
(`serve --adapters-only` with SmolLM2) as two processes is in test_serve_real.py.
"""

import asyncio
import json

import httpx
import openai
import pytest
from stub_llm import ServerThread, StubLLM, expected_completion, free_port, stored_calls

from slmigrate import artifacts
from slmigrate.collect.writer import RecordWriter
from slmigrate.serve import RouterSettings, build_app
from slmigrate.serve.adapter_server import create_app as adapter_app
from slmigrate.serve.engine import SlmAnswer
from slmigrate.serve.export import export_vllm
from slmigrate.store import Store
from slmigrate.workspace import Workspace

CLUSTER = "c01.intent"  # a cluster id that is no valid LoRA module name as it is: the name must be derived once
STATIC = "You are the order desk of ACME."
TOOL = {"type": "function", "function": {
    "name": "lookup_order", "description": "Find an order.",
    "parameters": {"type": "object", "properties": {"order_id": {"type": "string"}}, "required": ["order_id"]}}}
ASK = [{"role": "system", "content": STATIC + " Answer briefly."}, {"role": "user", "content": "Where is A-17?"}]


class ScriptedEndpoint:
    """An OpenAI-compatible adapter server whose answer each test picks; it keeps what it was asked."""

    def __init__(self):
        self.seen: list[tuple[dict, dict]] = []  # (headers, body)
        self.mode = "tool_call"

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return  # lifespan: nothing to set up
        chunks = []
        while True:
            message = await receive()
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        body = json.loads(b"".join(chunks))
        self.seen.append(({k.decode(): v.decode() for k, v in scope["headers"]}, body))
        status, raw = 200, b""
        if self.mode == "tool_call":  # what vLLM returns without a tool parser: the adapter's text
            text = '<tool_call>{"name": "lookup_order", "arguments": {"order_id": "A-17"}}</tool_call>'
            raw = json.dumps({"id": "cmpl-1", "object": "chat.completion", "model": body["model"],
                              "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                           "finish_reason": "stop"}],
                              "usage": {"prompt_tokens": 40, "completion_tokens": 9}}).encode()
        elif self.mode == "garbage":
            raw = b"<html>502 Bad Gateway</html>"
        elif self.mode == "not a completion":
            raw = b'{"object": "list", "data": []}'
        elif self.mode == "error":
            status, raw = 500, b'{"error": {"message": "CUDA out of memory"}}'
        elif self.mode == "slow":
            await asyncio.sleep(3)
            raw = b"{}"
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())]})
        await send({"type": "http.response.body", "body": raw})


@pytest.fixture(scope="module")
def stub():
    with StubLLM() as server:
        yield server


@pytest.fixture
def endpoint():
    app = ScriptedEndpoint()
    with ServerThread(app) as server:
        app.url = server.base + "/v1"
        yield app


def migrated_workspace(root) -> Workspace:
    """A workspace whose evaluation migrates one task with an adapter on disk (trained without STATIC)."""
    ws = Workspace.open(root)
    adapter = ws.path("adapters", CLUSTER, "smollm2-135m")
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text(json.dumps({"r": 8, "base_model_name_or_path": "base-model"}))
    (adapter / "static_prefix.txt").write_text(STATIC)
    artifacts.write_evaluation(ws, {"run": "test", "clusters": [{
        "cluster": CLUSTER, "kind": "tool_call", "primary_metric": "tool_call_exact", "threshold": 0.9,
        "adapter": ws.relative(adapter), "variants": {"finetuned": {"primary": 0.95}},
        "decision": {"migrate": True}}]})
    return ws


class Routed:
    """The router over ``migrated_workspace`` with ``--slm-endpoint url``, every request assigned to CLUSTER."""

    def __init__(self, root, stub, url: str, **settings):
        self.ws = migrated_workspace(root)
        self.writer = RecordWriter(lambda: Store(self.ws.root / "slmigrate.sqlite"))
        self.app, self.router = build_app(
            self.ws, RouterSettings(upstream=stub.url, slm_endpoint=url, guard_sample=0, **settings),
            writer=self.writer, assign=lambda request: (CLUSTER, 0.1))
        self.server = ServerThread(self.app).start()
        self.client = openai.OpenAI(base_url=self.server.base + "/v1", api_key="sk-test", max_retries=0)

    def ask(self):
        return self.client.chat.completions.create(model="gpt-4o", messages=ASK, tools=[TOOL])

    def route(self) -> dict:
        [rec] = stored_calls(self.writer, self.ws.root / "slmigrate.sqlite")
        return rec.metadata["route"]

    def close(self):
        self.server.stop()
        self.writer.close()
        self.router.engine.close()


@pytest.fixture
def routed(tmp_path, stub):
    made = []

    def make(url: str, **settings) -> Routed:
        made.append(Routed(tmp_path / f"ws{len(made)}", stub, url, **settings))
        return made[-1]

    yield make
    for r in made:
        r.close()


def test_a_migrated_task_is_answered_by_the_endpoint_under_its_lora_module_name(routed, endpoint, stub,
                                                                               monkeypatch):
    monkeypatch.setenv("SLMIGRATE_SLM_API_KEY", "sk-endpoint-secret")
    r = routed(endpoint.url)
    before = len(stub.requests)
    out = r.ask()
    [call] = out.choices[0].message.tool_calls
    assert (call.function.name, json.loads(call.function.arguments)) == ("lookup_order", {"order_id": "A-17"})
    assert out.model == "slmigrate/c01-intent" and out.usage.completion_tokens == 9
    assert len(stub.requests) == before  # the LLM was not asked
    [(headers, body)] = endpoint.seen
    # The module name `export vllm` launches the adapter under is the one asked for.
    [exported] = export_vllm(r.ws)["routing"]["routes"]
    assert body["model"] == exported["model"] == "c01-intent"
    assert headers["authorization"] == "Bearer sk-endpoint-secret"
    # The adapter was trained without its task's static prefix; a serving engine does not know it, so the router
    # removes it before asking.
    assert body["messages"][0]["content"] == "Answer briefly." and body["tools"] == [TOOL]
    assert body["temperature"] == 0 and body["max_tokens"] == 256 and "stream" not in body
    route = r.route()
    assert route["answered_by"] == "slm" and route["cluster"] == CLUSTER and route["served_by"] == endpoint.url
    assert "sk-endpoint-secret" not in json.dumps(route)


@pytest.mark.parametrize("mode, reason", [
    ("down", "slm error: ConnectError"),
    ("garbage", "slm error: EndpointError"),
    ("not a completion", "slm error: EndpointError"),
    ("error", "slm error: EndpointError"),
    # The router stops waiting at --slm-timeout; the engine's own request ends at the same timeout (whichever
    # comes first names the reason).
    ("slow", ("slm timeout after 1s", "slm error: ReadTimeout")),
])
def test_an_endpoint_that_fails_never_fails_the_client(routed, endpoint, mode, reason):
    endpoint.mode = mode
    r = routed(f"http://127.0.0.1:{free_port()}/v1" if mode == "down" else endpoint.url, slm_timeout=1)
    out = r.ask()
    # The client gets the LLM's answer, as if the small model had never been tried.
    expected = expected_completion({"model": "gpt-4o", "messages": ASK, "tools": [TOOL]})
    assert out.choices[0].message.tool_calls[0].function.arguments == \
        expected["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"]
    assert not out.model.startswith("slmigrate/")
    assert len(endpoint.seen) == (0 if mode == "down" else 1)
    route = r.route()
    assert (route["answered_by"], route["cluster"]) == ("llm", CLUSTER)
    assert route["fallback"] in ((reason,) if isinstance(reason, str) else reason)
    assert r.router.metrics.snapshot()["clusters"][CLUSTER]["fallback"] == 1


def test_the_adapter_server_answers_by_module_name_and_checks_its_key():
    class Engine:
        deployments = {CLUSTER: type("D", (), {"name": "c01-intent"})()}
        asked: list = []

        def answer(self, cluster, request):
            self.asked.append((cluster, request["messages"][-1]["content"]))
            return SlmAnswer(message={"role": "assistant", "content": "refund"}, text="refund", prompt_tokens=5,
                             completion_tokens=1, latency_ms=2.0, finish_reason="stop")

    engine = Engine()
    with ServerThread(adapter_app(engine, api_key="k1")) as server:
        client = openai.OpenAI(base_url=server.base + "/v1", api_key="k1", max_retries=0)
        assert [m.id for m in client.models.list()] == ["c01-intent"]
        out = client.chat.completions.create(model="c01-intent", messages=[{"role": "user", "content": "hi"}])
        assert (out.model, out.choices[0].message.content) == ("c01-intent", "refund")
        assert engine.asked == [(CLUSTER, "hi")]
        with pytest.raises(openai.NotFoundError, match="c01-intent"):
            client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
        wrong = httpx.post(server.base + "/v1/chat/completions", json={"model": "c01-intent", "messages": []},
                           headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and len(engine.asked) == 1


def test_adapters_only_says_when_there_is_nothing_to_serve(tmp_path, capsys):
    from slmigrate.cli import main

    ws = Workspace.open(tmp_path / "ws")
    ws.store.close()  # creates the store: a workspace the CLI recognises
    artifacts.write_evaluation(ws, {"run": "test", "clusters": [{"cluster": CLUSTER, "kind": "label",
                                                                 "decision": {"migrate": False}}]})
    assert main(["-w", str(ws.root), "serve", "--adapters-only"]) == 1
    assert "no migrated cluster with an adapter to serve" in capsys.readouterr().err
