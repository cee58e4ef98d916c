"""The background record writer shared by the proxy, the router and the SDK wrapper.

Capturing must never slow or break the agent, so the request path only appends to an in-memory deque (no lock,
no thread wake-up: waking a thread per request costs the event loop a GIL hand-off). One thread wakes every
``flush_interval`` seconds, turns what was queued into ``CallRecord``s (JSON parsing, stream merging, encryption
all happen there) and inserts them in one transaction, so after a hard kill at most about one flush interval of
calls is lost; ``close()`` drains everything.

Nothing is lost, and one bad call cannot stop the logging of the others:
- a *failing store* (locked, read-only, disk full, connection lost: the driver's operational errors) keeps the
  failed batch and retries it on the next cycle, up to ``max_retained`` records; beyond that the oldest go to the
  dead-letter file;
- a *failing record* (the store refuses the batch for another reason) is found by bisecting the batch: every
  other record is stored, and the ones the store refuses while it takes the rest go to the dead-letter file. When
  nothing in the batch can be stored the store is taken to be failing after all, and the batch is retried;
- an item that cannot become a record at all (``to_record()`` raised) goes straight to the dead-letter file.
The dead-letter file (``slmigrate.collect.deadletter``) sits in the workspace; without one such calls are dropped.
Failures, dead letters and drops are counted for ``/slmigrate/health`` and ``/slmigrate/metrics``.
"""

from __future__ import annotations

import atexit
import collections
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from slmigrate.collect import deadletter
from slmigrate.errors import SlmigrateError
from slmigrate.record import CallRecord, now_iso
from slmigrate.redact import redact_urls

log = logging.getLogger("slmigrate.collect.writer")

DEFAULT_FLUSH_INTERVAL = 0.1  # seconds; the documented bound is 200 ms
# DB-API exception classes (sqlite3 and psycopg name them alike) that mean the store, not the record, failed:
# locked, read-only, disk full, I/O error, connection lost, server shutting down.
_STORE_ERRORS = {"OperationalError", "InterfaceError", "InternalError", "NotSupportedError"}


class Recordable(Protocol):
    def to_record(self) -> CallRecord | None: ...


