"""The background record writer shared by the proxy and the SDK wrapper.

Capturing must never slow or break the agent, so the request path only appends to an in-memory deque (no lock,
no thread wake-up: waking a thread per request costs the event loop a GIL hand-off). One thread wakes every
``flush_interval`` seconds, turns what was queued into ``CallRecord``s (JSON parsing, stream merging, encryption
all happen there) and inserts them in one transaction, so after a hard kill at most about one flush interval of
calls is lost; ``close()`` drains everything.

When the store fails (locked, read-only, disk full) the failed batch is kept and retried on the next cycle,
up to ``max_retained`` records; beyond that the oldest are dropped. Failures and drops are counted for
``/slmigrate/health`` and ``/slmigrate/metrics``.
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

from slmigrate.record import CallRecord, now_iso

log = logging.getLogger("slmigrate.writer")

DEFAULT_FLUSH_INTERVAL = 0.1  # seconds; the documented bound is 200 ms


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
                "conversion_failures": self.conversion_failures,
                "pending": self.submitted - self._processed(), "retained": len(self._retained),
                "last_error": self.last_error, "last_error_at": self.last_error_at,
                "last_flush_at": self.last_flush_at, "flush_interval_ms": round(self.flush_interval * 1000),
                "healthy": self.last_error is None or not self._retained,
            }

    def _processed(self) -> int:
        # Items dropped at submit never counted as submitted, so only count drops of accepted items here.
        return self.logged + self.duplicates + self.skipped + self._dropped_accepted

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
                log.warning("could not turn a captured call into a record: %s", exc)
                with self._done:
                    self.conversion_failures += 1
                    self.dropped += 1
                    self._dropped_accepted += 1
                    self._done.notify_all()
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
            inserted, duplicates = self._open().insert_calls(batch)
        except Exception as exc:  # any store failure is survivable: keep the batch, retry next cycle
            self._drop_broken_store()
            with self._done:
                self.store_failures += 1
                self.last_error = f"{type(exc).__name__}: {exc}"
                self.last_error_at = now_iso()
                overflow = max(0, len(batch) - self.max_retained)
                self._retained = batch[overflow:]
                self.dropped += overflow
                self._dropped_accepted += overflow
                self._done.notify_all()
            log.warning("store write failed (%s); %d records kept for retry", exc, len(self._retained))
            return False
        with self._done:
            self._retained = []
            self.logged += inserted
            self.duplicates += duplicates
            self.last_error = None
            self.last_flush_at = now_iso()
            self._done.notify_all()
        return True

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
            lost = len(self._retained)
            self.dropped += lost
            self._dropped_accepted += lost
            self._retained = []
            self._done.notify_all()
        if lost:
            log.error("%d captured calls could not be written before exit: %s", lost, self.last_error)
        if self._store is not None:
            try:
                self._store.close()
            except Exception:
                pass


# --- one writer per store per process, for the SDK wrapper ---
_shared: dict[Path | str, RecordWriter] = {}
_shared_lock = threading.Lock()


def shared_writer(db_path: Path | str) -> RecordWriter:
    """The process-wide writer for a store (a SQLite file or a PostgreSQL URL); drained at interpreter exit."""
    from slmigrate.store import PG_SCHEMES, Store

    key: Path | str = db_path if str(db_path).startswith(PG_SCHEMES) else Path(db_path).resolve()
    with _shared_lock:
        writer = _shared.get(key)
        if writer is None or writer._closed:
            label = "postgresql" if isinstance(key, str) else key.parent.name
            writer = RecordWriter(lambda: Store(key), name=f"slmigrate-writer:{label}")
            _shared[key] = writer
        return writer


@atexit.register
def _close_shared() -> None:
    with _shared_lock:
        writers = list(_shared.values())
        _shared.clear()
    for writer in writers:
        writer.close()
