"""Encryption of stored payloads at rest (AES-256-GCM, authenticated).

A key is 32 random bytes, given as base64 or hex in ``SLMIGRATE_ENCRYPTION_KEY`` or in a key file. Each row
records which key encrypted it (``aesgcm:<key id>``, the id being a hash prefix of the key, never the key), so
a wrong key is reported as such instead of as corrupt data, and rotation can find rows still under the old key.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from pathlib import Path
from typing import Any

from slmigrate import env
from slmigrate.errors import SlmigrateError
from slmigrate.store.codecs import PLAIN_CODECS, PayloadCodec, dumps_compact, loads, pack, plain_codec, unpack

_NONCE = 12

_key_file_override: Path | None = None


def generate_key() -> str:
    """A new key, base64-encoded, for ``slmigrate keys new`` or a secrets manager."""
    return base64.b64encode(os.urandom(32)).decode("ascii")


def parse_key(text: str, origin: str) -> bytes:
    text = text.strip()
    candidates = []
    try:
        candidates.append(base64.b64decode(text, validate=True))
    except (binascii.Error, ValueError):
        pass
    try:
        candidates.append(bytes.fromhex(text))
    except ValueError:
        pass
    for raw in candidates:
        if len(raw) == 32:
            return raw
    raise SlmigrateError(
        f"the encryption key from {origin} is not 32 bytes of base64 or hex; "
        "create one with `slmigrate keys new` and set it again"
    )


def key_id(key: bytes) -> str:
    return hashlib.sha256(b"slmigrate-key-id" + key).hexdigest()[:12]


class AesGcmCodec(PayloadCodec):
    def __init__(self, key: bytes):
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        self._aead = AESGCM(key)
        self.name = f"aesgcm:{key_id(key)}"

    def encode(self, obj: Any) -> bytes:
        plain = pack(dumps_compact(obj))
        nonce = os.urandom(_NONCE)
        return nonce + self._aead.encrypt(nonce, plain, self.name.encode())

    def decode(self, blob: bytes) -> Any:
        from cryptography.exceptions import InvalidTag

        try:
            plain = self._aead.decrypt(blob[:_NONCE], blob[_NONCE:], self.name.encode())
        except InvalidTag as exc:
            raise SlmigrateError("a stored payload failed authentication: the data was altered") from exc
        return loads(unpack(plain))


def use_key_file(path: str | Path | None) -> None:
    """Make ``--key-file`` win over the environment for this process."""
    global _key_file_override
    _key_file_override = None if path is None else Path(path)


def configured_key() -> bytes | None:
    if _key_file_override is not None:
        try:
            text = _key_file_override.read_text()
        except OSError as exc:
            raise SlmigrateError(f"cannot read the key file {_key_file_override}: {exc.strerror}") from exc
        return parse_key(text, str(_key_file_override))
    value = env.get(env.ENCRYPTION_KEY)
    return None if value is None else parse_key(value, env.ENCRYPTION_KEY)


def codec_from_environment(required: bool, row_codec: str | None = None) -> PayloadCodec | None:
    key = configured_key()
    if key is None:
        if required:
            raise SlmigrateError(
                "the stored payloads are encrypted and no key is configured; set "
                f"{env.ENCRYPTION_KEY} or pass --key-file with the key they were written with"
            )
        return None
    codec = AesGcmCodec(key)
    if row_codec is not None and row_codec != codec.name:
        raise SlmigrateError(
            f"the stored payloads were encrypted with key {row_codec.split(':', 1)[1]}, but the configured key "
            f"is {codec.name.split(':', 1)[1]}; set the key they were written with (or rotate with "
            "`slmigrate keys rotate`)"
        )
    return codec


def codec_for_key(key: bytes | None) -> PayloadCodec:
    """The codec that reads and writes rows under ``key`` (plain JSON when None)."""
    return PayloadCodec() if key is None else AesGcmCodec(key)


def read_key_file(path: str | Path) -> bytes:
    file = Path(path)
    try:
        text = file.read_text()
    except OSError as exc:
        raise SlmigrateError(f"cannot read the key file {file}: {exc.strerror}; pass an existing file") from exc
    return parse_key(text, str(file))


def write_key_file(path: str | Path, key_text: str) -> Path:
    """Write a key readable by its owner only (created 0600 before any byte is written)."""
    file = Path(path)
    if file.exists():
        raise SlmigrateError(f"{file} already exists; keys are never overwritten, choose another path")
    try:
        fd = os.open(file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(key_text + "\n")
    except OSError as exc:
        raise SlmigrateError(f"cannot write the key file {file}: {exc.strerror}") from exc
    return file


def codec_counts(store: Any) -> dict[str, int]:
    """How many rows each codec wrote (``json`` = not encrypted). Needs no key."""
    rows = store.conn.execute("SELECT codec, COUNT(*) FROM calls GROUP BY codec").fetchall()
    return {row[0]: row[1] for row in rows}


def rotate(store: Any, new_key: bytes, old_key: bytes | None, batch: int = 500) -> dict[str, Any]:
    """Re-encrypt every row under ``new_key`` in one transaction.

    Rows may be under ``old_key`` or plain JSON (so rotating also encrypts a store that was written without a
    key). A row under any other key stops the rotation before anything changes, since it could not be read.
    ``secure_delete`` overwrites the old ciphertext pages and the WAL is checkpointed and truncated, so the old
    key cannot recover anything from the file afterwards.
    """
    new = AesGcmCodec(new_key)
    readers: dict[str, PayloadCodec] = {name: plain_codec(name) for name in PLAIN_CODECS}
    if old_key is not None:
        old = AesGcmCodec(old_key)
        readers[old.name] = old
    readers[new.name] = new
    counts = codec_counts(store)
    unknown = sorted(set(counts) - set(readers))
    if unknown:
        ids = ", ".join(name.split(":", 1)[-1] for name in unknown)
        raise SlmigrateError(
            f"some rows are encrypted with key(s) {ids}, which is neither the current key nor the new one; "
            "set SLMIGRATE_ENCRYPTION_KEY (or --key-file) to the key those rows were written with and rotate again"
        )
    changed = 0
    conn = store.conn
    with store._lock:
        conn.execute("PRAGMA secure_delete = ON")
        try:
            with conn:  # one transaction: all rows move to the new key, or none do
                last = ""  # paged by id, which both SQLite and PostgreSQL stores have (no rowid there)
                while True:
                    rows = conn.execute(
                        "SELECT id, codec, request, response FROM calls WHERE id > ? AND codec != ? "
                        "ORDER BY id LIMIT ?", (last, new.name, batch),
                    ).fetchall()
                    if not rows:
                        break
                    updates = []
                    for call_id, codec, request, response in rows:
                        reader = readers[codec]
                        updates.append((
                            new.name, new.encode(reader.decode(request)),
                            None if response is None else new.encode(reader.decode(response)), call_id,
                        ))
                        last = call_id
                    conn.executemany("UPDATE calls SET codec = ?, request = ?, response = ? WHERE id = ?",
                                     updates)
                    changed += len(updates)
        finally:
            conn.execute("PRAGMA secure_delete = OFF")
        store.purge_freed()  # SQLite: truncate the WAL; PostgreSQL: VACUUM FULL drops the old row versions
    return {"rotated": changed, "key_id": new.name.split(":", 1)[1], "before": counts,
            "after": codec_counts(store)}
