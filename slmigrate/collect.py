"""``collect import``: read existing LLM call logs into the workspace store (paper step S1).

Files are JSON Lines, a JSON list, or one JSON object, optionally gzipped (recognised by content, not name).
Each file's format is detected from its first values unless ``format`` names one (see ``slmigrate.formats``).

Guarantees:
- every file is opened, parsed far enough to sample and matched to a format *before* anything is written, so a
  missing, non-JSON or unrecognisable file raises ``SlmigrateError`` and leaves the store untouched;
- records stream through in batches (memory stays flat on 100k-call files);
- a malformed line or record is skipped and reported with file:line and the reason; the rest is imported;
- re-importing adds nothing: calls are keyed by a content hash.
"""

from __future__ import annotations

import gzip
import io
import itertools
import json
import multiprocessing as mp
import time
import zlib
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from slmigrate import engines, formats
from slmigrate.errors import SlmigrateError
from slmigrate.formats import ConvertContext, FormatError
from slmigrate.formats._common import normalise_tools
from slmigrate.record import CallRecord, new_id
from slmigrate.workspace import Workspace

try:  # orjson parses the tau2 log ~2-3x faster than the standard library; fall back when it is absent
    import orjson

    _fast_loads: Callable[[bytes], Any] | None = orjson.loads
except ImportError:  # pragma: no cover - orjson is a declared dependency
    _fast_loads = None

SUFFIXES = (".jsonl", ".ndjson", ".json")
SAMPLE = 20  # values sampled per file for format detection
MAX_ERRORS = 1000  # detailed errors kept in the result; the rest are only counted
BATCH = 500  # calls per insert transaction
# Smaller files import in-process: starting worker processes costs more than they save (~0.1 s).
PARALLEL_MIN_BYTES = 4 << 20

Progress = Callable[[str, int, int], None]  # (file, bytes read, file size)


class _Bad:
    """A value that could not be parsed, with the reason (yielded in place of the value)."""

    __slots__ = ("reason",)

    def __init__(self, reason: str):
        self.reason = reason


@dataclass
class FileReport:
    path: str
    format: str
    detected: bool
    records: int = 0
    calls: int = 0
    imported: int = 0
    duplicates: int = 0
    skipped: int = 0


@dataclass
class ImportResult:
    imported: int = 0
    duplicates: int = 0
    skipped: int = 0
    errors: list[dict[str, Any]] = field(default_factory=list)
    errors_not_listed: int = 0
    files: list[FileReport] = field(default_factory=list)
    duration_s: float = 0.0

    @property
    def exit_code(self) -> int:
        """0 when every record was imported (or already present), 2 when some were skipped."""
        return 2 if self.skipped else 0

    def add_error(self, file: str, line: int, reason: str) -> None:
        self.skipped += 1
        if len(self.errors) < MAX_ERRORS:
            self.errors.append({"file": file, "line": line, "reason": reason})
        else:
            self.errors_not_listed += 1

    def to_dict(self) -> dict[str, Any]:
        return {
            "imported": self.imported,
            "duplicates": self.duplicates,
            "skipped": self.skipped,
            "errors": self.errors,
            "errors_not_listed": self.errors_not_listed,
            "format": {f.path: f.format for f in self.files},
            "files": [asdict(f) for f in self.files],
            "duration_s": round(self.duration_s, 3),
        }


# --- reading ---

def _loads(raw: bytes | str) -> Any:
    if _fast_loads is not None:
        try:
            return _fast_loads(raw)
        except ValueError:
            pass  # re-parse with the standard library: it reports errors more readably and allows big ints
    return json.loads(raw)


