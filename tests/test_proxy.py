"""The logging proxy, driven by the real `openai` client against the stub upstream (tests/stub_llm.py).

Fast tests run the proxy in-process (uvicorn in a thread); the load and SIGTERM tests run `slmigrate collect
proxy` as a subprocess. Everything listens on 127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import copy
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from slmigrate.collect.proxy.app import ProxySettings, create_app
from slmigrate.store import Store
from slmigrate.collect.streaming import chunks_from_sse, merge_chunks, merge_timed_sse
from slmigrate.collect.writer import RecordWriter

sys.path.insert(0, str(Path(__file__).parent))
from stub_llm import ServerThread, StubLLM, expected_completion, free_port, stored_calls, stream_chunks  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TOOLS = [{"type": "function", "function": {"name": "lookup_order", "description": "Find an order",
                                           "parameters": {"type": "object",
                                                          "properties": {"query": {"type": "string"}}}}}]


@pytest.fixture(scope="module")
def stub():
    with StubLLM() as server:
        yield server


class Proxy:
    def __init__(self, upstream: str, db: Path, store_factory=None, writer_kwargs=None, **settings):
        self.db = db
        self.writer = RecordWriter(store_factory or (lambda: Store(db)), **(writer_kwargs or {}))
        self.app = create_app(ProxySettings(upstream=upstream, **settings), self.writer)
        self.server = ServerThread(self.app).start()
        self.base = self.server.base
        self.url = self.base + "/v1"

    def client(self, **kwargs) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url, api_key="sk-test-SECRET-123", max_retries=0, **kwargs)

    def records(self, expect: int = 1):
        return stored_calls(self.writer, self.db, expect)

    def stop(self):
        self.server.stop()
        self.writer.close()


@pytest.fixture
def make_proxy(stub, tmp_path):
    made = []

    def make(upstream=None, **kwargs):
        proxy = Proxy(upstream or stub.url, tmp_path / f"p{len(made)}.sqlite", **kwargs)
        made.append(proxy)
        return proxy

    yield make
    for proxy in made:
        proxy.stop()


@pytest.fixture
def proxy(make_proxy):
    return make_proxy(agent="default-agent")


def _no_logprobs(completion: dict) -> dict:
    out = copy.deepcopy(completion)
    for choice in out["choices"]:
        choice.pop("logprobs", None)
    return out


# --- streaming.merge_chunks -----------------------------------------------------------------------------

def test_merge_chunks_rebuilds_the_stubs_completions():
    for request in (
        {"model": "m", "messages": [{"role": "user", "content": "hello big world"}],
         "stream_options": {"include_usage": True}},
        {"model": "m", "messages": [{"role": "user", "content": "where is order 42"}], "tools": TOOLS,
         "stream_options": {"include_usage": True}},
    ):
        assert _no_logprobs(merge_chunks(stream_chunks(request))) == _no_logprobs(expected_completion(request))


def test_merge_chunks_parallel_tool_calls_text_fields_and_names():
    chunks = [
        {"id": "x", "model": "m", "created": 1, "choices": [{"index": 0, "delta": {"role": "assistant"}}]},
        {"choices": [{"index": 0, "delta": {"reasoning_content": "think", "tool_calls": [
            {"index": 0, "id": "a", "type": "function", "function": {"name": "f", "arguments": '{"x"'}},
            {"index": 1, "id": "b", "type": "function", "function": {"name": "g", "arguments": ""}}]}}]},
        {"choices": [{"index": 0, "delta": {"reasoning_content": "ing", "tool_calls": [
            {"index": 1, "function": {"name": "g", "arguments": '{"y": 2}'}},
            {"index": 0, "function": {"arguments": ": 1}"}}]}}]},
        {"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]},
        {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 4}},
    ]
    merged = merge_chunks(chunks)
    message = merged["choices"][0]["message"]
    assert merged["object"] == "chat.completion" and merged["id"] == "x" and merged["usage"]["prompt_tokens"] == 3
    assert message["content"] is None and message["reasoning_content"] == "thinking"
    assert [(c["id"], c["function"]["name"], c["function"]["arguments"]) for c in message["tool_calls"]] == [
        ("a", "f", '{"x": 1}'), ("b", "g", '{"y": 2}')]
    assert merged["choices"][0]["finish_reason"] == "tool_calls"
    legacy = merge_chunks([{"choices": [{"delta": {"function_call": {"name": "f", "arguments": "{"}}}]},
                           {"choices": [{"delta": {"function_call": {"arguments": "}"}}}]}])
    assert legacy["choices"][0]["message"]["function_call"] == {"name": "f", "arguments": "{}"}


def test_merge_timed_sse_handles_split_events_and_measures_ttft():
    request = {"model": "m", "messages": [{"role": "user", "content": "a b"}]}
    body = b"".join(f"data: {json.dumps(c)}\r\n\r\n".encode() for c in stream_chunks(request)) + b"data: [DONE]\n\n"
    pieces = [(0.010 * (i + 1), body[i * 37:(i + 1) * 37]) for i in range(len(body) // 37 + 1)]
    merged, ttft, error = merge_timed_sse(pieces)
    assert merged["choices"][0]["message"]["content"] == "Echo: a b" and error is None
    first = body.index(b'"content": "Echo:"')  # the first event with text completes in this piece or later
    assert ttft >= 10 * (first // 37 + 1)
    assert len(chunks_from_sse(body)) == len(stream_chunks(request))


# --- the proxy with the real openai client ----------------------------------------------------------------

def test_sync_call_is_relayed_and_stored_field_by_field(proxy, stub):
    client = proxy.client(default_headers={"X-Slmigrate-Agent": "billing", "X-Slmigrate-Session": "run-7"})
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "hello there"}]
    reply = client.chat.completions.create(model="stub", messages=messages, temperature=0.2, user="customer-991")
    sent = {"model": "stub", "messages": messages, "temperature": 0.2, "user": "customer-991"}
    expected = expected_completion(sent)
    assert reply.model_dump(exclude_unset=True) == expected
    seen = stub.requests[-1]
    assert seen["headers"]["authorization"] == "Bearer sk-test-SECRET-123"
    assert not any(h.startswith("x-slmigrate") for h in seen["headers"])
    assert seen["body"]["user"] == "customer-991"  # forwarded unchanged, only not stored

    (rec,) = proxy.records()
    assert rec.source == "proxy" and rec.agent == "billing" and rec.session == "run-7"
    assert rec.request == {"model": "stub", "messages": messages, "temperature": 0.2}
    assert rec.response == expected
    assert rec.status == "ok" and rec.error is None and rec.model == "stub"
    assert (rec.prompt_tokens, rec.completion_tokens) == (5, 3)
    assert rec.input_id == expected["id"] and rec.ttft_ms is None and 0 < rec.latency_ms < 10_000
    assert rec.metadata == {"path": "/v1/chat/completions", "http_status": 200, "stream": False}
    raw = proxy.db.read_bytes() + (proxy.db.parent / (proxy.db.name + "-wal")).read_bytes()
    assert b"sk-test-SECRET-123" not in raw and b"customer-991" not in raw


def test_streamed_tool_call_is_merged_with_ttft(proxy):
    client = proxy.client()
    messages = [{"role": "user", "content": "where is order 42"}]
    stream = client.chat.completions.create(model="stub", messages=messages, tools=TOOLS, stream=True,
                                            stream_options={"include_usage": True})
    chunks = [c.model_dump(exclude_unset=True) for c in stream]
    sent = {"model": "stub", "messages": messages, "tools": TOOLS, "stream": True,
            "stream_options": {"include_usage": True}}
    assert chunks == stream_chunks(sent)
    (rec,) = proxy.records()
    expected = expected_completion(sent)
    assert _no_logprobs(rec.response) == _no_logprobs(expected)
    call = rec.answer["tool_calls"][0]
    assert call["function"] == {"name": "lookup_order", "arguments": json.dumps({"query": "where is order 42"})}
    assert rec.finish_reason == "tool_calls" and rec.completion_tokens == expected["usage"]["completion_tokens"]
    assert rec.agent == "default-agent" and rec.metadata["stream"] is True
    assert rec.ttft_ms is not None and 0 < rec.ttft_ms <= rec.latency_ms


def test_stream_as_context_manager_and_tool_result_turn(proxy):
    client = proxy.client()
    messages = [{"role": "user", "content": "order 42?"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "call_1", "type": "function", "function": {"name": "lookup_order", "arguments": "{}"}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "shipped monday"}]
    with client.chat.completions.create(model="stub", messages=messages, tools=TOOLS, stream=True) as stream:
        text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == "Tool said: shipped monday"
    (rec,) = proxy.records()
    assert rec.answer["content"] == "Tool said: shipped monday" and rec.messages[2]["role"] == "tool"


def test_async_client_plain_and_streaming(proxy):
    async def run():
        client = openai.AsyncOpenAI(base_url=proxy.url, api_key="k", max_retries=0)
        plain = await client.chat.completions.create(model="stub", messages=[{"role": "user", "content": "one"}])
        stream = await client.chat.completions.create(model="stub", stream=True,
                                                      messages=[{"role": "user", "content": "two words"}])
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        await client.close()
        return plain.choices[0].message.content, text

    assert asyncio.run(run()) == ("Echo: one", "Echo: two words")
    recs = {r.messages[0]["content"]: r for r in proxy.records(expect=2)}
    assert recs["one"].answer["content"] == "Echo: one" and recs["one"].ttft_ms is None
    assert recs["two words"].answer["content"] == "Echo: two words" and recs["two words"].ttft_ms > 0


def test_bytes_reach_the_client_unchanged(proxy, stub):
    body = {"model": "stub", "messages": [{"role": "user", "content": "same bytes please"}]}
    for payload in (body, {**body, "stream": True, "tools": TOOLS}):
        direct = httpx.post(stub.url + "/chat/completions", json=payload)
        via = httpx.post(proxy.url + "/chat/completions", json=payload)
        assert via.status_code == direct.status_code == 200
        assert via.content == direct.content
        assert via.headers["content-type"] == direct.headers["content-type"]


def test_path_prefix_tags_the_agent(proxy):
    client = openai.OpenAI(base_url=proxy.base + "/agent/router-bot/v1", api_key="k", max_retries=0)
    assert client.chat.completions.create(model="stub", messages=[{"role": "user", "content": "hi"}])
    assert client.models.list().data[0].id == "stub"  # passthrough under the prefix too
    (rec,) = proxy.records()
    assert rec.agent == "router-bot"


def test_other_v1_paths_pass_through_unlogged(proxy):
    client = proxy.client()
    assert [m.id for m in client.models.list().data] == ["stub"]
    emb = client.embeddings.create(model="e", input=["a", "b"])
    assert len(emb.data) == 2 and len(emb.data[0].embedding) == 8
    assert proxy.records(expect=0) == []
    assert httpx.get(proxy.base + "/elsewhere").status_code == 404


@pytest.mark.parametrize("status,exc", [(400, openai.BadRequestError), (429, openai.RateLimitError),
                                        (500, openai.InternalServerError)])
def test_upstream_errors_pass_through_and_are_logged(proxy, status, exc):
    with pytest.raises(exc) as info:
        proxy.client().chat.completions.create(model=f"stub-error-{status}",
                                               messages=[{"role": "user", "content": "boom"}])
    assert info.value.status_code == status
    assert info.value.body["message"] == f"stub error {status} on request"
    (rec,) = proxy.records()
    assert rec.status == "error" and rec.error.startswith(f"HTTP {status}: ")
    assert rec.response["error"]["message"] == f"stub error {status} on request"
    assert rec.metadata["http_status"] == status and rec.answer is None


def test_unreachable_upstream_gives_502_and_timeout_504(make_proxy):
    dead = make_proxy(upstream=f"http://127.0.0.1:{free_port()}/v1")
    with pytest.raises(openai.APIStatusError) as info:
        dead.client().chat.completions.create(model="stub", messages=[{"role": "user", "content": "x"}])
    assert info.value.status_code == 502 and "upstream unreachable" in info.value.message
    (rec,) = dead.records()
    assert rec.status == "error" and "ConnectError" in rec.error

    slow = make_proxy(timeout=0.3)
    with pytest.raises(openai.APIStatusError) as info:
        slow.client().chat.completions.create(model="stub-slow-3000", messages=[{"role": "user", "content": "x"}])
    assert info.value.status_code == 504
    (rec,) = slow.records()
    assert rec.status == "error" and "timed out" in rec.error and rec.latency_ms < 3000


def test_stream_broken_off_upstream_is_logged_as_failed(proxy):
    with pytest.raises(openai.APIError):
        stream = proxy.client().chat.completions.create(model="stub-cut", stream=True,
                                                        messages=[{"role": "user", "content": "a b c d"}])
        for _ in stream:
            pass
    (rec,) = proxy.records()
    assert rec.status == "error" and "broke off" in rec.error


def test_origin_is_anonymised_unless_kept(make_proxy):
    plain, kept = make_proxy(), make_proxy(keep_origin=True)
    for p in (plain, kept):
        p.client(default_headers={"X-User-Id": "u-77"}).chat.completions.create(
            model="stub", messages=[{"role": "user", "content": "hi"}], user="end-user-5", safety_identifier="s-1")
    (a,), (b,) = plain.records(), kept.records()
    assert "user" not in a.request and "safety_identifier" not in a.request and "origin" not in a.metadata
    assert b.request["user"] == "end-user-5"
    origin = b.metadata["origin"]
    assert origin["client_ip"] == "127.0.0.1" and origin["user"] == "end-user-5"
    assert origin["headers"]["x-user-id"] == "u-77" and "authorization" not in origin["headers"]


def test_health_and_metrics_behind_admin_token(make_proxy):
    p = make_proxy(admin_token="adm-1")
    assert httpx.get(p.base + "/slmigrate/health").status_code == 401
    assert httpx.get(p.base + "/slmigrate/metrics", headers={"Authorization": "Bearer nope"}).status_code == 401
    p.client().chat.completions.create(model="stub", messages=[{"role": "user", "content": "hi"}])
    p.writer.flush()
    auth = {"Authorization": "Bearer adm-1"}
    health = httpx.get(p.base + "/slmigrate/health", headers=auth).json()
    assert health["status"] == "ok" and health["capture"]["logged"] == 1 and health["capture"]["dropped"] == 0
    text = httpx.get(p.base + "/slmigrate/metrics", headers=auth).text
    assert 'slmigrate_proxy_requests_total{route="chat_completions"} 1' in text
    assert "slmigrate_capture_logged_total 1" in text and "slmigrate_capture_dropped_total 0" in text
    assert 'slmigrate_proxy_request_duration_seconds_bucket{le="+Inf"} 1' in text


def test_locked_store_does_not_block_traffic_and_catches_up(make_proxy):
    p = make_proxy(writer_kwargs={"busy_timeout_ms": 50})
    Store(p.db).close()  # create the schema first
    locker = sqlite3.connect(p.db, isolation_level=None)
    locker.execute("BEGIN EXCLUSIVE")
    client = p.client()
    started = time.perf_counter()
    for i in range(5):
        assert client.chat.completions.create(
            model="stub", messages=[{"role": "user", "content": f"m{i}"}]).choices[0].message.content == f"Echo: m{i}"
    assert time.perf_counter() - started < 5
    deadline = time.monotonic() + 5
    while p.writer.stats()["store_failures"] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    health = httpx.get(p.base + "/slmigrate/health").json()
    assert health["status"] == "degraded" and health["capture"]["store_failures"] >= 1
    assert "locked" in health["capture"]["last_error"]
    locker.execute("ROLLBACK")
    locker.close()
    assert len(p.records(expect=5)) == 5 and p.writer.stats()["dropped"] == 0


def test_read_only_store_drops_are_counted_and_traffic_flows(make_proxy, tmp_path):
    db = tmp_path / "ro.sqlite"
    Store(db).close()
    p = make_proxy(store_factory=lambda: Store(db, readonly=True), writer_kwargs={"max_retained": 2})
    client = p.client()
    for i in range(5):
        assert client.chat.completions.create(model="stub", messages=[{"role": "user", "content": f"r{i}"}])
    deadline = time.monotonic() + 5
    while p.writer.stats()["dropped"] < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    stats = httpx.get(p.base + "/slmigrate/health").json()["capture"]
    assert stats["dropped"] >= 3 and stats["store_failures"] >= 1 and "readonly" in stats["last_error"]
    assert 'slmigrate_capture_dropped_total' in httpx.get(p.base + "/slmigrate/metrics").text


# --- load and shutdown, with the proxy as a subprocess -----------------------------------------------------

def _start_cli_proxy(upstream: str, ws: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("SLMIGRATE_ADMIN_TOKEN", None)
    proc = subprocess.Popen([sys.executable, "-m", "slmigrate", "collect", "proxy", "--upstream", upstream,
                             "--port", str(port), "-w", str(ws), "--json"], env=env, cwd=ws.parent,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(proc.stderr.read().decode())
        try:
            if httpx.get(base + "/slmigrate/health", timeout=1).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    raise AssertionError("proxy did not start")


def _request(i: int) -> dict:
    kind = i % 4  # plain, streamed text, tool call, streamed tool call
    body = {"model": "stub", "messages": [{"role": "user", "content": f"request number {i}"}]}
    if kind >= 2:
        body["tools"] = TOOLS
    if kind % 2:
        body["stream"] = True
    return body


async def _one(client: openai.AsyncOpenAI, i: int) -> bool:
    body = _request(i)
    expected = expected_completion(body)["choices"][0]["message"]
    if body.get("stream"):
        stream = await client.chat.completions.create(**body)
        chunks = [c.model_dump(exclude_unset=True) async for c in stream]
        got = merge_chunks(chunks)["choices"][0]["message"]
    else:
        got = (await client.chat.completions.create(**body)).model_dump(exclude_unset=True)["choices"][0]["message"]
    assert got == expected, (i, got, expected)
    return True


async def _load(base: str, n: int, concurrency: int, results: dict, on_progress=None) -> None:
    http = httpx.AsyncClient(limits=httpx.Limits(max_connections=concurrency), timeout=60)
    client = openai.AsyncOpenAI(base_url=base + "/v1", api_key="k", max_retries=0, http_client=http)
    queue: asyncio.Queue = asyncio.Queue()
    for i in range(n):
        queue.put_nowait(i)

    async def worker():
        while not queue.empty():
            i = queue.get_nowait()
            try:
                await _one(client, i)
                results["ok"].add(i)
            except AssertionError:
                raise
            except Exception as exc:  # refused/cut by the shutdown
                results["failed"][i] = type(exc).__name__
            if on_progress:
                on_progress(len(results["ok"]))

    try:
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    finally:
        await client.close()


def _stored_numbers(ws: Path) -> list[int]:
    with Store(ws / "slmigrate.sqlite") as store:
        return [int(r.messages[0]["content"].rsplit(" ", 1)[1]) for r in store.iter_calls()]


@pytest.mark.slow
def test_load_2000_requests_at_concurrency_64(tmp_path):
    stub = subprocess.Popen([sys.executable, str(ROOT / "tests" / "stub_llm.py"), "--port", str(port := free_port())])
    ws = tmp_path / "ws"
    proc, base = _start_cli_proxy(f"http://127.0.0.1:{port}/v1", ws)
    try:
        results = {"ok": set(), "failed": {}}
        asyncio.run(_load(base, 2000, 64, results))
        assert results["failed"] == {} and len(results["ok"]) == 2000
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err.decode()
        assert json.loads(out)["logged"] == 2000
    finally:
        proc.kill()
        stub.kill()
    stored = _stored_numbers(ws)
    assert sorted(stored) == list(range(2000))
    with Store(ws / "slmigrate.sqlite") as store:
        recs = list(store.iter_calls())
    streamed = [r for r in recs if r.metadata["stream"]]
    assert len(streamed) == 1000 and all(r.ttft_ms is not None for r in streamed)
    assert sum(1 for r in recs if r.finish_reason == "tool_calls") == 1000


@pytest.mark.slow
def test_sigterm_during_load_loses_no_answered_call(tmp_path):
    stub = subprocess.Popen([sys.executable, str(ROOT / "tests" / "stub_llm.py"), "--port", str(port := free_port())])
    ws = tmp_path / "ws"
    proc, base = _start_cli_proxy(f"http://127.0.0.1:{port}/v1", ws)
    sent_signal = []

    def progress(done: int) -> None:
        if done >= 300 and not sent_signal:
            sent_signal.append(done)
            proc.send_signal(signal.SIGTERM)

    try:
        results = {"ok": set(), "failed": {}}
        asyncio.run(_load(base, 1200, 64, results, on_progress=progress))
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err.decode()
    finally:
        proc.kill()
        stub.kill()
    assert sent_signal and results["failed"], "the shutdown should have cut the load short"
    stored = _stored_numbers(ws)
    assert len(stored) == len(set(stored))
    assert results["ok"] <= set(stored), "an answered call was not stored"
    assert set(stored) <= results["ok"] | set(results["failed"])
    assert json.loads(out)["dropped"] == 0


def test_proxy_encrypts_payloads_when_a_key_is_set(make_proxy, monkeypatch):
    from slmigrate.store import crypto

    monkeypatch.setenv("SLMIGRATE_ENCRYPTION_KEY", crypto.generate_key())
    p = make_proxy()
    p.client().chat.completions.create(model="stub", messages=[{"role": "user", "content": "mail eve@corp.example"}])
    (rec,) = p.records()
    assert rec.answer["content"] == "Echo: mail eve@corp.example"
    raw = b"".join(f.read_bytes() for f in p.db.parent.glob(p.db.name + "*"))
    assert b"eve@corp.example" not in raw
    with Store(p.db) as store:
        assert set(crypto.codec_counts(store)) == {crypto.AesGcmCodec(crypto.configured_key()).name}


@pytest.mark.slow
def test_hard_kill_loses_at_most_the_last_flush_interval(tmp_path):
    stub = subprocess.Popen([sys.executable, str(ROOT / "tests" / "stub_llm.py"), "--port", str(port := free_port())])
    ws = tmp_path / "ws"
    proc, base = _start_cli_proxy(f"http://127.0.0.1:{port}/v1", ws)
    try:
        client = openai.OpenAI(base_url=base + "/v1", api_key="k", max_retries=0)
        for i in range(40):
            client.chat.completions.create(**{k: v for k, v in _request(i).items() if k != "stream"})
        # Wait for the proxy to say every answered call is written (a busy box may take longer than the 200 ms
        # flush bound, which tests/benchmarks measures), then kill it without warning: what it reported as
        # logged must be on disk.
        deadline = time.monotonic() + 30
        while httpx.get(base + "/slmigrate/health", timeout=5).json()["capture"]["logged"] < 40:
            assert time.monotonic() < deadline, "the proxy never reported the 40 calls as written"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        proc.kill()
        stub.kill()
    assert sorted(_stored_numbers(ws)) == list(range(40))


# --- answers that are not chat completions -------------------------------------------------------------------

@pytest.mark.parametrize("model,stream,why", [
    ("stub-broken-json", False, "HTTP 200 answer is not JSON (application/json)"),
    ("stub-broken-html", False, "HTTP 200 answer is not JSON (text/html)"),
    ("stub-broken-sse", True, "stream error: 1 event(s) not a chat.completion.chunk"),
    ("stub-poison-usage", False, None),
])
def test_broken_200_answers_reach_the_client_unchanged_and_are_stored_as_errors(proxy, stub, model, stream, why):
    from slmigrate.config import CurateConfig
    from slmigrate.curate.run import drop_reason

    body = {"model": model, "messages": [{"role": "user", "content": "is this answer sound"}], "stream": stream}
    direct = httpx.post(stub.url + "/chat/completions", json=body)
    via = httpx.post(proxy.url + "/chat/completions", json=body)
    assert via.status_code == direct.status_code == 200 and via.content == direct.content
    (rec,) = proxy.records()
    if why is None:  # a sound answer with one absurd count: stored as ok, the count dropped
        assert rec.status == "ok" and rec.prompt_tokens is None and rec.completion_tokens == 5
        return
    assert rec.status == "error" and rec.error.startswith(why), rec.error
    assert "is this answer sound" not in rec.error  # the plain error column names shapes, never content
    assert drop_reason(rec, CurateConfig()) == "failed"  # curate never trains on it
    if model == "stub-broken-sse":  # the good events are still merged, the garbage left out
        assert rec.answer["content"] == "Echo: is this answer sound"
    else:
        assert rec.response["_unparsed_body"] == direct.text


def test_completion_problem_names_what_is_missing():
    from slmigrate.collect.proxy.exchange import completion_problem

    good = expected_completion({"model": "m", "messages": [{"role": "user", "content": "x"}]})
    assert completion_problem(good) is None
    assert completion_problem(None) == "is empty"
    assert completion_problem([1]) == "is a JSON array, not a chat completion object"
    assert completion_problem({"error": {"type": "overloaded"}}) == "carries an error (overloaded)"
    assert completion_problem({"id": "x"}) == "has no choices"
    assert completion_problem({"choices": [{"text": "legacy"}]}) == "has a choice without a message object"


# --- credentials never shown ------------------------------------------------------------------------------

def test_upstream_credentials_are_used_but_never_shown(make_proxy, stub):
    secret_url = stub.url.replace("http://", "http://alice:pa55word@") + "?api-version=2024-10&api_key=sekrit-key"
    p = make_proxy(upstream=secret_url)
    assert p.client().chat.completions.create(model="stub", messages=[{"role": "user", "content": "hi"}])
    seen = stub.requests[-1]
    assert "api_key=sekrit-key" in seen["query"] and "api-version=2024-10" in seen["query"]  # still forwarded
    health = httpx.get(p.base + "/slmigrate/health")
    metrics = httpx.get(p.base + "/slmigrate/metrics")
    assert health.json()["upstream"] == stub.url.replace("http://", "http://***@") + "?api-version=2024-10&api_key=***"
    for text in (health.text, metrics.text):
        assert "pa55word" not in text and "sekrit-key" not in text and "alice" not in text
