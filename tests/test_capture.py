"""`slmigrate.collect.capture.instrument()` with real openai clients against the stub upstream."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import openai
import pytest

from slmigrate.store import crypto
from slmigrate.collect.capture import flush, instrument
from slmigrate.errors import SlmigrateError
from slmigrate.collect.writer import RecordWriter, shared_writer

sys.path.insert(0, str(Path(__file__).parent))
from stub_llm import StubLLM, expected_completion, free_port, stream_chunks  # noqa: E402

TOOLS = [{"type": "function", "function": {"name": "get_weather",
                                           "parameters": {"type": "object",
                                                          "properties": {"query": {"type": "string"}}}}}]


@pytest.fixture(scope="module")
def stub():
    with StubLLM() as server:
        yield server


def _records(workspace):
    assert flush(10)
    return list(workspace.store.iter_calls())


def test_sync_call_unchanged_and_logged(stub, workspace):
    plain = openai.OpenAI(base_url=stub.url, api_key="k", max_retries=0)
    wrapped = instrument(openai.OpenAI(base_url=stub.url, api_key="k", max_retries=0), agent="triage",
                         workspace=workspace, session="wf-1")
    messages = [{"role": "user", "content": "is it raining"}]
    a = plain.chat.completions.create(model="stub", messages=messages, user="person-1")
    b = wrapped.chat.completions.create(model="stub", messages=messages, user="person-1")
    assert type(a) is type(b) and a.model_dump() == b.model_dump()
    (rec,) = _records(workspace)
    assert rec.source == "sdk" and rec.agent == "triage" and rec.session == "wf-1" and rec.status == "ok"
    assert rec.request == {"model": "stub", "messages": messages}  # `user` is an origin identifier: not stored
    assert rec.response == expected_completion({"model": "stub", "messages": messages, "user": "person-1"})
    assert (rec.prompt_tokens, rec.completion_tokens) == (3, 4) and rec.latency_ms > 0 and rec.ttft_ms is None
    assert isinstance(shared_writer(workspace.store.path), RecordWriter)  # the proxy's writer class


def test_sync_stream_with_tools_as_context_manager(stub, workspace):
    plain = openai.OpenAI(base_url=stub.url, api_key="k")
    wrapped = instrument(openai.OpenAI(base_url=stub.url, api_key="k"), agent="weather", workspace=workspace)
    kwargs = dict(model="stub", messages=[{"role": "user", "content": "weather in Oslo"}], tools=TOOLS,
                  stream=True, stream_options={"include_usage": True})
    with plain.chat.completions.create(**kwargs) as s:
        direct = [c.model_dump() for c in s]
    with wrapped.chat.completions.create(**kwargs, extra_headers={"X-Slmigrate-Session": "per-call"}) as s:
        assert type(s) is openai.Stream
        got = [c.model_dump() for c in s]
    assert got == direct
    assert "x-slmigrate-session" not in stub.requests[-1]["headers"]
    (rec,) = _records(workspace)
    assert rec.session == "per-call" and rec.metadata["stream"] is True
    sent = {k: v for k, v in kwargs.items()}
    call = rec.answer["tool_calls"][0]
    assert call["function"]["arguments"] == '{"query": "weather in Oslo"}' and rec.finish_reason == "tool_calls"
    assert rec.completion_tokens == expected_completion(sent)["usage"]["completion_tokens"]
    assert rec.ttft_ms is not None and rec.ttft_ms <= rec.latency_ms
    assert len(got) == len(stream_chunks(sent))


def test_async_plain_stream_and_stream_helper(stub, workspace):
    async def run():
        client = instrument(openai.AsyncOpenAI(base_url=stub.url, api_key="k"), agent="async-bot",
                            workspace=workspace)
        one = await client.chat.completions.create(model="stub", messages=[{"role": "user", "content": "a1"}])
        stream = await client.chat.completions.create(model="stub", stream=True,
                                                      messages=[{"role": "user", "content": "a2 b2"}])
        async with stream:
            two = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        async with client.chat.completions.stream(model="stub",
                                                  messages=[{"role": "user", "content": "a3"}]) as helper:
            three = (await helper.get_final_completion()).choices[0].message.content
        return one.choices[0].message.content, two, three

    assert asyncio.run(run()) == ("Echo: a1", "Echo: a2 b2", "Echo: a3")
    recs = {r.messages[0]["content"]: r for r in _records(workspace)}
    assert {k: r.answer["content"] for k, r in recs.items()} == {"a1": "Echo: a1", "a2 b2": "Echo: a2 b2",
                                                                 "a3": "Echo: a3"}
    assert all(r.agent == "async-bot" and r.source == "sdk" for r in recs.values())
    assert recs["a2 b2"].ttft_ms is not None and recs["a1"].ttft_ms is None


def test_errors_reach_the_caller_and_are_logged(stub, workspace):
    client = instrument(openai.OpenAI(base_url=stub.url, api_key="k", max_retries=0), workspace=workspace)
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(model="stub-error-429", messages=[{"role": "user", "content": "x"}])
    dead = instrument(openai.OpenAI(base_url=f"http://127.0.0.1:{free_port()}/v1", api_key="k", max_retries=0),
                      workspace=workspace)
    with pytest.raises(openai.APIConnectionError):
        dead.chat.completions.create(model="stub", messages=[{"role": "user", "content": "y"}])
    recs = {r.messages[0]["content"]: r for r in _records(workspace)}
    assert recs["x"].status == "error" and recs["x"].error == "HTTP 429: rate_limit_exceeded"
    assert recs["y"].status == "error" and "ConnectError" in recs["y"].error


def test_other_endpoints_are_not_logged_and_instrument_is_idempotent(stub, workspace):
    client = instrument(openai.OpenAI(base_url=stub.url, api_key="k"), agent="a", workspace=workspace)
    instrument(client, agent="b", workspace=workspace)
    assert client.models.list().data[0].id == "stub"
    client.chat.completions.create(model="stub", messages=[{"role": "user", "content": "once"}])
    (rec,) = _records(workspace)
    assert rec.agent == "b"


def test_encrypted_workspace(stub, tmp_path, monkeypatch):
    from slmigrate.workspace import Workspace

    monkeypatch.setenv("SLMIGRATE_ENCRYPTION_KEY", crypto.generate_key())
    ws = Workspace.open(tmp_path / "enc")
    client = instrument(openai.OpenAI(base_url=stub.url, api_key="k"), workspace=ws)
    client.chat.completions.create(model="stub", messages=[{"role": "user", "content": "mail bob@corp.example"}])
    assert flush(10)
    assert crypto.codec_counts(ws.store) == {crypto.AesGcmCodec(crypto.configured_key()).name: 1}
    for name in ("slmigrate.sqlite", "slmigrate.sqlite-wal"):
        if (ws.root / name).exists():
            assert b"bob@corp.example" not in (ws.root / name).read_bytes()


def test_instrument_rejects_other_objects(workspace):
    with pytest.raises(SlmigrateError, match="expects an openai.OpenAI"):
        instrument(object(), workspace=workspace)


def test_sdk_capture_marks_broken_answers_and_dead_letters_unstorable_ones(stub, workspace):
    from slmigrate.collect import deadletter

    client = instrument(openai.OpenAI(base_url=stub.url, api_key="k", max_retries=0), workspace=workspace)
    messages = [{"role": "user", "content": "odd answers"}]
    for model in ("stub-broken-html", "stub-poison-deep"):  # raw: the SDK's own parsing is not what is tested
        raw = client.chat.completions.with_raw_response.create(model=model, messages=messages)
        assert raw.http_response.status_code == 200
    (rec,) = _records(workspace)
    assert rec.status == "error" and rec.error == "HTTP 200 answer is not JSON (text/html)"
    (line,) = deadletter.read(workspace.path(deadletter.FILE_NAME))
    assert "answer is nested deeper" in line["reason"] and line["source"] == "sdk"
