"""Where the store lives: a SQLite file (the default) or a PostgreSQL database, chosen by URL.

The ``Store`` writes its SQL once, in the dialect both engines accept (``INSERT ... ON CONFLICT``, ``?``
placeholders, ``COALESCE``); a backend holds only what really differs, each difference in one place:
- connecting, and where the schema version lives (SQLite ``PRAGMA user_version``; PostgreSQL a one-row
  ``slmigrate_schema`` table, migrated under an advisory lock so several proxies can open a fresh database at once);
- column types in the migrations (``BLOB`` -> ``BYTEA``, ``REAL`` -> ``DOUBLE PRECISION``, and ``TEXT`` compares
  bytewise with ``COLLATE "C"`` so ids and timestamps sort exactly as in SQLite);
- placeholders (``?`` -> ``%s``), which ``PgConnection`` translates so callers can keep using ``store.conn``;
- counting inserted rows, and serialising writers so ``inserted_seq`` grows in commit order.
"""

from __future__ import annotations

import os
import re
import sqlite3
from pathlib import Path
from typing import Any

from slmigrate.errors import SlmigrateError
from slmigrate.redact import redact_url

PG_SCHEMES = ("postgresql://", "postgres://")
SQLITE_SCHEME = "sqlite:///"
# Advisory lock keys (any constant bigint unique to slmigrate): one for migrations, one for the insert order.
_MIGRATE_LOCK = 0x534C4D01
_INSERT_LOCK = 0x534C4D02


def backend_for(location: str | Path) -> "SqliteBackend | PostgresBackend":
    """``postgresql://...`` / ``postgres://...`` -> PostgreSQL; ``sqlite:///PATH`` or a plain path -> SQLite."""
    if isinstance(location, str):
        if location.startswith(PG_SCHEMES):
            return PostgresBackend(location)
        if location.startswith(SQLITE_SCHEME):
            # As in SQLAlchemy: sqlite:///relative.db, sqlite:////absolute/path.db
            return SqliteBackend(Path(location[len(SQLITE_SCHEME):]))
        if "://" in location:
            raise SlmigrateError(
                f"store URL {mask_password(location)!r} has an unknown scheme; expected postgresql://USER@HOST/DB, "
                "sqlite:///PATH or a file path"
            )
    return SqliteBackend(Path(location))


def mask_password(url: str) -> str:
    """The URL as it may be shown (one rule for every URL slmigrate prints: ``slmigrate.redact``)."""
    return redact_url(url)



def _create_private(path: Path) -> None:
    """Create the database file readable by its owner only: it holds every logged prompt. SQLite gives its
    -wal and -shm files the database file's permissions, so they follow."""
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    except FileExistsError:
        pass

class SqliteBackend:
    name = "sqlite"

    def __init__(self, path: Path):
        self.location = Path(path)

    @property
    def display(self) -> str:
        return str(self.location)

    def connect(self, readonly: bool) -> sqlite3.Connection:
        try:
            if readonly:
                conn = sqlite3.connect(f"file:{self.location}?mode=ro", uri=True, check_same_thread=False)
            else:
                self.location.parent.mkdir(parents=True, exist_ok=True)
                _create_private(self.location)
                conn = sqlite3.connect(self.location, check_same_thread=False, timeout=30)
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=NORMAL")
            conn.row_factory = sqlite3.Row
        except sqlite3.DatabaseError as exc:
            raise self._open_error(exc) from exc
        return conn

    def _open_error(self, exc: Exception) -> SlmigrateError:
        return SlmigrateError(
            f"cannot open the store {self.location}: {exc}; expected an slmigrate SQLite database; "
            "point --workspace at another folder or run `slmigrate init` in an empty one"
        )

    def schema_version(self, conn: Any) -> int:
        return conn.execute("PRAGMA user_version").fetchone()[0]

    def migrate(self, conn: Any, migrations: list[str]) -> None:
        try:
            version = self.schema_version(conn)
            _check_version(version, migrations, self.display)
            for number in range(version, len(migrations)):
                with conn:
                    conn.executescript(migrations[number])
                    conn.execute(f"PRAGMA user_version = {number + 1}")
        except sqlite3.DatabaseError as exc:
            raise self._open_error(exc) from exc

    def serialise_inserts(self, conn: Any) -> None:
        """SQLite has one writer at a time already."""

    def insert_many(self, conn: Any, sql: str, rows: list[tuple]) -> int:
        before = conn.total_changes
        conn.executemany(sql, rows)
        return conn.total_changes - before

    def set_write_timeout(self, conn: Any, ms: int) -> None:
        conn.execute(f"PRAGMA busy_timeout = {int(ms)}")

    def purge_freed(self, conn: Any) -> None:
        # Old page versions (e.g. ciphertext under a rotated key) otherwise linger in the WAL file.
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def is_broken(self, conn: Any) -> bool:
        return False


