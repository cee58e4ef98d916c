"""The call store: SQLite in WAL mode by default, or PostgreSQL by URL; schema migrations applied on open.

Indexable fields (agent, model, tokens, timestamps, status) are plain columns so counts and filters stay
readable; the request and response payloads go through a ``PayloadCodec`` so they can be encrypted at rest
(see ``slmigrate.store.crypto``) without any other stage knowing. SQL here is written once for both engines; what
differs between them lives in ``backends.py``.
"""

from __future__ import annotations

import itertools
import json
import threading
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from slmigrate.record import CallRecord
from slmigrate.store.backends import PG_SCHEMES, backend_for, mask_password
from slmigrate.errors import SlmigrateError
from slmigrate.store import crypto
from slmigrate.store.codecs import (
    _CODECS,
    PLAIN_CODECS,
    PayloadCodec,
    ZlibPayloadCodec,
    dumps_compact,
    loads,
    pack,
    register_codec,
    unpack,
)

__all__ = [
    "MIGRATIONS", "PG_SCHEMES", "PLAIN_CODECS", "PayloadCodec", "Store", "ZlibPayloadCodec", "codec_for",
    "default_codec", "dumps_compact", "loads", "mask_password", "pack", "register_codec", "unpack",
]

def codec_for(name: str) -> PayloadCodec:
    """The codec a stored row names: a plain one, or an encrypted one (which needs the key)."""
    if name in _CODECS:
        return _CODECS[name]()
    if name.startswith("aesgcm"):
        # Encrypted rows need the key; crypto knows how to find it and says clearly when it is absent.
        codec = crypto.codec_from_environment(required=True, row_codec=name)
        assert codec is not None  # required=True raises instead of returning None
        return codec
    raise SlmigrateError(f"stored payloads use codec {name!r}, which this slmigrate does not know; upgrade it")


def default_codec() -> PayloadCodec:
    """Encrypt new payloads when a key is configured (SLMIGRATE_ENCRYPTION_KEY), else plain JSON."""
    return crypto.codec_from_environment(required=False) or PayloadCodec()


# Each entry is applied once, in order; the store's schema version remembers how many ran (see backends.py).
# Never edit a released migration: append a new one. Write them in SQLite's types; backends.pg_ddl maps them.
MIGRATIONS: list[str] = [
    """
    CREATE TABLE calls (
        id TEXT PRIMARY KEY,
        content_hash TEXT NOT NULL UNIQUE,
        input_id TEXT,
        timestamp TEXT,
        latency_ms REAL,
        ttft_ms REAL,
        agent TEXT,
        session TEXT,
        model TEXT,
        prompt_tokens INTEGER,
        completion_tokens INTEGER,
        status TEXT NOT NULL DEFAULT 'ok',
        error TEXT,
        source TEXT NOT NULL,
        outcome REAL,
        metadata TEXT NOT NULL DEFAULT '{}',
        n_tool_calls INTEGER NOT NULL DEFAULT 0,
        codec TEXT NOT NULL DEFAULT 'json',
        request BLOB NOT NULL,
        response BLOB,
        inserted_seq INTEGER
    );
    CREATE INDEX calls_agent ON calls(agent);
    CREATE INDEX calls_session ON calls(session);
    CREATE INDEX calls_timestamp ON calls(timestamp);
    CREATE INDEX calls_seq ON calls(inserted_seq);
    CREATE TABLE call_clusters (
        call_id TEXT PRIMARY KEY REFERENCES calls(id),
        cluster TEXT
    );
    CREATE TABLE manifests (
        stage TEXT PRIMARY KEY,
        created TEXT NOT NULL,
        fingerprint TEXT NOT NULL,
        body TEXT NOT NULL
    );
    """,
]


_COLUMNS = (
    "id, content_hash, input_id, timestamp, latency_ms, ttft_ms, agent, session, model, prompt_tokens, "
    "completion_tokens, status, error, source, outcome, metadata, n_tool_calls, codec, request, response"
)


