"""Encryption at rest: AES-256-GCM payloads, clear errors without the key, rotation, nothing findable on disk."""

import os
import stat

import pytest

from slmigrate.store import crypto
from slmigrate.cli import main
from slmigrate.errors import SlmigrateError
from slmigrate.record import CallRecord
from slmigrate.store import PayloadCodec, Store, unpack

EMAIL = "jane.planted.doe@example-secret.org"


@pytest.fixture(autouse=True)
def _no_key(monkeypatch):
    monkeypatch.delenv("SLMIGRATE_ENCRYPTION_KEY", raising=False)
    crypto.use_key_file(None)
    yield
    crypto.use_key_file(None)


def _call(text: str, agent: str = "bot") -> CallRecord:
    return CallRecord(
        request={"model": "gpt-x", "messages": [{"role": "user", "content": text}]},
        response={"id": "c1", "object": "chat.completion", "model": "gpt-x",
                  "choices": [{"index": 0, "message": {"role": "assistant", "content": "Re: " + text},
                               "finish_reason": "stop"}],
                  "usage": {"prompt_tokens": 5, "completion_tokens": 7}},
        agent=agent, source="proxy",
    )


def _file_bytes(path) -> bytes:
    data = b""
    for suffix in ("", "-wal", "-journal"):
        p = path.parent / (path.name + suffix)
        if p.exists():
            data += p.read_bytes()
    return data


def test_codec_round_trip_and_tamper_detection():
    key = crypto.parse_key(crypto.generate_key(), "test")
    codec = crypto.AesGcmCodec(key)
    blob = codec.encode({"a": EMAIL})
    assert EMAIL.encode() not in blob
    assert codec.decode(blob) == {"a": EMAIL}
    tampered = blob[:-1] + bytes([blob[-1] ^ 1])
    with pytest.raises(SlmigrateError, match="altered"):
        codec.decode(tampered)
    # The same payload encrypts differently each time (fresh nonce).
    assert codec.encode({"a": 1}) != codec.encode({"a": 1})


def test_planted_email_is_not_in_the_database_file_or_wal(tmp_path, monkeypatch):
    key_text = crypto.generate_key()
    monkeypatch.setenv("SLMIGRATE_ENCRYPTION_KEY", key_text)
    path = tmp_path / "enc.sqlite"
    store = Store(path)
    assert store.codec.name.startswith("aesgcm:")
    store.insert_calls([_call(f"please mail {EMAIL} the invoice")])
    # While the store is open the new pages sit in the WAL; check both, before and after a checkpoint.
    assert (tmp_path / "enc.sqlite-wal").exists()
    raw = _file_bytes(path)
    assert EMAIL.encode() not in raw
    assert EMAIL.encode("utf-16-le") not in raw
    store.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    assert EMAIL.encode() not in _file_bytes(path)
    # Indexes and counts stay readable; the payload decrypts with the key.
    assert store.count_calls() == 1
    (rec,) = list(store.iter_calls())
    assert EMAIL in rec.messages[0]["content"] and rec.agent == "bot" and rec.prompt_tokens == 5
    store.close()

    # Control: without a key the same payload is recoverable from the row (so the check above can fail).
    monkeypatch.delenv("SLMIGRATE_ENCRYPTION_KEY")
    plain = Store(tmp_path / "plain.sqlite")
    plain.insert_calls([_call(f"please mail {EMAIL} the invoice")])
    blob = plain.conn.execute("SELECT request FROM calls").fetchone()[0]
    assert EMAIL.encode() in unpack(blob)


def test_reading_without_the_key_fails_clearly_but_listing_works(tmp_path, monkeypatch):
    monkeypatch.setenv("SLMIGRATE_ENCRYPTION_KEY", crypto.generate_key())
    Store(tmp_path / "s.sqlite").insert_calls([_call("hello"), _call("world")])
    monkeypatch.delenv("SLMIGRATE_ENCRYPTION_KEY")
    store = Store(tmp_path / "s.sqlite")
    assert store.count_calls() == 2
    listed = list(store.iter_calls(decode=False))
    assert [r.agent for r in listed] == ["bot", "bot"]
    with pytest.raises(SlmigrateError, match="encrypted and no key is configured"):
        list(store.iter_calls())
    with pytest.raises(SlmigrateError, match="encrypted and no key is configured"):
        store.get_call(listed[0].id)
    # A wrong key is named as such, not reported as corruption.
    monkeypatch.setenv("SLMIGRATE_ENCRYPTION_KEY", crypto.generate_key())
    with pytest.raises(SlmigrateError, match="encrypted with key"):
        list(Store(tmp_path / "s.sqlite").iter_calls())


