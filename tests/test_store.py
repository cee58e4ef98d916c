"""The SQLite store: migrations on open, WAL mode, duplicates by content hash, payload round trips."""

import sqlite3

import pytest

from slmigrate import store as store_mod
from slmigrate.errors import SlmigrateError
from slmigrate.record import CallRecord
from slmigrate.store import PayloadCodec, Store


def _call(text, **kw):
    return CallRecord(request={"model": "m", "messages": [{"role": "user", "content": text}]},
                      response={"choices": [{"index": 0, "finish_reason": "stop",
                                             "message": {"role": "assistant", "content": text.upper()}}],
                                "usage": {"prompt_tokens": 3, "completion_tokens": 1}},
                      timestamp="2025-01-01T00:00:00Z", **kw)


def test_new_store_is_migrated_and_in_wal_mode(tmp_path):
    with Store(tmp_path / "s.sqlite") as s:
        assert s.schema_version == len(store_mod.MIGRATIONS)
        assert s.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        tables = {r[0] for r in s.conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        assert {"calls", "call_clusters", "manifests"} <= tables


def test_newer_schema_and_non_database_are_clear_errors(tmp_path):
    path = tmp_path / "s.sqlite"
    Store(path).close()
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA user_version = 999")
    conn.close()
    with pytest.raises(SlmigrateError, match="newer"):
        Store(path)
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"this is not a database" * 100)
    with pytest.raises(SlmigrateError, match="cannot open the store"):
        Store(junk)


def test_duplicates_by_content_hash(tmp_path):
    with Store(tmp_path / "s.sqlite") as s:
        assert s.insert_calls([_call("a"), _call("b")]) == (2, 0)
        assert s.insert_calls([_call("a"), _call("c"), _call("c")]) == (1, 2)
        # Same text at another time is another call.
        assert s.insert_calls([CallRecord(**{**_call("a").__dict__, "timestamp": "2025-02-01T00:00:00Z"})]) == (1, 0)
        assert s.count_calls() == 4


def test_payloads_round_trip_and_listing_skips_them(tmp_path):
    rec = _call("héllo ✓", input_id="x-1", agent="bot", session="s", metadata={"k": [1, 2]})
    rec.response["choices"][0]["message"]["tool_calls"] = [
        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1.5}'}}]
    with Store(tmp_path / "s.sqlite") as s:
        s.insert_calls([rec])
        got = s.get_call("x-1")
        assert got.request == rec.request and got.response == rec.response
        assert (got.agent, got.session, got.metadata, got.prompt_tokens) == ("bot", "s", {"k": [1, 2]}, 3)
        assert s.conn.execute("SELECT n_tool_calls FROM calls").fetchone()[0] == 1
        light = next(s.iter_calls(decode=False))
        assert light.request == {} and light.id == got.id


def test_encode_rows_then_insert_rows_equals_insert_calls(tmp_path):
    with Store(tmp_path / "a.sqlite") as a, Store(tmp_path / "b.sqlite") as b:
        a.insert_calls([_call("x"), _call("y")])
        assert b.insert_rows(b.encode_rows([_call("x"), _call("y")])) == (2, 0)
        strip = lambda s: [(c.id, c.content_hash, c.request, c.response) for c in s.iter_calls()]  # noqa: E731
        assert strip(a) == strip(b)


def test_codec_handles_values_orjson_cannot():
    codec = PayloadCodec()
    value = {"big": 2**70, "text": "ünïcode"}
    assert codec.decode(codec.encode(value)) == value


def test_rows_written_with_the_older_zlib_codec_still_read(tmp_path):
    """Stores written before the zstd codec keep their "json" (zlib) rows readable."""
    from slmigrate.store import ZlibPayloadCodec

    call = CallRecord(request={"messages": [{"role": "user", "content": "old row"}]},
                      response={"choices": []}, timestamp="2025-01-01T00:00:00Z")
    old = Store(tmp_path / "s.sqlite", codec=ZlibPayloadCodec())
    old.insert_calls([call])
    old.close()
    new = Store(tmp_path / "s.sqlite")
    assert new.codec.name == "zjson"
    (rec,) = list(new.iter_calls())
    assert rec.request["messages"][0]["content"] == "old row"