class Store:
    """One workspace's database. Thread-safe for the proxy's writer thread plus readers.

    ``location`` is a SQLite file path (or ``sqlite:///PATH``) or a ``postgresql://`` URL. ``conn`` behaves
    like a ``sqlite3.Connection`` on both (``?`` placeholders, rows by index or name, ``with conn:`` commits).
    """

    def __init__(self, location: str | Path, codec: PayloadCodec | None = None, readonly: bool = False):
        self.backend = backend_for(location)
        self.path = self.backend.location  # the SQLite file, or the PostgreSQL URL
        self.codec = codec or default_codec()
        self._lock = threading.RLock()
        self.conn: Any = self.backend.connect(readonly)
        if not readonly:
            self._migrate()

    @property
    def display(self) -> str:
        """Where the store is, for messages (a PostgreSQL password is masked)."""
        return self.backend.display

    def opener(self) -> Any:
        """A zero-argument callable opening another connection to this store (for the writer thread)."""
        location = self.path
        return lambda: Store(location)

    # --- schema ---
    def _migrate(self) -> None:
        with self._lock:
            self.backend.migrate(self.conn, MIGRATIONS)

    @property
    def schema_version(self) -> int:
        return self.backend.schema_version(self.conn)

    @property
    def broken(self) -> bool:
        """True when the connection cannot be used any more (a PostgreSQL server restart): open a new Store."""
        return self.backend.is_broken(self.conn)

    def set_write_timeout(self, ms: int) -> None:
        """Fail a write that waits on another writer's lock longer than ``ms`` instead of blocking."""
        self.backend.set_write_timeout(self.conn, ms)

    def purge_freed(self) -> None:
        """Drop superseded row versions from disk (after rewriting payloads, e.g. a key rotation)."""
        with self._lock:
            self.backend.purge_freed(self.conn)

    def close(self) -> None:
        with self._lock:
            self.conn.close()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- writing ---
    def _row(self, rec: CallRecord) -> tuple:
        rec.finalise()
        answer = rec.answer or {}
        return (
            rec.id, rec.content_hash, rec.input_id, rec.timestamp, rec.latency_ms, rec.ttft_ms, rec.agent,
            rec.session, rec.model, rec.prompt_tokens, rec.completion_tokens, rec.status, rec.error, rec.source,
            rec.outcome, json.dumps(rec.metadata, ensure_ascii=False), len(answer.get("tool_calls") or []),
            self.codec.name, self.codec.encode(rec.request),
            None if rec.response is None else self.codec.encode(rec.response),
        )

    def insert_calls(self, records: Iterable[CallRecord]) -> tuple[int, int]:
        """Insert records in one transaction; returns (inserted, duplicates). Duplicates are by content hash."""
        return self.insert_rows(self.encode_rows(records))

    def encode_rows(self, records: Iterable[CallRecord]) -> list[tuple]:
        """Finalise and encode records into rows. Touches no connection, so a bulk import runs it in a worker
        thread (hashing and compression release the GIL) while the next batch is parsed."""
        return [self._row(r) for r in records]

    def insert_rows(self, rows: list[tuple]) -> tuple[int, int]:
        """Insert rows from ``encode_rows`` in one transaction; returns (inserted, duplicates)."""
        if not rows:
            return 0, 0
        with self._lock, self.conn:
            self.backend.serialise_inserts(self.conn)
            seq = self.conn.execute("SELECT COALESCE(MAX(inserted_seq), 0) FROM calls").fetchone()[0] + 1
            inserted = self.backend.insert_many(
                self.conn,
                f"INSERT INTO calls ({_COLUMNS}, inserted_seq) VALUES ({', '.join('?' * 20)}, {seq}) "
                "ON CONFLICT DO NOTHING",
                rows,
            )
        return inserted, len(rows) - inserted

    # --- reading ---
    def _record(self, row: Any, decode: bool = True) -> CallRecord:
        request: dict[str, Any] = {}
        response = None
        if decode:
            codec = self.codec if row["codec"] == self.codec.name else codec_for(row["codec"])
            request = codec.decode(row["request"])
            response = None if row["response"] is None else codec.decode(row["response"])
        return CallRecord(
            request=request, response=response, id=row["id"], input_id=row["input_id"],
            timestamp=row["timestamp"], latency_ms=row["latency_ms"], ttft_ms=row["ttft_ms"], agent=row["agent"],
            session=row["session"], model=row["model"], prompt_tokens=row["prompt_tokens"],
            completion_tokens=row["completion_tokens"], status=row["status"], error=row["error"],
            source=row["source"], outcome=row["outcome"], metadata=json.loads(row["metadata"] or "{}"),
            content_hash=row["content_hash"],
        )

    def iter_calls(
        self,
        *,
        decode: bool = True,
        limit: int | None = None,
        since_seq: int | None = None,
        ids: list[str] | None = None,
        batch: int = 2000,
    ) -> Iterator[CallRecord]:
        """Calls in id (time) order. ``decode=False`` skips the payloads (fast listing, no key needed)."""
        where: list[str] = []
        params: list[Any] = []
        if since_seq is not None:
            where.append("inserted_seq > ?")
            params.append(since_seq)
        if ids is not None:
            where.append(f"id IN ({', '.join('?' * len(ids))})")
            params.extend(ids)
        cols = "*" if decode else "id, content_hash, input_id, timestamp, latency_ms, ttft_ms, agent, session, " \
            "model, prompt_tokens, completion_tokens, status, error, source, outcome, metadata, codec"
        # Pages by id (keyset), each its own short query: memory stays at one page, and no cursor or
        # transaction stays open between pages (a PostgreSQL client cursor would fetch the whole result).
        last: str | None = None
        left = limit
        while left is None or left > 0:
            size = batch if left is None else min(batch, int(left))
            page_where = where + ([] if last is None else ["id > ?"])
            sql = f"SELECT {cols} FROM calls" + (f" WHERE {' AND '.join(page_where)}" if page_where else "")
            with self._lock:
                rows = self.conn.execute(f"{sql} ORDER BY id LIMIT {size}",
                                         params + ([] if last is None else [last])).fetchall()
            for row in rows:
                yield self._record(row, decode=decode)
            if len(rows) < size:
                break
            last = rows[-1]["id"]
            if left is not None:
                left -= len(rows)

    def get_call(self, call_id: str) -> CallRecord | None:
        row = self.conn.execute(
            "SELECT * FROM calls WHERE id = ? OR input_id = ? ORDER BY id LIMIT 1", (call_id, call_id)
        ).fetchone()
        return None if row is None else self._record(row)

    def count_calls(self) -> int:
        return self.conn.execute("SELECT COUNT(*) FROM calls").fetchone()[0]

    def max_seq(self) -> int:
        return self.conn.execute("SELECT COALESCE(MAX(inserted_seq), 0) FROM calls").fetchone()[0]

    def fingerprint(self) -> str:
        """Changes whenever calls are added: count + newest insert batch + a hash of ids is enough and cheap."""
        row = self.conn.execute("SELECT COUNT(*), COALESCE(MAX(inserted_seq), 0), MAX(id) FROM calls").fetchone()
        return f"{row[0]}:{row[1]}:{row[2]}"

    def group_counts(self, column: str) -> list[dict[str, Any]]:
        if column not in {"source", "agent", "model", "status"}:
            raise ValueError(column)
        rows = self.conn.execute(
            f"SELECT {column} AS key, COUNT(*) AS calls, COALESCE(SUM(prompt_tokens), 0) AS prompt_tokens, "
            f"COALESCE(SUM(completion_tokens), 0) AS completion_tokens FROM calls GROUP BY {column} "
            "ORDER BY calls DESC"
        ).fetchall()
        return [dict(r) for r in rows]

    # --- stage tables ---
    def set_clusters(self, assignments: Mapping[str, str | None] | Iterable[tuple[str, str | None]]) -> None:
        """Replace every call's cluster, in one transaction; pairs are inserted in batches (a million of them
        need not be in memory at once)."""
        pairs = iter(assignments.items() if isinstance(assignments, Mapping) else assignments)
        with self._lock, self.conn:
            self.conn.execute("DELETE FROM call_clusters")
            while batch := list(itertools.islice(pairs, 10_000)):
                self.conn.executemany("INSERT INTO call_clusters (call_id, cluster) VALUES (?, ?)", batch)

    def clusters_of(self, ids: list[str] | None = None) -> dict[str, str | None]:
        rows = self.conn.execute("SELECT call_id, cluster FROM call_clusters").fetchall()
        result = {r[0]: r[1] for r in rows}
        return result if ids is None else {i: result.get(i) for i in ids}

    def put_manifest(self, stage: str, fingerprint: str, body: dict[str, Any], created: str) -> None:
        with self._lock, self.conn:
            self.conn.execute(
                "INSERT INTO manifests (stage, created, fingerprint, body) VALUES (?, ?, ?, ?) ON CONFLICT (stage) "
                "DO UPDATE SET created = excluded.created, fingerprint = excluded.fingerprint, body = excluded.body",
                (stage, created, fingerprint, json.dumps(body, ensure_ascii=False, default=str)),
            )

    def get_manifest(self, stage: str) -> dict[str, Any] | None:
        row = self.conn.execute("SELECT * FROM manifests WHERE stage = ?", (stage,)).fetchone()
        if row is None:
            return None
        return {"stage": row["stage"], "created": row["created"], "fingerprint": row["fingerprint"],
                **json.loads(row["body"])}


