"""The store on a real PostgreSQL server (tests/pg_server.py), and the same store tests on SQLite side by side.

Skips with the reason when no PostgreSQL binaries or psycopg are installed; .ci/run installs both.
"""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import pytest

from slmigrate import store as store_mod
from slmigrate.errors import SlmigrateError
from slmigrate.record import CallRecord
from slmigrate.store import Store

sys.path.insert(0, str(Path(__file__).parent))
from pg_server import PgServer, PgUnavailable, run_proxies, text_of  # noqa: E402
from conftest import skip_unless_required  # noqa: E402


@pytest.fixture(scope="module")
def pg_server():
    try:
        server = PgServer.start()
    except PgUnavailable as exc:
        skip_unless_required("postgres", f"no PostgreSQL server for these tests: {exc}")
    yield server
    server.stop()


@pytest.fixture
def pg_url(pg_server):
    return pg_server.new_database()


@pytest.fixture(params=["sqlite", "postgresql"])
def location(request, tmp_path):
    """A fresh, empty store location on each backend."""
    if request.param == "sqlite":
        return str(tmp_path / "s.sqlite")
    return request.getfixturevalue("pg_url")


def _call(text, **kw):
    return CallRecord(request={"model": "m", "messages": [{"role": "user", "content": text}]},
                      response={"choices": [{"index": 0, "finish_reason": "stop",
                                             "message": {"role": "assistant", "content": text.upper()}}],
                                "usage": {"prompt_tokens": 3, "completion_tokens": 1}},
                      timestamp="2025-01-01T00:00:00Z", **kw)


# --- the store's contract, on both backends ---------------------------------------------------------------------

def test_new_store_is_migrated_and_pending_migrations_apply_once(location, monkeypatch):
    with Store(location) as s:
        assert s.schema_version == len(store_mod.MIGRATIONS)
        for table in ("calls", "call_clusters", "manifests"):
            assert s.conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0] == 0
    extra = "CREATE TABLE probe (x INTEGER); INSERT INTO probe VALUES (1);"
    monkeypatch.setattr(store_mod, "MIGRATIONS", [*store_mod.MIGRATIONS, extra])
    for _ in range(2):  # the second open must not run it again
        with Store(location) as s:
            assert s.schema_version == len(store_mod.MIGRATIONS)
            assert s.conn.execute("SELECT COUNT(*) FROM probe").fetchone()[0] == 1


def test_duplicates_by_content_hash(location):
    with Store(location) as s:
        assert s.insert_calls([_call("a"), _call("b")]) == (2, 0)
        assert s.insert_calls([_call("a"), _call("c"), _call("c")]) == (1, 2)
        assert s.insert_calls([CallRecord(**{**_call("a").__dict__, "timestamp": "2025-02-01T00:00:00Z"})]) == (1, 0)
        assert s.count_calls() == 4


def test_payloads_round_trip_and_reads_page_filter_and_order(location):
    rec = _call("héllo ✓ 100%?", input_id="x-1", agent="bot", session="s", metadata={"k": [1, 2]},
                latency_ms=123.456789012, outcome=0.123456789)
    rec.response["choices"][0]["message"]["tool_calls"] = [
        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1.5}'}}]
    with Store(location) as s:
        s.insert_calls([rec])
        got = s.get_call("x-1")
        assert got.request == rec.request and got.response == rec.response
        assert (got.agent, got.session, got.metadata, got.prompt_tokens) == ("bot", "s", {"k": [1, 2]}, 3)
        assert (got.latency_ms, got.outcome) == (rec.latency_ms, rec.outcome)  # 8-byte floats on both
        assert s.conn.execute("SELECT n_tool_calls FROM calls WHERE id = ?", (got.id,)).fetchone()[0] == 1
        assert next(s.iter_calls(decode=False)).request == {}
        seq = s.max_seq()
        s.insert_calls([_call(f"call {i:02d}", agent="a" if i % 2 else "b") for i in range(11)])
        everything = list(s.iter_calls(batch=3))  # pages of 3 across 12 rows
        ids = [c.id for c in everything]
        assert len(ids) == 12 and ids == sorted(ids)
        assert [c.id for c in s.iter_calls(limit=5, batch=2)] == ids[:5]
        assert {c.request["messages"][0]["content"] for c in s.iter_calls(since_seq=seq, batch=4)} == {
            f"call {i:02d}" for i in range(11)}
        assert [c.id for c in s.iter_calls(ids=ids[3:6], batch=2)] == ids[3:6]
        counts = {r["key"]: r["calls"] for r in s.group_counts("agent")}
        assert counts == {"a": 5, "b": 6, "bot": 1}
        before = s.fingerprint()
        s.insert_calls([_call("one more")])
        assert s.fingerprint() != before and s.max_seq() == seq + 2