class _Source:
    """One input file: how to open it (gzip or not) and how its values are laid out."""

    def __init__(self, path: Path):
        self.path = path
        self.size = path.stat().st_size
        with open(path, "rb") as fh:
            self.gzipped = fh.read(2) == b"\x1f\x8b"
        self.mode = self._sniff()
        self._raw: Any = None

    def open(self) -> io.BufferedIOBase:
        self._raw = open(self.path, "rb")
        return gzip.GzipFile(fileobj=self._raw) if self.gzipped else self._raw  # type: ignore[return-value]

    def close(self, fh: Any) -> None:
        fh.close()
        if self._raw is not None:
            self._raw.close()

    def position(self) -> int:
        try:
            return self._raw.tell() if self._raw is not None else 0
        except (ValueError, OSError):
            return self.size

    def _sniff(self) -> str:
        name = self.path.name.lower().removesuffix(".gz")
        fh = self.open()
        try:
            head = fh.read(1 << 16)
        except (OSError, EOFError, zlib.error) as exc:
            raise SlmigrateError(f"cannot read {self.path}: {exc}; expected a JSON or JSON Lines file, "
                                 "optionally gzipped") from exc
        finally:
            self.close(fh)
        text = head.lstrip(b"\xef\xbb\xbf \t\r\n")
        if not text:
            raise SlmigrateError(f"{self.path} is empty; expected JSON Lines, a JSON list or a JSON object")
        if text[:1] == b"[":
            return "array"
        if name.endswith((".jsonl", ".ndjson")):
            return "lines"
        first_line = text.split(b"\n", 1)[0]
        try:
            _loads(first_line)
            return "lines"
        except ValueError:
            return "document"

    def values(self) -> Iterator[tuple[int, Any]]:
        """(line number, parsed value or _Bad) for every value in the file."""
        fh = self.open()
        try:
            if self.mode == "lines":
                yield from _iter_lines(fh)
            elif self.mode == "array":
                yield from _iter_array(io.TextIOWrapper(fh, encoding="utf-8-sig"))
            else:
                try:
                    yield 1, _loads(fh.read())
                except ValueError as exc:
                    yield 1, _Bad(_json_reason(exc))
        except (OSError, EOFError, zlib.error) as exc:
            yield 0, _Bad(f"the file could not be read to the end: {exc}")
        finally:
            self.close(fh)


def _json_reason(exc: ValueError) -> str:
    if isinstance(exc, json.JSONDecodeError):
        return f"not valid JSON: {exc.msg} at character {exc.pos + 1}"
    return f"not valid JSON: {exc}"


def _raw_lines(fh: io.BufferedIOBase, chunk: int = 1 << 20) -> Iterator[tuple[int, bytes]]:
    """(line number, bytes) of every non-blank line; reads big blocks, as line-by-line gzip reads cost more."""
    number, rest = 0, b""
    while True:
        block = fh.read(chunk)
        if not block:
            break
        lines = (rest + block).split(b"\n")
        rest = lines.pop()
        for raw in lines:
            number += 1
            if raw.strip():
                yield number, raw
    if rest.strip():
        yield number + 1, rest


def _iter_lines(fh: io.BufferedIOBase) -> Iterator[tuple[int, Any]]:
    for number, raw in _raw_lines(fh):
        try:
            yield number, _loads(raw)
        except ValueError as exc:
            yield number, _Bad(_json_reason(exc))


def _iter_array(fh: io.TextIOBase, chunk: int = 1 << 20) -> Iterator[tuple[int, Any]]:
    """The items of a top-level JSON list, decoded one at a time so a huge list never sits in memory whole."""
    decoder = json.JSONDecoder()
    buf, pos, eof = "", 0, False
    line, counted = 1, 0  # newlines counted in buf[:counted]

    def more() -> bool:
        nonlocal buf, pos, eof, line, counted
        data = fh.read(chunk)
        if not data:
            eof = True
            return False
        line += buf.count("\n", counted, pos)
        buf, counted, pos = buf[pos:] + data, 0, 0
        return True

    def skip_ws() -> None:
        nonlocal pos
        while True:
            while pos < len(buf) and buf[pos] in " \t\r\n\ufeff":
                pos += 1
            if pos < len(buf) or not more():
                return

    def here() -> int:
        nonlocal line, counted
        line += buf.count("\n", counted, pos)
        counted = pos
        return line

    skip_ws()
    if buf[pos:pos + 1] != "[":
        yield here(), _Bad("expected a JSON list")
        return
    pos += 1
    first = True
    while True:
        skip_ws()
        if pos >= len(buf):
            yield here(), _Bad("the JSON list is not closed (file truncated?)")
            return
        if buf[pos] == "]":
            return
        if not first:
            if buf[pos] != ",":
                yield here(), _Bad(f"expected ',' between list items, found {buf[pos]!r}; the rest of the file "
                                   "could not be read")
                return
            pos += 1
            skip_ws()
        first = False
        start = here()
        while True:
            try:
                value, end = decoder.raw_decode(buf, pos)
                break
            except json.JSONDecodeError as exc:
                # Either the item runs past the buffer (read more) or it is broken (report; the list's structure
                # is lost from here, so the rest of the file cannot be read).
                if eof or len(buf) - pos > (256 << 20) or not more():
                    yield start, _Bad(f"not valid JSON: {exc.msg}; the rest of the file could not be read")
                    return
        pos = end
        yield start, value