class RecordWriter:
    """Queue records (or objects with ``to_record()``) and write them to a store from one thread."""

    def __init__(
        self,
        store_factory: Callable[[], Any],
        *,
        flush_interval: float = DEFAULT_FLUSH_INTERVAL,
        max_queue: int = 100_000,
        max_retained: int = 50_000,
        batch_size: int = 1000,
        busy_timeout_ms: int = 1000,
        name: str = "slmigrate-writer",
        deadletter_path: Path | str | None = None,
    ):
        if not 0 < flush_interval <= 0.2:
            raise ValueError("flush_interval must be in (0, 0.2] seconds")
        self._store_factory = store_factory
        self._store: Any = None
        self.flush_interval = flush_interval
        self.batch_size = batch_size
        self.max_retained = max_retained
        self.busy_timeout_ms = busy_timeout_ms
        self.max_queue = max_queue
        self.deadletter_path = None if deadletter_path is None else Path(deadletter_path)
        self._queue: collections.deque = collections.deque()
        self._wake = threading.Event()
        self._retained: list[CallRecord] = []
        self._lock = threading.Lock()
        self._done = threading.Condition(self._lock)
        self.submitted = 0
        self.logged = 0
        self.duplicates = 0
        self.dropped = 0
        self.store_failures = 0
        self.conversion_failures = 0
        self.skipped = 0  # items that turned out not to be loggable calls
        self.deadlettered = 0  # calls kept in the dead-letter file instead of the store
        self.last_deadletter_reason: str | None = None
        self._dropped_accepted = 0
        self.last_error: str | None = None
        self.last_error_at: str | None = None
        self.last_flush_at: str | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    # --- request path: must stay cheap and never raise ---
    def submit(self, item: CallRecord | Recordable) -> bool:
        if self._closed or len(self._queue) >= self.max_queue:
            with self._lock:
                self.dropped += 1
            return False
        with self._lock:
            self.submitted += 1
            self._queue.append(item)  # under the (uncontended) lock so flush() sees a consistent count
        return True

    # --- control ---
    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until everything submitted so far is written (or dropped). False on timeout."""
        deadline = time.monotonic() + timeout
        self._wake.set()
        with self._done:
            target = self.submitted
            while self._processed() < target:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._done.wait(left)
        return True

    def close(self, timeout: float = 30.0) -> None:
        """Stop accepting, drain the queue and the retained batch, close the store. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout)

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {
                "submitted": self.submitted, "logged": self.logged, "duplicates": self.duplicates,
                "dropped": self.dropped, "store_failures": self.store_failures,
                "conversion_failures": self.conversion_failures, "deadlettered": self.deadlettered,
                "deadletter_file": None if self.deadletter_path is None else str(self.deadletter_path),
                "last_deadletter_reason": self.last_deadletter_reason,
                "pending": self.submitted - self._processed(), "retained": len(self._retained),
                "last_error": self.last_error, "last_error_at": self.last_error_at,
                "last_flush_at": self.last_flush_at, "flush_interval_ms": round(self.flush_interval * 1000),
                "healthy": self.last_error is None or not self._retained,
            }

    def _processed(self) -> int:
        # Items dropped at submit never counted as submitted, so only count drops of accepted items here.
        return self.logged + self.duplicates + self.skipped + self.deadlettered + self._dropped_accepted

    # --- writer thread ---
    _stopping = False

    def _run(self) -> None:
        while True:
            self._wake.wait(self.flush_interval)
            self._wake.clear()
            stopping = self._stopping
            while True:
                items: list[Any] = []
                while self._queue and len(items) < self.batch_size:
                    items.append(self._queue.popleft())
                records = self._convert(items)
                if records or self._retained:
                    self._write(records)
                if not self._queue or (self._retained and self.last_error is not None):
                    break
            if stopping and not self._queue:
                self._final_drain()
                return

    def _convert(self, items: list[Any]) -> list[CallRecord]:
        records = []
        for item in items:
            try:
                rec = item if isinstance(item, CallRecord) else item.to_record()
            except Exception as exc:  # a malformed exchange must not stop the writer
                with self._lock:
                    self.conversion_failures += 1
                self._dead_letter([(item, f"could not be turned into a record: {_describe(exc)}")])
                continue
            if rec is None:  # not a loggable call after all
                with self._done:
                    self.skipped += 1
                    self._done.notify_all()
                continue
            records.append(rec)
        return records

    def _open(self) -> Any:
        if self._store is None:
            self._store = self._store_factory()
            try:
                # Fail fast on a locked database and retry next cycle, instead of blocking for the store's 30 s.
                self._store.set_write_timeout(self.busy_timeout_ms)
            except Exception:
                pass
        return self._store

    def _write(self, records: list[CallRecord]) -> bool:
        batch = self._retained + records
        try:
            store = self._open()
        except Exception as exc:  # no store to write to at all
            return self._keep_for_retry(batch, exc)
        try:
            self._insert(store, batch)
        except Exception as exc:
            if _store_failure(exc):
                return self._keep_for_retry(batch, exc)
            return self._isolate(store, batch, exc)
        self._stored()
        return True

    def _insert(self, store: Any, records: list[CallRecord]) -> None:
        inserted, duplicates = store.insert_calls(records)
        with self._done:
            self.logged += inserted
            self.duplicates += duplicates
            self._done.notify_all()

    def _stored(self) -> None:
        with self._done:
            self._retained = []
            self.last_error = None
            self.last_flush_at = now_iso()
            self._done.notify_all()

    def _isolate(self, store: Any, batch: list[CallRecord], first: Exception) -> bool:
        """The store refused a batch for a reason that may be one record's: bisect it, store every part it takes,
        dead-letter the single records it refuses - as long as it takes something, proving the store works."""
        parts = [batch[len(batch) // 2:], batch[:len(batch) // 2]]  # a stack: the first half is tried first
        refused: list[tuple[CallRecord, Exception]] = []
        stored_any = False
        while parts:
            part = parts.pop()
            if not part:
                continue
            try:
                self._insert(store, part)
                stored_any = True
            except Exception as exc:
                if _store_failure(exc):
                    left = [rec for p in parts for rec in p] + part + [rec for rec, _ in refused]
                    return self._keep_for_retry(left, exc)
                if len(part) == 1:
                    refused.append((part[0], exc))
                else:
                    middle = len(part) // 2
                    parts += [part[middle:], part[:middle]]
        if refused and not stored_any:
            # Nothing could be stored, so it is the store that fails (e.g. a read-only PostgreSQL answers every
            # insert with an InternalError): keep the batch for the next cycle, when new calls come along to tell.
            return self._keep_for_retry([rec for rec, _ in refused], first)
        self._dead_letter([(rec, f"the store refused this call: {_describe(exc)}") for rec, exc in refused])
        self._stored()
        return True

    def _keep_for_retry(self, batch: list[CallRecord], exc: Exception) -> bool:
        """The store failed: keep the batch for the next cycle, up to ``max_retained`` records."""
        self._drop_broken_store()
        overflow = max(0, len(batch) - self.max_retained)
        with self._done:
            self.store_failures += 1
            self.last_error = _describe(exc)
            self.last_error_at = now_iso()
            self._retained = batch[overflow:]
        if overflow:
            self._dead_letter([(rec, f"the store failed ({self.last_error}) while more than {self.max_retained} "
                                     "calls waited") for rec in batch[:overflow]])
        log.warning("store write failed (%s); %d records kept for retry", self.last_error, len(self._retained))
        return False

    def _dead_letter(self, failed: list[tuple[Any, str]]) -> None:
        """Keep calls that cannot be stored in the dead-letter file; without one (or when it cannot be written
        either, e.g. the disk is full) they are counted as dropped."""
        if not failed:
            return
        written = False
        if self.deadletter_path is not None:
            codec = self._payload_codec()
            try:
                deadletter.append(self.deadletter_path, [deadletter.entry(item, why, codec) for item, why in failed])
                written = True
            except Exception as exc:  # noqa: BLE001 - the writer thread must survive a full disk too
                log.error("could not write the dead-letter file %s: %s", self.deadletter_path, exc)
        reason = redact_urls(failed[-1][1])
        log.warning("%d captured call(s) %s: %s", len(failed),
                    f"put in {self.deadletter_path}" if written else "dropped", reason)
        with self._done:
            self.last_deadletter_reason = reason
            if written:
                self.deadlettered += len(failed)
            else:
                self.dropped += len(failed)
                self._dropped_accepted += len(failed)
            self._done.notify_all()

    def _payload_codec(self) -> Any:
        # The store's own codec, so a sealed payload opens with the store's key; before the store could be opened,
        # the one it would use. None (payload left out, never written in clear) when no codec can be made.
        codec = getattr(self._store, "codec", None)
        if codec is not None:
            return codec
        try:
            from slmigrate.store import default_codec

            return default_codec()
        except Exception:  # noqa: BLE001 - e.g. a malformed key; reported by the store itself
            return None

    def _drop_broken_store(self) -> None:
        # A PostgreSQL connection dies with a server restart or failover; reconnect on the next cycle.
        try:
            broken = self._store is not None and bool(getattr(self._store, "broken", False))
        except Exception:
            broken = True
        if broken:
            try:
                self._store.close()
            except Exception:
                pass
            self._store = None

    def _final_drain(self) -> None:
        # On shutdown give a failing store a few more chances before counting what is left as lost.
        for _ in range(5):
            if not self._retained:
                break
            time.sleep(0.2)
            self._write([])
        with self._done:
            left, self._retained = self._retained, []
        if left:
            log.error("%d captured calls could not be written before exit: %s", len(left), self.last_error)
            self._dead_letter([(rec, f"the store still failed at shutdown: {self.last_error}") for rec in left])
        if self._store is not None:
            try:
                self._store.close()
            except Exception:
                pass


# --- one writer per store per process, for the SDK wrapper ---
_shared: dict[Path | str, RecordWriter] = {}
_shared_lock = threading.Lock()


def shared_writer(db_path: Path | str, deadletter_path: Path | None = None) -> RecordWriter:
    """The process-wide writer for a store (a SQLite file or a PostgreSQL URL); drained at interpreter exit.

    ``deadletter_path`` applies when this call creates the writer."""
    from slmigrate.store import PG_SCHEMES, Store

    key: Path | str = db_path if str(db_path).startswith(PG_SCHEMES) else Path(db_path).resolve()
    with _shared_lock:
        writer = _shared.get(key)
        if writer is None or writer._closed:
            label = "postgresql" if isinstance(key, str) else key.parent.name
            writer = RecordWriter(lambda: Store(key), name=f"slmigrate-writer:{label}",
                                  deadletter_path=deadletter_path)
            _shared[key] = writer
        return writer


@atexit.register
def _close_shared() -> None:
    with _shared_lock:
        writers = list(_shared.values())
        _shared.clear()
    for writer in writers:
        writer.close()


def _store_failure(exc: BaseException) -> bool:
    """Whether ``exc`` means the store failed (retry the batch) rather than one record (dead-letter it)."""
    if isinstance(exc, (OSError, MemoryError, SlmigrateError)):  # SlmigrateError: the store could not be opened
        return True
    names = {cls.__name__ for cls in type(exc).__mro__}
    # The bare DatabaseError too (SQLite's "file is not a database"); its other subclasses - IntegrityError,
    # DataError, ProgrammingError - are about the values being written.
    return bool(names & _STORE_ERRORS) or type(exc).__name__ == "DatabaseError"


def _describe(exc: BaseException) -> str:
    return redact_urls(f"{type(exc).__name__}: {exc}")[:500]