def test_stage_tables_manifests_and_clusters(location):
    with Store(location) as s:
        s.insert_calls([_call("x"), _call("y")])
        ids = [c.id for c in s.iter_calls(decode=False)]
        s.put_manifest("curate", "fp1", {"counts": {"n": 1}}, "2025-01-01T00:00:00Z")
        s.put_manifest("curate", "fp2", {"counts": {"n": 2}}, "2025-01-02T00:00:00Z")  # replaces, not a second row
        assert s.get_manifest("curate") == {"stage": "curate", "created": "2025-01-02T00:00:00Z",
                                            "fingerprint": "fp2", "counts": {"n": 2}}
        assert s.get_manifest("cluster") is None
        s.set_clusters({ids[0]: "c1", ids[1]: None})
        s.set_clusters({ids[0]: "c2", ids[1]: None})
        assert s.clusters_of() == {ids[0]: "c2", ids[1]: None}


# --- PostgreSQL specifics -----------------------------------------------------------------------------------

def test_store_urls_and_connection_errors_are_clear(pg_server, tmp_path):
    with pytest.raises(SlmigrateError, match="unknown scheme"):
        Store("mysql://u:secret@h/db")
    assert Store(f"sqlite:///{tmp_path}/x.sqlite").path == tmp_path / "x.sqlite"
    from pg_server import free_port

    with pytest.raises(SlmigrateError, match="cannot connect to the store") as err:
        Store(f"postgresql://slm:hunter2@127.0.0.1:{free_port()}/nowhere")
    assert "hunter2" not in str(err.value)
    with pytest.raises(SlmigrateError, match="cannot connect"):
        Store(pg_server.url("no_such_database"))


def test_newer_schema_is_refused(pg_url):
    Store(pg_url).close()
    with Store(pg_url) as s, s.conn:
        s.conn.execute("UPDATE slmigrate_schema SET version = 999")
    with pytest.raises(SlmigrateError, match="newer"):
        Store(pg_url)