class PostgresBackend:
    name = "postgresql"

    def __init__(self, url: str):
        self.location = url

    @property
    def display(self) -> str:
        return mask_password(self.location)

    def connect(self, readonly: bool) -> "PgConnection":
        try:
            import psycopg
        except ImportError as exc:
            raise SlmigrateError(
                "a postgresql:// store needs psycopg 3; install it with `pip install 'slmigrate[postgres]'`"
            ) from exc
        try:
            raw = psycopg.connect(self.location, autocommit=True, row_factory=_row_factory,
                                  connect_timeout=10, application_name="slmigrate")
            if readonly:
                raw.execute("SET default_transaction_read_only = on")
        except psycopg.Error as exc:
            raise SlmigrateError(
                f"cannot connect to the store {self.display}: {str(exc).strip()}; check the URL "
                "(postgresql://USER[:PASSWORD]@HOST[:PORT]/DATABASE), that the server runs and the database exists"
            ) from exc
        return PgConnection(raw)

    def schema_version(self, conn: "PgConnection") -> int:
        exists = conn.execute("SELECT to_regclass('slmigrate_schema')").fetchone()[0]
        if exists is None:
            return 0
        row = conn.execute("SELECT version FROM slmigrate_schema").fetchone()
        return 0 if row is None else row[0]

    def migrate(self, conn: "PgConnection", migrations: list[str]) -> None:
        # All pending migrations in one transaction (PostgreSQL DDL is transactional), under a lock, so proxies
        # starting together against an empty database neither race nor see half a schema.
        with conn:
            conn.execute("SELECT pg_advisory_xact_lock(?)", (_MIGRATE_LOCK,))
            conn.execute("CREATE TABLE IF NOT EXISTS slmigrate_schema (version INTEGER NOT NULL)")
            row = conn.execute("SELECT version FROM slmigrate_schema").fetchone()
            if row is None:
                conn.execute("INSERT INTO slmigrate_schema (version) VALUES (0)")
            version = 0 if row is None else row[0]
            _check_version(version, migrations, self.display)
            for number in range(version, len(migrations)):
                conn.execute(pg_ddl(migrations[number]))
                conn.execute("UPDATE slmigrate_schema SET version = ?", (number + 1,))

    def serialise_inserts(self, conn: "PgConnection") -> None:
        # inserted_seq is MAX + 1 per batch and readers take "everything after seq N": two proxies committing
        # the same or out-of-order numbers would let a reader skip a batch. One insert transaction at a time
        # (held until commit) keeps numbers in commit order; a batch is a few milliseconds.
        conn.execute("SELECT pg_advisory_xact_lock(?)", (_INSERT_LOCK,))

    def insert_many(self, conn: "PgConnection", sql: str, rows: list[tuple]) -> int:
        return conn.executemany(sql, rows).rowcount  # psycopg sums the rows of every statement

    def set_write_timeout(self, conn: "PgConnection", ms: int) -> None:
        conn.execute(f"SET lock_timeout = {int(ms)}")

    def purge_freed(self, conn: "PgConnection") -> None:
        # Updated rows leave their old versions (old ciphertext) in the table until a vacuum; FULL rewrites it.
        conn.execute("VACUUM FULL calls")

    def is_broken(self, conn: "PgConnection") -> bool:
        return conn.raw.closed or conn.raw.broken


def _check_version(version: int, migrations: list[str], where: str) -> None:
    if version > len(migrations):
        raise SlmigrateError(
            f"the store {where} has schema version {version}, newer than this slmigrate knows "
            f"({len(migrations)}); upgrade slmigrate"
        )


def pg_ddl(script: str) -> str:
    """A migration written for SQLite, in PostgreSQL's column types."""
    script = re.sub(r"\bBLOB\b", "BYTEA", script)
    script = re.sub(r"\bREAL\b", "DOUBLE PRECISION", script)  # PostgreSQL's REAL is only 4 bytes
    return re.sub(r"\bTEXT\b", 'TEXT COLLATE "C"', script)


def pg_sql(sql: str) -> str:
    return sql.replace("%", "%%").replace("?", "%s")


class PgRow:
    """A result row read by position or by column name, like ``sqlite3.Row`` (so ``dict(row)`` works too)."""

    __slots__ = ("_values", "_index")

    def __init__(self, values: tuple, index: dict[str, int]):
        self._values = values
        self._index = index

    def __getitem__(self, key: int | str) -> Any:
        return self._values[self._index[key]] if isinstance(key, str) else self._values[key]

    def keys(self) -> list[str]:
        return list(self._index)

    def __iter__(self):
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        return f"PgRow({dict(zip(self._index, self._values))!r})"


def _row_factory(cursor: Any) -> Any:
    index = {column.name: i for i, column in enumerate(cursor.description or ())}
    return lambda values: PgRow(values, index)


class _NoRows:
    rowcount = 0

    def fetchone(self) -> None:
        return None

    def fetchall(self) -> list:
        return []

    def __iter__(self):
        return iter(())


class PgConnection:
    """The part of ``sqlite3.Connection`` slmigrate uses, over a psycopg connection in autocommit mode.

    ``with conn:`` is one transaction (commit, or rollback on error) as in sqlite3; statements outside it commit
    on their own, so a reader never holds a transaction open. ``PRAGMA`` statements are SQLite tuning with no
    PostgreSQL meaning and are skipped.
    """

    def __init__(self, raw: Any):
        self.raw = raw
        self._transactions: list[Any] = []

    def execute(self, sql: str, params: tuple | list = ()) -> Any:
        if sql.lstrip()[:6].upper() == "PRAGMA":
            return _NoRows()
        if params:
            return self.raw.execute(pg_sql(sql), tuple(params))
        return self.raw.execute(sql)

    def executemany(self, sql: str, rows: list) -> Any:
        cursor = self.raw.cursor()
        cursor.executemany(pg_sql(sql), rows)
        return cursor

    def commit(self) -> None:
        self.raw.commit()

    def rollback(self) -> None:
        self.raw.rollback()

    def close(self) -> None:
        self.raw.close()

    def __enter__(self) -> "PgConnection":
        transaction = self.raw.transaction()
        transaction.__enter__()
        self._transactions.append(transaction)
        return self

    def __exit__(self, *exc: Any) -> None:
        self._transactions.pop().__exit__(*exc)