def test_rotate_re_encrypts_every_row_and_the_old_key_stops_working(tmp_path, monkeypatch):
    old_key, new_key = (crypto.parse_key(crypto.generate_key(), "t") for _ in range(2))
    path = tmp_path / "r.sqlite"
    Store(path, codec=PayloadCodec()).insert_calls([_call("plain one")])  # written before encryption was on
    store = Store(path, codec=crypto.AesGcmCodec(old_key))
    store.insert_calls([_call(f"secret {i} {EMAIL}") for i in range(30)])
    old_blobs = [r[0] for r in store.conn.execute("SELECT request FROM calls WHERE codec NOT IN ('json', 'zjson')")]
    result = crypto.rotate(store, new_key, old_key, batch=7)
    assert result["rotated"] == 31
    new_name = crypto.AesGcmCodec(new_key).name
    assert result["after"] == {new_name: 31}
    store.close()

    raw = _file_bytes(path)
    assert not any(blob[:40] in raw for blob in old_blobs), "old ciphertext left in the file"
    assert b"plain one" not in raw
    monkeypatch.setenv("SLMIGRATE_ENCRYPTION_KEY", crypto.base64.b64encode(new_key).decode())
    texts = sorted(r.messages[0]["content"] for r in Store(path).iter_calls())
    assert texts[0] == "plain one" and len(texts) == 31 and all(EMAIL in t for t in texts[1:])
    monkeypatch.setenv("SLMIGRATE_ENCRYPTION_KEY", crypto.base64.b64encode(old_key).decode())
    with pytest.raises(SlmigrateError, match="encrypted with key"):
        list(Store(path).iter_calls())


def test_rotate_refuses_rows_under_a_third_key_and_changes_nothing(tmp_path):
    a, b, c = (crypto.parse_key(crypto.generate_key(), "t") for _ in range(3))
    path = tmp_path / "x.sqlite"
    Store(path, codec=crypto.AesGcmCodec(a)).insert_calls([_call("under a")])
    store = Store(path, codec=crypto.AesGcmCodec(c))
    store.insert_calls([_call("under c")])
    before = crypto.codec_counts(store)
    with pytest.raises(SlmigrateError, match="neither the current key nor the new one"):
        crypto.rotate(store, b, a)
    assert crypto.codec_counts(store) == before


def test_keys_cli_new_and_rotate(tmp_path, monkeypatch, capsys):
    old_file, new_file = tmp_path / "old.key", tmp_path / "new.key"
    assert main(["keys", "new", "--out", str(old_file)]) == 0
    assert main(["keys", "new", "--out", str(new_file), "--json"]) == 0
    assert stat.S_IMODE(os.stat(new_file).st_mode) == 0o600
    assert main(["keys", "new", "--out", str(new_file)]) == 1  # never overwrites a key
    ws = tmp_path / "ws"
    monkeypatch.setenv("SLMIGRATE_ENCRYPTION_KEY", old_file.read_text().strip())
    Store(ws / "slmigrate.sqlite").insert_calls([_call("cli rotation")])
    monkeypatch.delenv("SLMIGRATE_ENCRYPTION_KEY")
    capsys.readouterr()
    assert main(["--key-file", str(old_file), "keys", "rotate", "--new-key-file", str(new_file),
                 "-w", str(ws), "--json"]) == 0
    assert '"rotated": 1' in capsys.readouterr().out
    crypto.use_key_file(new_file)
    (rec,) = list(Store(ws / "slmigrate.sqlite").iter_calls())
    assert rec.messages[0]["content"] == "cli rotation"
    crypto.use_key_file(None)
    assert main(["keys", "status", "-w", str(ws), "--json"]) == 0