def test_many_processes_opening_a_fresh_database_at_once_migrate_it_once(pg_url):
    errors, stores = [], []

    def open_one():
        try:
            stores.append(Store(pg_url))
        except Exception as exc:  # pragma: no cover - the failure being tested for
            errors.append(exc)

    threads = [threading.Thread(target=open_one) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(stores) == 6
    assert stores[0].conn.execute("SELECT COUNT(*), MAX(version) FROM slmigrate_schema").fetchone()[:] == (
        1, len(store_mod.MIGRATIONS))


def test_concurrent_writers_lose_nothing_and_number_batches_in_commit_order(pg_url):
    """Four connections insert overlapping batches at once: every distinct call lands once, duplicates are counted,
    and each batch gets its own inserted_seq (a reader taking "after seq N" can never skip a batch)."""
    calls = [_call(f"shared call {i}") for i in range(400)]
    results, errors = [], []

    def write(k):
        try:
            with Store(pg_url) as s:
                for start in range(0, 400, 40):  # every writer sends every call: 3 of 4 copies are duplicates
                    batch = calls[start:start + 40] if k % 2 else calls[start:start + 40][::-1]
                    results.append(s.insert_calls([CallRecord(**c.__dict__) for c in batch]))
        except Exception as exc:  # pragma: no cover
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sum(r[0] for r in results) == 400 and sum(r[1] for r in results) == 1200
    with Store(pg_url) as s:
        assert s.count_calls() == 400
        per_seq = s.conn.execute("SELECT inserted_seq, COUNT(*) FROM calls GROUP BY inserted_seq").fetchall()
        assert len(per_seq) == sum(1 for r in results if r[0] > 0)


def test_writer_reconnects_after_a_server_restart(pg_server, pg_url):
    from slmigrate.collect.writer import RecordWriter

    writer = RecordWriter(lambda: Store(pg_url), flush_interval=0.05)
    try:
        for i in range(20):
            writer.submit(_call(f"before {i}"))
        assert writer.flush(20)
        pg_server.restart()  # the writer's connection dies here
        for i in range(20):
            writer.submit(_call(f"after {i}"))
        assert writer.flush(60)
        stats = writer.stats()
        assert stats["logged"] == 40 and stats["dropped"] == 0
    finally:
        writer.close()
    with Store(pg_url) as s:
        assert s.count_calls() == 40


def test_key_rotation_on_postgres(pg_url):
    from slmigrate.store import crypto
    from slmigrate.store import PayloadCodec

    old_key, new_key = (crypto.parse_key(crypto.generate_key(), "t") for _ in range(2))
    Store(pg_url, codec=PayloadCodec()).insert_calls([_call("plain one")])
    store = Store(pg_url, codec=crypto.AesGcmCodec(old_key))
    store.insert_calls([_call(f"secret {i}") for i in range(9)])
    result = crypto.rotate(store, new_key, old_key, batch=4)
    assert result["rotated"] == 10 and result["after"] == {crypto.AesGcmCodec(new_key).name: 10}
    reader = Store(pg_url, codec=crypto.AesGcmCodec(new_key))
    assert sorted(c.request["messages"][0]["content"] for c in reader.iter_calls())[0] == "plain one"


def test_stages_on_postgres_match_sqlite(pg_url, tmp_path, monkeypatch):
    """Curate (--pii off), cluster (hash embedder), status and the CLI's --store / SLMIGRATE_STORE give the same
    results with the calls in PostgreSQL as in the workspace's SQLite file."""
    from test_cluster import hash_cfg, synthetic_log

    from slmigrate.curate import dataset as curated
    from slmigrate.cli import main
    from slmigrate.cluster import cluster
    from slmigrate.config import Config, CurateConfig
    from slmigrate.curate.run import curate
    from slmigrate.status import status
    from slmigrate.workspace import Workspace

    calls, _ = synthetic_log()
    results = {}
    for name, store in (("sqlite", None), ("postgresql", pg_url)):
        ws = Workspace.open(tmp_path / name, store=store)
        assert ws.store.insert_calls([CallRecord(**c.__dict__) for c in calls]) == (len(calls), 0)
        curate(ws, CurateConfig(pii="off"))
        body = cluster(ws, Config(cluster=hash_cfg()))
        results[name] = (
            [(r.id, r.messages, r.split) for r in curated.load_curated(ws)],
            [c["size"] for c in body.clusters],
            ws.store.clusters_of(),
            {k: v for k, v in status(ws).items() if k not in {"workspace", "stages"}},
        )
    assert results["postgresql"] == results["sqlite"]
    assert not (tmp_path / "postgresql" / "slmigrate.sqlite").exists()

    monkeypatch.setenv("SLMIGRATE_STORE", pg_url)
    assert main(["status", "--workspace", str(tmp_path / "env"), "--json"]) == 0
    monkeypatch.delenv("SLMIGRATE_STORE")
    fixture = Path(__file__).parent / "fixtures" / "formats" / "openai.jsonl"
    assert main(["--store", pg_url, "collect", "import", str(fixture), "--workspace", str(tmp_path / "cli")]) == 0
    assert Store(pg_url).count_calls() == len(calls) + 3


@pytest.mark.slow
def test_four_proxies_writing_20000_calls_at_once_into_one_database_lose_none(pg_url, tmp_path):
    """Four real `slmigrate collect proxy` processes, one PostgreSQL database, 20,000 chat completions at once."""
    result = run_proxies(pg_url, tmp_path, proxies=4, calls=20_000, concurrency=16)
    assert result["wrong_answers"] == []
    for stats in result["proxy_stats"]:
        assert (stats["dropped"], stats["pending"], stats["retained"]) == (0, 0, 0), stats
    failed = len(result["upstream_failures"])  # answered 5xx by a proxy, retried by the client, logged as errors
    with Store(pg_url) as s:
        rows = s.count_calls()
        assert rows == sum(stats["logged"] for stats in result["proxy_stats"])
        seen, errors = {}, 0
        for call in s.iter_calls(batch=5000):
            if call.status != "ok":
                errors += 1
                continue
            text = call.request["messages"][0]["content"]
            assert call.response["choices"][0]["message"]["content"] == "Echo: " + text
            assert text not in seen, text
            seen[text] = call.agent
    assert seen == {text_of(k, i): f"proxy-{k}" for k in range(4) for i in range(5000)}
    assert failed <= errors <= failed + len(result["transport_errors"])
