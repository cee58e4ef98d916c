"""The call store: SQLite in WAL mode, schema migrations applied on open.

Indexable fields (agent, model, tokens, timestamps, status) are plain columns so counts and filters stay
readable; the request and response payloads go through a ``PayloadCodec`` so they can be encrypted at rest
(see ``slmigrate.crypto``) without any other stage knowing.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from slmigrate.errors import SlmigrateError
from slmigrate.record import CallRecord

try:  # JSON of large payloads on every insert and read: orjson is several times faster
    import orjson
except ImportError:  # pragma: no cover - orjson is a declared dependency
    orjson = None  # type: ignore[assignment]


def dumps_compact(obj: Any) -> bytes:
    """Compact UTF-8 JSON (what PayloadCodec stores before packing)."""
    if orjson is not None:
        try:
            return orjson.dumps(obj, option=orjson.OPT_NON_STR_KEYS)
        except TypeError:  # e.g. integers beyond 64 bits
            pass
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def loads(data: bytes) -> Any:
    if orjson is not None:
        try:
            return orjson.loads(data)
        except ValueError:
            pass
    return json.loads(data)

# Each entry is applied once, in order; PRAGMA user_version remembers how many ran. Never edit a released
# migration: append a new one.
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


_local = threading.local()


def pack(data: bytes) -> bytes:
    """zstd level 1: about 2.5x less CPU than zlib level 1 on logged calls, at a slightly better ratio. Import
    spends a third of its time compressing, so this is where the codec choice shows."""
    compressor = getattr(_local, "zstd_c", None)
    if compressor is None:  # zstd contexts are not thread-safe: one per thread
        import zstandard

        compressor = _local.zstd_c = zstandard.ZstdCompressor(level=1)
    return compressor.compress(data)


def unpack(blob: bytes) -> bytes:
    decompressor = getattr(_local, "zstd_d", None)
    if decompressor is None:
        import zstandard

        decompressor = _local.zstd_d = zstandard.ZstdDecompressor()
    return decompressor.decompress(blob)


class PayloadCodec:
    """Turns a JSON payload into stored bytes and back: compact UTF-8 JSON, zstd-packed."""

    name = "zjson"

    def encode(self, obj: Any) -> bytes:
        return pack(dumps_compact(obj))

    def decode(self, blob: bytes) -> Any:
        return loads(unpack(blob))


class ZlibPayloadCodec(PayloadCodec):
    """Rows written before zstd (codec "json"): read-only support."""

    name = "json"

    def encode(self, obj: Any) -> bytes:
        return zlib.compress(dumps_compact(obj), 1)

    def decode(self, blob: bytes) -> Any:
        return loads(zlib.decompress(blob))


_COLUMNS = (
    "id, content_hash, input_id, timestamp, latency_ms, ttft_ms, agent, session, model, prompt_tokens, "
    "completion_tokens, status, error, source, outcome, metadata, n_tool_calls, codec, request, response"
)


class Store:
    """One workspace's database. Thread-safe for the proxy's writer thread plus readers."""

    def __init__(self, path: Path, codec: PayloadCodec | None = None, readonly: bool = False):
        self.path = Path(path)
        self.codec = codec or default_codec()
        self._lock = threading.RLock()
        try:
            if readonly:
                uri = f"file:{self.path}?mode=ro"
                self.conn = sqlite3.connect(uri, uri=True, check_same_thread=False)
            else:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self.conn = sqlite3.connect(self.path, check_same_thread=False, timeout=30)
                self.conn.execute("PRAGMA journal_mode=WAL")
                self.conn.execute("PRAGMA synchronous=NORMAL")
            self.conn.row_factory = sqlite3.Row
            if not readonly:
                self._migrate()
        except sqlite3.DatabaseError as exc:
            raise SlmigrateError(
                f"cannot open the store {self.path}: {exc}; expected an slmigrate SQLite database; "
                "point --workspace at another folder or run `slmigrate init` in an empty one"
            ) from exc

    # --- schema ---
    def _migrate(self) -> None:
        with self._lock:
            version = self.conn.execute("PRAGMA user_version").fetchone()[0]
            if version > len(MIGRATIONS):
                raise SlmigrateError(
                    f"the store {self.path} has schema version {version}, newer than this slmigrate knows "
                    f"({len(MIGRATIONS)}); upgrade slmigrate"
                )
            for number in range(version, len(MIGRATIONS)):
                with self.conn:
                    self.conn.executescript(MIGRATIONS[number])
                    self.conn.execute(f"PRAGMA user_version = {number + 1}")

    @property
    def schema_version(self) -> int:
        return self.conn.execute("PRAGMA user_version").fetchone()[0]

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
            before = self.conn.total_changes
            seq = self.conn.execute("SELECT COALESCE(MAX(inserted_seq), 0) FROM calls").fetchone()[0] + 1
            self.conn.executemany(
                f"INSERT OR IGNORE INTO calls ({_COLUMNS}, inserted_seq) VALUES "
                f"({', '.join('?' * 20)}, {seq})",
                rows,
            )
            inserted = self.conn.total_changes - before
        return inserted, len(rows) - inserted

    # --- reading ---
    def _record(self, row: sqlite3.Row, decode: bool = True) -> CallRecord:
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
        where, params = [], []
        if since_seq is not None:
            where.append("inserted_seq > ?")
            params.append(since_seq)
        if ids is not None:
            where.append(f"id IN ({', '.join('?' * len(ids))})")
            params.extend(ids)
        cols = "*" if decode else "id, content_hash, input_id, timestamp, latency_ms, ttft_ms, agent, session, " \
            "model, prompt_tokens, completion_tokens, status, error, source, outcome, metadata, codec"
        sql = f"SELECT {cols} FROM calls" + (f" WHERE {' AND '.join(where)}" if where else "") + " ORDER BY id"
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        # A separate cursor per iteration, fetched in batches, so a long export does not hold everything in memory.
        cursor = self.conn.cursor()
        cursor.execute(sql, params)
        while True:
            with self._lock:
                rows = cursor.fetchmany(batch)
            if not rows:
                break
            for row in rows:
                yield self._record(row, decode=decode)

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
    def set_clusters(self, assignments: dict[str, str | None]) -> None:
        with self._lock, self.conn:
            self.conn.execute("DELETE FROM call_clusters")
            self.conn.executemany(
                "INSERT INTO call_clusters (call_id, cluster) VALUES (?, ?)", list(assignments.items())
            )

    def clusters_of(self, ids: list[str] | None = None) -> dict[str, str | None]:
        rows = self.conn.execute("SELECT call_id, cluster FROM call_clusters").fetchall()
        result = {r[0]: r[1] for r in rows}
        return result if ids is None else {i: result.get(i) for i in ids}

    def put_manifest(self, stage: str, fingerprint: str, body: dict[str, Any], created: str) -> None:
        with self._lock, self.conn:
            self.conn.execute(
                "INSERT OR REPLACE INTO manifests (stage, created, fingerprint, body) VALUES (?, ?, ?, ?)",
                (stage, created, fingerprint, json.dumps(body, ensure_ascii=False, default=str)),
            )

    def get_manifest(self, stage: str) -> dict[str, Any] | None:
        row = self.conn.execute("SELECT * FROM manifests WHERE stage = ?", (stage,)).fetchone()
        if row is None:
            return None
        return {"stage": row["stage"], "created": row["created"], "fingerprint": row["fingerprint"],
                **json.loads(row["body"])}


_CODECS: dict[str, Any] = {"zjson": PayloadCodec, "json": ZlibPayloadCodec}
PLAIN_CODECS = tuple(_CODECS)  # unencrypted row codecs


def register_codec(name: str, factory: Any) -> None:
    _CODECS[name] = factory


def codec_for(name: str) -> PayloadCodec:
    if name in _CODECS:
        return _CODECS[name]()
    if name.startswith("aesgcm"):
        # Encrypted rows need the key; slmigrate.crypto knows how to find it and says clearly when it is absent.
        from slmigrate import crypto

        return crypto.codec_from_environment(required=True, row_codec=name)
    raise SlmigrateError(f"stored payloads use codec {name!r}, which this slmigrate does not know; upgrade it")


def default_codec() -> PayloadCodec:
    """Encrypt new payloads when a key is configured (SLMIGRATE_ENCRYPTION_KEY), else plain JSON."""
    try:
        from slmigrate import crypto
    except ImportError:
        return PayloadCodec()
    return crypto.codec_from_environment(required=False) or PayloadCodec()
