"""Nothing lost, nothing leaked: one poisoned call must not stop the logging of the others.

The writer with a real SQLite store (a record the store refuses, a failing store, the dead-letter file), then the
real `slmigrate collect proxy` process and the router app, each driven by the real `openai` client against the
stub upstream: poisoned requests and answers first, then 50 normal calls, which must all be stored.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import stat
import subprocess
import sys
from pathlib import Path

import httpx
import openai
import pytest
from stub_llm import DEEP, ServerThread, StubLLM, expected_completion, free_port, wait_http

from conftest import wait_for
from slmigrate.collect import deadletter
from slmigrate.record import CallRecord, RecordError
from slmigrate.store import Store
from slmigrate.collect.writer import RecordWriter, _store_failure

ROOT = Path(__file__).resolve().parent.parent
SECRETS = ("alice", "pa55word", "sekrit-key")


@pytest.fixture(scope="module")
def stub():
    with StubLLM() as server:
        yield server


def _call(i: int, **fields) -> CallRecord:
    request = {"model": "m", "messages": [{"role": "user", "content": f"call {i}"}]}
    return CallRecord(request=request, response=expected_completion(request), source="proxy", **fields)


def _refused(i: int) -> CallRecord:
    # Passes finalise() but not the store: metadata is written as JSON, and a set is not JSON.
    return _call(i, metadata={"odd": {1, 2}})



def _stored(db: Path) -> list[CallRecord]:
    with Store(db) as store:
        return list(store.iter_calls())


# --- the writer ------------------------------------------------------------------------------------------

def test_a_record_the_store_refuses_is_dead_lettered_and_every_other_call_stored(tmp_path):
    db, dead = tmp_path / "s.sqlite", tmp_path / deadletter.FILE_NAME
    writer = RecordWriter(lambda: Store(db), deadletter_path=dead)
    try:
        for i in range(41):  # submitted at once, so they share a batch and the refused one must be bisected out
            writer.submit(_refused(i) if i == 17 else _call(i))
        assert writer.flush(10)
        assert sorted(r.messages[0]["content"] for r in _stored(db)) == sorted(
            f"call {i}" for i in range(41) if i != 17)
        (line,) = deadletter.read(dead)
        assert line["reason"].startswith("the store refused this call: TypeError") and "set" in line["reason"]
        assert line["payload"]["request"]["messages"][0]["content"] == "call 17" and line["source"] == "proxy"
        assert stat.S_IMODE(dead.stat().st_mode) == 0o600
        stats = writer.stats()
        assert (stats["logged"], stats["deadlettered"], stats["dropped"]) == (40, 1, 0) and stats["healthy"]
        assert stats["deadletter_file"] == str(dead)
        for i in range(41, 46):  # and logging goes on
            writer.submit(_call(i))
        assert writer.flush(10) and len(_stored(db)) == 45
    finally:
        writer.close()


def test_a_lone_refused_record_waits_until_the_store_takes_another(tmp_path):
    """Refused alone, a record cannot tell a bad record from a bad store: it is retried, not dead-lettered, until
    a call the store does take proves the store works."""
    db, dead = tmp_path / "s.sqlite", tmp_path / deadletter.FILE_NAME
    writer = RecordWriter(lambda: Store(db), deadletter_path=dead)
    try:
        writer.submit(_refused(0))
        assert not writer.flush(0.5)
        stats = writer.stats()
        assert stats["retained"] == 1 and stats["deadlettered"] == 0 and not stats["healthy"]
        writer.submit(_call(1))
        assert writer.flush(10)
        stats = writer.stats()
        assert (stats["logged"], stats["deadlettered"], stats["retained"]) == (1, 1, 0) and stats["healthy"]
    finally:
        writer.close()


def test_a_failing_store_is_retried_and_what_it_never_took_is_dead_lettered_at_exit(tmp_path):
    db, dead = tmp_path / "ro.sqlite", tmp_path / deadletter.FILE_NAME
    Store(db).close()
    writer = RecordWriter(lambda: Store(db, readonly=True), deadletter_path=dead)
    for i in range(3):
        writer.submit(_call(i))
    wait_for(lambda: writer.stats()["store_failures"] >= 2, what="retries")
    stats = writer.stats()
    assert stats["retained"] == 3 and stats["deadlettered"] == 0 and "readonly" in stats["last_error"]
    writer.close()
    lines = deadletter.read(dead)
    assert len(lines) == 3 and writer.stats()["dropped"] == 0
    assert lines[0]["reason"].startswith("the store still failed at shutdown: OperationalError")


def test_dead_letter_payloads_are_sealed_when_a_key_is_set(tmp_path, monkeypatch):
    from slmigrate.store import crypto

    monkeypatch.setenv("SLMIGRATE_ENCRYPTION_KEY", crypto.generate_key())
    db, dead = tmp_path / "s.sqlite", tmp_path / deadletter.FILE_NAME
    writer = RecordWriter(lambda: Store(db), deadletter_path=dead)
    try:
        refused = _refused(1)
        refused.request["messages"][0]["content"] = "mail eve@corp.example"
        for rec in (_call(0), refused, _call(2)):
            writer.submit(rec)
        assert writer.flush(10)
    finally:
        writer.close()
    assert b"eve@corp.example" not in dead.read_bytes()
    (line,) = deadletter.read(dead)
    assert line["payload"]["request"]["messages"][0]["content"] == "mail eve@corp.example"


def test_an_item_that_cannot_become_a_record_is_dead_lettered_or_counted_as_dropped(tmp_path):
    class Unreadable:
        def to_record(self):
            raise RecordError("too odd")

        def dead_letter(self):
            return {"source": "test"}, {"raw": "kept bytes"}

    dead = tmp_path / deadletter.FILE_NAME
    with_file = RecordWriter(lambda: Store(tmp_path / "a.sqlite"), deadletter_path=dead)
    without = RecordWriter(lambda: Store(tmp_path / "b.sqlite"))
    try:
        for writer in (with_file, without):
            writer.submit(Unreadable())
            assert writer.flush(10)
    finally:
        with_file.close()
        without.close()
    (line,) = deadletter.read(dead)
    assert line["reason"] == "could not be turned into a record: RecordError: too odd"
    assert line["payload"] == {"raw": "kept bytes"} and line["source"] == "test"
    assert (with_file.stats()["deadlettered"], with_file.stats()["dropped"]) == (1, 0)
    assert (without.stats()["deadlettered"], without.stats()["dropped"]) == (0, 1)


def test_store_failures_are_told_from_record_failures():
    class OperationalError(Exception):  # as psycopg names its connection and server errors
        pass

    for exc in (sqlite3.OperationalError("database is locked"), sqlite3.DatabaseError("file is not a database"),
                OSError(28, "No space left on device"), OperationalError("server closed the connection")):
        assert _store_failure(exc), exc
    for exc in (sqlite3.IntegrityError("NOT NULL"), sqlite3.DataError("string or blob too big"),
                OverflowError("Python int too large to convert to SQLite INTEGER"), TypeError("set"),
                RecordError("too deep")):
        assert not _store_failure(exc), exc


# --- through the real proxy process and the router ----------------------------------------------------------

POISON_MODEL = {"name": "gpt-4o", "tier": 2}


def _secret_upstream(stub) -> str:
    return stub.url.replace("http://", "http://alice:pa55word@") + "?api_key=sekrit-key"


def _send_poison_then_50_calls(base: str, system: str) -> None:
    """Poisoned requests and answers through ``base`` (an OpenAI base URL), then 50 normal calls."""
    client = openai.OpenAI(base_url=base, api_key="sk-test", max_retries=0)
    ask = lambda text: [{"role": "system", "content": system}, {"role": "user", "content": text}]  # noqa: E731
    # Requests a careless client sends: a model that is an object, a model beyond 64 bits.
    assert client.chat.completions.create(model=POISON_MODEL, messages=ask("object model")).choices
    assert client.chat.completions.create(model=10**20, messages=ask("huge model")).choices
    # An upstream answer with an absurd count.
    assert client.chat.completions.create(model="stub-poison-usage", messages=ask("huge usage")).usage
    # Unstorable: a request nested deeper than Python parses (the openai client cannot even send it) and such an
    # answer. Both are relayed as they are; neither can be stored.
    deep_request = (b'{"model": "stub", "messages": [{"role": "user", "content": "deep request"}], "metadata": '
                    + b"[" * DEEP + b"]" * DEEP + b"}")
    relayed = httpx.post(base + "/chat/completions", content=deep_request,
                         headers={"content-type": "application/json"}, timeout=30)
    assert relayed.status_code == 200 and relayed.json()["choices"]
    relayed = httpx.post(base + "/chat/completions", timeout=30,
                         json={"model": "stub-poison-deep", "messages": ask("deep answer")})
    assert relayed.status_code == 200 and relayed.content.startswith(b'{"choices": [[[')
    for i in range(50):
        if i % 2:
            stream = client.chat.completions.create(model="stub", messages=ask(f"normal {i}"), stream=True)
            text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        else:
            text = client.chat.completions.create(model="stub", messages=ask(f"normal {i}")).choices[0].message.content
        assert text.endswith(f"normal {i}")


def _check_stored(db: Path, dead: Path, expect_calls: int) -> dict[str, CallRecord]:
    calls = {r.messages[-1]["content"]: r for r in _stored(db)}
    assert len(calls) == expect_calls
    assert sorted(k for k in calls if k.startswith("normal ")) == sorted(f"normal {i}" for i in range(50))
    assert all(calls[f"normal {i}"].status == "ok" for i in range(50))
    assert json.loads(calls["object model"].model) == POISON_MODEL  # kept as its JSON text
    assert calls["object model"].request["model"] == POISON_MODEL  # the payload as sent
    assert calls["huge model"].model == str(10**20)
    usage = calls["huge usage"]
    assert usage.status == "ok" and usage.prompt_tokens is None and usage.completion_tokens == 3  # count dropped
    lines = deadletter.read(dead)
    assert stat.S_IMODE(dead.stat().st_mode) == 0o600
    reasons = sorted(line["reason"] for line in lines)
    assert len(lines) == 2 and "request body is nested deeper" in reasons[0] and "answer is nested deeper" in reasons[1]
    by_reason = {("request" if "request body" in line["reason"] else "answer"): line for line in lines}
    assert by_reason["request"]["payload"]["request_body"].startswith('{"model": "stub", "messages"')
    assert by_reason["answer"]["payload"]["response_body"].startswith('{"choices": [[[')
    assert by_reason["answer"]["http_status"] == 200
    return calls


def _no_secrets(*texts: str) -> None:
    for text in texts:
        for secret in SECRETS:
            assert secret not in text, (secret, text[:500])


def test_poison_through_the_real_proxy_process(tmp_path, stub):
    ws = tmp_path / "ws"
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("SLMIGRATE_ADMIN_TOKEN", None)
    proc = subprocess.Popen([sys.executable, "-m", "slmigrate", "collect", "proxy", "--upstream",
                             _secret_upstream(stub), "--port", str(port), "-w", str(ws), "--json"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_http(base + "/slmigrate/health", proc, timeout=60)
        _send_poison_then_50_calls(base + "/v1", "You are terse.")

        def capture() -> dict:
            return httpx.get(base + "/slmigrate/health").json()["capture"]

        wait_for(lambda: capture()["logged"] == 53 and capture()["deadlettered"] == 2,
                 what="53 stored, 2 dead-lettered")
        health = httpx.get(base + "/slmigrate/health")
        metrics = httpx.get(base + "/slmigrate/metrics").text
        assert health.json()["upstream"].startswith("http://***@127.0.0.1") and "api_key=***" in health.text
        assert "slmigrate_capture_deadlettered_total 2" in metrics and "slmigrate_capture_dropped_total 0" in metrics
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, err.decode()
    final = json.loads(out)
    assert (final["logged"], final["deadlettered"], final["dropped"]) == (53, 2, 0)
    assert "http://***@127.0.0.1" in err.decode() and "api_key=***" in err.decode()  # the start-up line
    _no_secrets(health.text, metrics, out.decode(), err.decode())
    _check_stored(ws / "slmigrate.sqlite", ws / deadletter.FILE_NAME, expect_calls=53)


class _Engine:
    """A scripted small model that answers the "Classify" task (see test_serve.py for the full set)."""

    def __init__(self, tmp_path: Path):
        from slmigrate.serve.deployment import Deployment

        self.deployments = {"intent": Deployment("intent", tmp_path, "base", "label")}

    def answer(self, cluster, request):
        from slmigrate.serve.engine import SlmAnswer

        message = {"role": "assistant", "content": "refund_request"}
        return SlmAnswer(message=message, text="refund_request", prompt_tokens=9, completion_tokens=2,
                         latency_ms=1.0, finish_reason="stop")


def _assign(request):
    return ("intent", 0.1) if request["messages"][0]["content"].startswith("Classify") else (None, None)


def test_poison_through_the_router(tmp_path, stub):
    from slmigrate.serve import RouterSettings, build_app
    from slmigrate.workspace import Workspace

    ws = Workspace.open(tmp_path / "ws")
    # The writer build_app makes itself: the workspace's store and dead-letter file, as `slmigrate serve` runs.
    app, _router = build_app(ws, RouterSettings(upstream=_secret_upstream(stub)), engine=_Engine(tmp_path),
                             assign=_assign)
    writer = app.proxy_app.state.writer
    with ServerThread(app) as server:
        _send_poison_then_50_calls(server.base + "/v1", "You are a poet.")  # all of these go to the LLM
        client = openai.OpenAI(base_url=server.base + "/v1", api_key="sk-test", max_retries=0)
        slm = client.chat.completions.create(model=POISON_MODEL, messages=[
            {"role": "system", "content": "Classify the intent."}, {"role": "user", "content": "slm object model"}])
        assert slm.choices[0].message.content == "refund_request"
        wait_for(lambda: writer.stats()["logged"] == 54 and writer.stats()["deadlettered"] == 2, what="the log")
        health = httpx.get(server.base + "/slmigrate/health")
        metrics = httpx.get(server.base + "/slmigrate/metrics").text
    writer.close()
    assert health.json()["capture"]["deadlettered"] == 2 and health.json()["capture"]["dropped"] == 0
    assert "slmigrate_capture_deadlettered_total 2" in metrics
    _no_secrets(health.text, metrics)
    calls = _check_stored(ws.store.path, ws.path(deadletter.FILE_NAME), expect_calls=54)
    answered = calls["slm object model"]
    assert answered.model == "slmigrate/intent" and answered.request["model"] == POISON_MODEL
    assert answered.metadata["route"]["answered_by"] == "slm"
    assert all(calls[f"normal {i}"].metadata["route"]["answered_by"] == "llm" for i in range(50))