# --- planning (all checks before anything is written) ---

@dataclass
class _Plan:
    source: _Source
    fmt: formats.Format
    detected: bool


def expand_paths(paths: list[str | Path]) -> list[Path]:
    """Files named directly, plus the JSON/JSONL files (gzipped or not) inside folders, in name order."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file()
                           and f.name.lower().removesuffix(".gz").endswith(SUFFIXES))
            if not found:
                raise SlmigrateError(f"folder {p} holds no .jsonl/.json files (gzipped or not); "
                                     "pass the log files themselves")
            out.extend(found)
        elif p.is_file():
            out.append(p)
        else:
            raise SlmigrateError(f"{p} does not exist; pass the path of a log file or folder")
    if not out:
        raise SlmigrateError("no input files given; pass one or more log files, e.g. "
                             "`slmigrate collect import calls.jsonl`")
    return out


def _plan(path: Path, format: str) -> _Plan:
    source = _Source(path)
    sample: list[Any] = []
    first_error: tuple[int, str] | None = None
    values = source.values()
    try:
        for line, value in values:
            if isinstance(value, _Bad):
                first_error = first_error or (line, value.reason)
                if line == 0:
                    break
            else:
                sample.append(value)
            if len(sample) >= SAMPLE or (first_error and not sample and line > 200):
                break
    finally:
        values.close()  # closes the file now rather than when the generator is collected
    if not sample:
        where = f" (line {first_error[0]}: {first_error[1]})" if first_error else ""
        raise SlmigrateError(f"{path} is not JSON{where}; expected JSON Lines, a JSON list or a JSON object, "
                             "optionally gzipped")
    if format != "auto":
        return _Plan(source, formats.get(format), detected=False)
    name, score, scores = formats.detect(sample)
    if name is None:
        keys = sorted({k for v in sample if isinstance(v, dict) for k in v})[:12]
        raise SlmigrateError(
            f"cannot tell the log format of {path} (its records have keys: {', '.join(keys) or 'none'}); "
            f"pass --format, one of: {', '.join(formats.names())}; docs/formats.md describes each"
        )
    return _Plan(source, formats.get(name), detected=True)


def load_tools(path: str | Path) -> list[dict[str, Any]]:
    """A tools file for ``--tools``: a JSON list of OpenAI tools (or legacy functions), or ``{"tools": [...]}``."""
    p = Path(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise SlmigrateError(f"tools file {p} does not exist; pass --tools with a JSON list of tool schemas") from exc
    except (OSError, ValueError) as exc:
        raise SlmigrateError(f"tools file {p} is not readable JSON ({exc}); expected a JSON list of OpenAI tool "
                             "schemas") from exc
    try:
        return normalise_tools(data, str(p))
    except FormatError as exc:
        raise SlmigrateError(f"tools file {p}: {exc}; expected a JSON list of OpenAI tool schemas") from exc


# --- importing ---

def _import_workers() -> int:
    """Worker processes for big JSON Lines files: one per CPU this process may use, none without ``fork``."""
    if "fork" not in mp.get_all_start_methods():
        return 0
    cpus = engines.usable_cpus()
    return cpus if cpus > 1 else 0


@dataclass
class _Converted:
    """What one batch of values turned into: records (or encoded rows) and what was skipped, in file order."""

    records: int = 0
    calls: int = 0
    errors: list[tuple[int, str]] = field(default_factory=list)
    items: list[Any] = field(default_factory=list)  # CallRecords, or rows once encoded
    unstamped: list[int] = field(default_factory=list)  # positions of calls without a timestamp (need a clock id)


def _convert(fmt: formats.Format, ctx: ConvertContext, values: Iterator[tuple[int, Any]]) -> _Converted:
    out = _Converted()
    name = fmt.name
    for line, value in values:
        if isinstance(value, _Bad):
            out.errors.append((line, value.reason))
            continue
        out.records += 1
        ctx.line = line
        ctx.problems = []
        try:
            records = fmt.convert(value, ctx)
        except FormatError as exc:
            out.errors.append((line, str(exc)))
            continue
        except (KeyError, TypeError, AttributeError, IndexError, ValueError) as exc:
            # A record shaped unlike anything the format expects: skip it, say what broke.
            out.errors.append((line, f"unexpected record shape ({type(exc).__name__}: {exc})"))
            continue
        for reason in ctx.problems:
            out.errors.append((line, reason))
        for rec in records:
            if not rec.source or rec.source == "import":
                rec.source = f"import:{name}"
            if rec.latency_ms is not None:  # float noise from subtracting epoch seconds
                rec.latency_ms = round(rec.latency_ms, 3)
            if rec.ttft_ms is not None:
                rec.ttft_ms = round(rec.ttft_ms, 3)
            if rec.timestamp is None and not rec.id:
                rec.content_hash = rec.content_hash or rec.compute_hash()
                out.unstamped.append(len(out.items))
            out.items.append(rec)
        out.calls += len(records)
    return out


def _parse_lines(raw_lines: list[tuple[int, bytes]]) -> Iterator[tuple[int, Any]]:
    for number, raw in raw_lines:
        try:
            yield number, _loads(raw)
        except ValueError as exc:
            yield number, _Bad(_json_reason(exc))


# Set in the importing process just before the worker pool forks; the workers inherit it (nothing is pickled, so
# plug-in formats and encrypting codecs work as they do in-process).
_FORKED: dict[str, Any] = {}


def _work(plan_index: int, raw_lines: list[tuple[int, bytes]]) -> _Converted:
    """In a worker process: parse, convert, hash and encode one batch of raw JSON lines into store rows."""
    plan = _FORKED["plans"][plan_index]
    ctx = ConvertContext(file=str(plan.source.path), agent=_FORKED["agent"], tools=_FORKED["tools"])
    out = _convert(plan.fmt, ctx, _parse_lines(raw_lines))
    out.items = _FORKED["store"].encode_rows(out.items)
    return out


def _import_parallel(pool: Any, workers: int, plan_index: int, src: _Source, batch_size: int, report: FileReport,
                     account: Callable, insert: Callable, stamp_row: Callable, result: ImportResult) -> None:
    """This process reads raw lines and writes rows; the pool parses, converts and encodes, batches in order."""
    pending: deque[Any] = deque()

    def drain(keep: int) -> None:
        while len(pending) > keep:
            conv = pending.popleft().get()
            account(report, conv)
            rows = conv.items
            for pos in conv.unstamped:
                rows[pos] = stamp_row(rows[pos])
            insert(report, src, rows)

    fh = src.open()
    read_error = None
    try:
        batch: list[tuple[int, bytes]] = []
        for item in _raw_lines(fh):
            batch.append(item)
            if len(batch) >= batch_size:
                pending.append(pool.apply_async(_work, (plan_index, batch)))
                batch = []
                drain(keep=2 * workers)  # bounded: memory stays flat however big the file
        if batch:
            pending.append(pool.apply_async(_work, (plan_index, batch)))
    except (OSError, EOFError, zlib.error) as exc:
        read_error = f"the file could not be read to the end: {exc}"
    finally:
        src.close(fh)
    drain(keep=0)
    if read_error:
        report.skipped += 1
        result.add_error(report.path, 0, read_error)


def _import_in_process(plan: _Plan, ctx: ConvertContext, batch_size: int, report: FileReport, account: Callable,
                       encode: Callable, insert: Callable, stamp: Callable) -> None:
    """Small files, lists and documents: this thread parses and converts; a worker thread hashes and compresses
    (zlib and sha256 release the GIL) while the next batch is parsed. SQLite writes stay on this thread."""
    src = plan.source
    pending: deque[Future] = deque()
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="slmigrate-encode") as encoder:
        values = src.values()
        while True:
            conv = _convert(plan.fmt, ctx, itertools.islice(values, batch_size))
            account(report, conv)
            for pos in conv.unstamped:
                stamp(conv.items[pos])
            if conv.items:
                pending.append(encoder.submit(encode, conv.items))
            more = bool(conv.records or conv.errors)
            while len(pending) > (1 if more else 0):
                insert(report, src, pending.popleft().result())
            if not more:
                return


def import_calls(
    ws: Workspace,
    paths: list[str | Path],
    format: str = "auto",
    agent: str | None = None,
    tools_file: str | Path | None = None,
    progress: Progress | None = None,
    batch_size: int = BATCH,
    workers: int | None = None,
) -> ImportResult:
    """Import log files into ``ws``; returns counts, per-file formats and the skipped records with reasons.

    ``workers``: processes that parse, convert and encode JSON Lines files of ``PARALLEL_MIN_BYTES`` or more
    while this process reads the file and writes the store; None picks one per usable CPU, 0 imports in-process.
    The result (ids, hashes, rows, errors) is the same either way.
    """
    started = time.time()
    if format != "auto":
        formats.get(format)  # unknown names fail before any file is touched
    tools = load_tools(tools_file) if tools_file else None
    plans = [_plan(p, format) for p in expand_paths(paths)]

    store = ws.store
    result = ImportResult()
    for plan in plans:
        src = plan.source
        result.files.append(FileReport(path=str(src.path), format=plan.fmt.name, detected=plan.detected))
    # Calls without their own timestamp get ids in file order from one import clock (their content hash,
    # which decides duplicates, leaves the timestamp out so a re-import still matches).
    clock = int(started * 1000)
    seq = 0

    def stamp(rec: CallRecord) -> None:
        nonlocal seq
        rec.id = new_id(clock + seq, bytes.fromhex(rec.content_hash[:20]))
        seq += 1

    def stamp_row(row: tuple) -> tuple:
        nonlocal seq
        row = (new_id(clock + seq, bytes.fromhex(row[1][:20])),) + row[1:]
        seq += 1
        return row

    def account(report: FileReport, conv: _Converted) -> None:
        report.records += conv.records
        report.calls += conv.calls
        report.skipped += len(conv.errors)
        for line, reason in conv.errors:
            result.add_error(report.path, line, reason)

    def insert(report: FileReport, src: _Source, rows: list[tuple]) -> None:
        inserted, dups = store.insert_rows(rows)
        report.imported += inserted
        report.duplicates += dups
        if progress:
            progress(str(src.path), src.position(), src.size)

    if workers is None:
        workers = _import_workers()
    parallel = [p.source.mode == "lines" and p.source.size >= PARALLEL_MIN_BYTES for p in plans] if workers > 0 \
        else [False] * len(plans)
    pool = None
    if any(parallel):
        # fork: the children start in milliseconds and inherit the plans, formats and codec as they are here.
        _FORKED.update(plans=plans, agent=agent, tools=tools, store=store)
        pool = mp.get_context("fork").Pool(workers)
    try:
        for i, (plan, report) in enumerate(zip(plans, result.files)):
            src = plan.source
            if parallel[i]:
                _import_parallel(pool, workers, i, src, batch_size, report, account, insert, stamp_row, result)
            else:
                _import_in_process(plan, ConvertContext(file=str(src.path), agent=agent, tools=tools), batch_size,
                                   report, account, store.encode_rows, insert, stamp)
            if progress:
                progress(str(src.path), src.size, src.size)
    except BaseException:
        if pool is not None:
            pool.terminate()  # an error (or Ctrl-C) stops the workers now rather than after their queued batches
        raise
    finally:
        if pool is not None:
            pool.close()
            pool.join()
            _FORKED.clear()  # kept until now: a worker that dies is replaced by a new fork, which needs it
    for report in result.files:
        result.imported += report.imported
        result.duplicates += report.duplicates

    result.duration_s = time.time() - started
    ws.write_manifest(
        "collect",
        fingerprint=store.fingerprint(),
        config={"format": format, "agent": agent, "tools": None if tools_file is None else str(tools_file)},
        counts={"imported": result.imported, "duplicates": result.duplicates, "skipped": result.skipped,
                "calls_in_store": store.count_calls()},
        started=started,
        extra={"files": [asdict(f) for f in result.files]},
    )
    return result
