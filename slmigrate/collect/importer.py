"""``collect import``: read existing LLM call logs into the workspace store (paper step S1).

Files are JSON Lines, a JSON list, or one JSON object, optionally gzipped (recognised by content, not name).
Each file's format is detected from its first values unless ``format`` names one (see ``slmigrate.collect.formats``).

Guarantees:
- every file is opened, parsed far enough to sample and matched to a format *before* anything is written, so a
  missing, non-JSON or unrecognisable file raises ``SlmigrateError`` and leaves the store untouched;
- records stream through in batches (memory stays flat on 100k-call files);
- a record that cannot be parsed, converted, encoded or stored is skipped and reported with file:line and the
  reason, the rest is imported - whatever the record holds (deep nesting, huge lines, lone surrogates, numbers
  no column holds), in-process and in the worker processes alike; what the record layer normalised on the way
  (``CallRecord.normalise``) is reported as a note with file:line;
- re-importing adds nothing: calls are keyed by a content hash.
"""

from __future__ import annotations

import gzip
import io
import itertools
import json
import logging
import multiprocessing as mp
import threading
import time
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from slmigrate import engines
from slmigrate.collect import formats
from slmigrate.errors import SlmigrateError
from slmigrate.collect.formats import ConvertContext, FormatError
from slmigrate.collect.formats._common import normalise_tools
from slmigrate.progress import Progress  # reported as (file, bytes read, file size)
from slmigrate.record import CallRecord, RecordError, new_id
from slmigrate.record import log as record_log
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
# Nesting depth of one record. Real call logs nest 10-20 levels (the tau2 log: 12), so 200 is far beyond any
# genuine call while staying under orjson's 255-level limit for writing JSON: hashing and payload encoding keep
# their fast path, and the recursive walks of later stages stay far from Python's recursion limit (1,000).
MAX_DEPTH = 200
# Size of one JSON line (or one item of a JSON list). One call at the largest context windows (1M tokens is
# ~4 MB of text) plus inline base64 images fits easily; a bigger line is held several times over in memory at
# once (the raw line, its parsed objects, a worker's copy), so it is skipped unread instead.
MAX_LINE_BYTES = 64 << 20
_MB = 1 << 20


class _Bad:
    """A value that could not be parsed, with the reason (yielded in place of the value)."""

    __slots__ = ("reason",)

    def __init__(self, reason: str):
        self.reason = reason


class _TooDeep(ValueError):
    """A JSON value nested deeper than ``MAX_DEPTH``."""

    def __str__(self) -> str:
        return _DEPTH_REASON


_DEPTH_REASON = (f"nested deeper than {MAX_DEPTH} levels, the limit per record (slmigrate.collect.importer.MAX_DEPTH; "
                 "real calls nest 10-20); drop or flatten the deep part (often a JSON value embedded as an object) "
                 "before importing")


def _too_long(size: int) -> _Bad:
    return _Bad(f"the record is {size / _MB:,.1f} MB, over the limit of {MAX_LINE_BYTES // _MB} MB per line "
                "(slmigrate.collect.importer.MAX_LINE_BYTES); strip inline data such as base64 images or split the log "
                "before importing")


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
    normalised: int = 0


@dataclass
class ImportResult:
    imported: int = 0
    duplicates: int = 0
    skipped: int = 0
    errors: list[dict[str, Any]] = field(default_factory=list)
    errors_not_listed: int = 0
    # Calls imported with a value changed to fit the store (a lone surrogate, an out-of-range count, a model
    # that was not a string): the record layer's note, with file and line.
    normalised: int = 0
    notes: list[dict[str, Any]] = field(default_factory=list)
    files: list[FileReport] = field(default_factory=list)
    duration_s: float = 0.0

    @property
    def exit_code(self) -> int:
        """0 when every record was imported (or already present), 2 when some were skipped."""
        return 2 if self.skipped else 0

    def add_error(self, file: str, line: int, reason: str) -> None:
        self.skipped += 1
        if len(self.errors) < MAX_ERRORS:
            self.errors.append({"file": file, "line": line, "reason": _printable(reason)})
        else:
            self.errors_not_listed += 1

    def add_note(self, file: str, line: int, note: str) -> None:
        self.normalised += 1
        if len(self.notes) < MAX_ERRORS:
            self.notes.append({"file": file, "line": line, "note": _printable(note)})

    def to_dict(self) -> dict[str, Any]:
        return {
            "imported": self.imported,
            "duplicates": self.duplicates,
            "skipped": self.skipped,
            "errors": self.errors,
            "errors_not_listed": self.errors_not_listed,
            "normalised": self.normalised,
            "notes": self.notes,
            "format": {f.path: f.format for f in self.files},
            "files": [asdict(f) for f in self.files],
            "duration_s": round(self.duration_s, 3),
        }


def _printable(text: str) -> str:
    """A reason that quotes a lone surrogate from the log would fail to print or to write as JSON: escape it."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


# --- reading ---

def _loads(raw: bytes) -> Any:
    """The JSON value of one record; ``ValueError`` (``_TooDeep`` for deep nesting) when there is none."""
    if _fast_loads is not None:
        try:
            value = _fast_loads(raw)
        except ValueError as exc:
            if "depth limit" in str(exc):  # orjson stops at 1,024 levels; the standard library would overflow
                raise _TooDeep() from None
        else:
            return _checked_depth(value, raw)
    try:  # the standard library reports errors more readably and allows big ints and lone surrogates
        value = json.loads(raw)
    except RecursionError:
        raise _TooDeep() from None
    return _checked_depth(value, raw)


_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")


def _checked_depth(value: Any, raw: bytes) -> Any:
    if not _brackets_shallow(raw) and _deeper_than(value, MAX_DEPTH):
        raise _TooDeep()
    return value


def _brackets_shallow(raw: bytes) -> bool:
    """A cheap test that ``raw`` nests at most MAX_DEPTH levels (a few percent of parsing it; walking the parsed
    value costs ~15%): keep only the brackets, then peel innermost pairs; a pass peels at most two levels (``{[]}``
    goes at once). Brackets inside strings count too, so "not shallow" only means "walk the value to be sure"; a
    wrong "shallow" needs strings whose lone brackets pair with the structure's, which loggers do not write."""
    brackets = raw.translate(None, _NOT_BRACKETS)
    for _ in range(MAX_DEPTH // 2):
        if not brackets:
            return True
        brackets = brackets.replace(b"[]", b"").replace(b"{}", b"")
    return not brackets


def _deeper_than(value: Any, limit: int) -> bool:
    """Whether ``value`` nests more than ``limit`` containers deep; level by level, so no recursion."""
    level = [value] if isinstance(value, (dict, list)) else []
    depth = 0
    while level:
        depth += 1
        if depth > limit:
            return True
        below: list[Any] = []
        for node in level:
            below.extend([v for v in (node.values() if type(node) is dict else node)
                          if type(v) is dict or type(v) is list])
        level = below
    return False


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
    if isinstance(exc, _TooDeep):
        return str(exc)
    if isinstance(exc, json.JSONDecodeError):
        return f"not valid JSON: {exc.msg} at character {exc.pos + 1}"
    return f"not valid JSON: {exc}"


def _raw_lines(fh: io.BufferedIOBase, chunk: int = 1 << 20) -> Iterator[tuple[int, bytes | _Bad]]:
    """(line number, bytes) of every non-blank line; reads big blocks, as line-by-line gzip reads cost more.

    A line over ``MAX_LINE_BYTES`` comes as a ``_Bad`` and is never held whole: its pieces are dropped as soon
    as they pass the limit."""
    number = 0
    head: list[bytes] = []  # the start of the current line, from earlier blocks (emptied once it is too long)
    held = 0  # bytes of the current line read so far
    while True:
        block = fh.read(chunk)
        if not block:
            break
        lines: list[Any] = block.split(b"\n")
        tail = lines.pop()  # the start of the next line: no newline yet
        if lines and held:  # the first piece ends the line begun in earlier blocks
            held += len(lines[0])
            lines[0] = b"".join(head) + lines[0] if held <= MAX_LINE_BYTES else _too_long(held)
            head, held = [], 0
        for raw in lines:
            number += 1
            if type(raw) is _Bad or len(raw) > MAX_LINE_BYTES:
                yield number, raw if type(raw) is _Bad else _too_long(len(raw))
            elif raw.strip():
                yield number, raw
        if tail:
            held += len(tail)
            if held <= MAX_LINE_BYTES:
                head.append(tail)
            else:
                head.clear()
    if held > MAX_LINE_BYTES:
        yield number + 1, _too_long(held)
    elif held:
        rest = b"".join(head)
        if rest.strip():
            yield number + 1, rest


def _parse_lines(raw_lines: Iterable[tuple[int, bytes | _Bad]]) -> Iterator[tuple[int, Any]]:
    for number, raw in raw_lines:
        if type(raw) is _Bad:
            yield number, raw
            continue
        try:
            yield number, _loads(raw)
        except ValueError as exc:
            yield number, _Bad(_json_reason(exc))


def _iter_lines(fh: io.BufferedIOBase) -> Iterator[tuple[int, Any]]:
    return _parse_lines(_raw_lines(fh))


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
                if len(buf) - pos > MAX_LINE_BYTES:
                    yield start, _Bad(f"{_too_long(len(buf) - pos).reason}; the rest of the file could not be read")
                    return
                if eof or not more():
                    yield start, _Bad(f"not valid JSON: {exc.msg}; the rest of the file could not be read")
                    return
            except RecursionError:
                yield start, _Bad(f"{_DEPTH_REASON}; the rest of the file could not be read")
                return
        opens = buf.count("[", pos, end) + buf.count("{", pos, end)  # bounds the depth: walk only past it
        pos = end
        if opens > MAX_DEPTH and _deeper_than(value, MAX_DEPTH):
            yield start, _Bad(_DEPTH_REASON)
        else:
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



class _Notes(logging.Handler):
    """Catches the record layer's warnings (what ``CallRecord.normalise`` changed to make a call storable) on the
    thread that converts or encodes a batch, so each is reported with its call's file and line. Attached to the
    record logger only while an import runs; forked workers inherit it."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self._local = threading.local()

    def emit(self, record: logging.LogRecord) -> None:
        caught = getattr(self._local, "caught", None)
        if caught is not None:
            caught.append(record.getMessage())

    @contextmanager
    def catching(self) -> Iterator[list[str]]:
        self._local.caught = caught = []
        try:
            yield caught
        finally:
            self._local.caught = None


_NOTES = _Notes()


@dataclass
class _Converted:
    """What one batch of values turned into: records (or encoded rows) and what was skipped, in file order."""

    records: int = 0
    calls: int = 0
    errors: list[tuple[int, str]] = field(default_factory=list)
    notes: list[tuple[int, str]] = field(default_factory=list)
    items: list[Any] = field(default_factory=list)  # CallRecords, or rows once encoded
    lines: list[int] = field(default_factory=list)  # the line each item came from
    unstamped: list[int] = field(default_factory=list)  # positions of calls without a timestamp (need a clock id)


def _reason(exc: Exception, doing: str) -> str:
    """Why one record was skipped, from what went wrong while ``doing`` something with it."""
    if isinstance(exc, (FormatError, RecordError, _TooDeep)):
        return str(exc)
    if isinstance(exc, RecursionError):
        return _DEPTH_REASON
    return f"{doing} ({type(exc).__name__}: {exc})"


def _timeless_hash(rec: CallRecord) -> str:
    """The content hash of a call without a timestamp, taken before ``finalise`` stamps the import time on it,
    so that a re-import finds the same hash."""
    try:
        return rec.compute_hash()
    except UnicodeEncodeError:  # a lone surrogate: the record layer's own repair, as finalise() does it
        rec.replace_surrogates()
        return rec.compute_hash()


def _prepare(rec: CallRecord, name: str) -> CallRecord:
    if not rec.source or rec.source == "import":
        rec.source = f"import:{name}"
    if type(rec.latency_ms) is float:  # float noise from subtracting epoch seconds
        rec.latency_ms = round(rec.latency_ms, 3)
    if type(rec.ttft_ms) is float:
        rec.ttft_ms = round(rec.ttft_ms, 3)
    if rec.timestamp is None and not rec.id:
        rec.content_hash = rec.content_hash or _timeless_hash(rec)
    return rec


def _convert(fmt: formats.Format, ctx: ConvertContext, values: Iterable[tuple[int, Any]]) -> _Converted:
    """Values into CallRecords; a value the format (built-in or plug-in) cannot use, however it fails, is skipped."""
    out = _Converted()
    with _NOTES.catching() as caught:
        for line, value in values:
            if type(value) is _Bad:
                out.errors.append((line, value.reason))
                continue
            out.records += 1
            ctx.line = line
            ctx.problems = []
            try:
                records = [_prepare(rec, fmt.name) for rec in fmt.convert(value, ctx)]
            except Exception as exc:
                out.errors.append((line, _reason(exc, "unexpected record shape")))
                records = []
            out.errors.extend((line, reason) for reason in ctx.problems)
            for rec in records:
                if rec.timestamp is None and not rec.id:
                    out.unstamped.append(len(out.items))
                out.items.append(rec)
                out.lines.append(line)
            out.calls += len(records)
            if caught:
                out.notes.append((line, "; ".join(caught)))
                caught.clear()
    return out


def _encode(conv: _Converted, encode_rows: Callable[[list[CallRecord]], list[tuple]]) -> _Converted:
    """Finalise and encode the calls into store rows, one by one so that a call that cannot be stored costs only
    itself; runs in a worker thread or process."""
    rows: list[tuple] = []
    lines: list[int] = []
    unstamped: list[int] = []
    clock_ids = set(conv.unstamped)
    with _NOTES.catching() as caught:
        for i, (rec, line) in enumerate(zip(conv.items, conv.lines)):
            try:
                row = encode_rows([rec])[0]
            except Exception as exc:
                conv.errors.append((line, _reason(exc, "the call cannot be encoded for the store")))
            else:
                if i in clock_ids:
                    unstamped.append(len(rows))
                rows.append(row)
                lines.append(line)
            if caught:
                conv.notes.append((line, "; ".join(caught)))
                caught.clear()
    conv.items, conv.lines, conv.unstamped = rows, lines, unstamped
    return conv


# Set in the importing process just before the worker pool forks; the workers inherit it (nothing is pickled, so
# plug-in formats and encrypting codecs work as they do in-process).
_FORKED: dict[str, Any] = {}


def _work(plan_index: int, raw_lines: list[tuple[int, bytes | _Bad]]) -> _Converted:
    """In a worker process: parse, convert, hash and encode one batch of raw JSON lines into store rows."""
    plan = _FORKED["plans"][plan_index]
    ctx = ConvertContext(file=str(plan.source.path), agent=_FORKED["agent"], tools=_FORKED["tools"])
    return _encode(_convert(plan.fmt, ctx, _parse_lines(raw_lines)), _FORKED["store"].encode_rows)


def _import_parallel(pool: Any, workers: int, plan_index: int, src: _Source, batch_size: int,
                     finish: Callable[[_Converted], None]) -> None:
    """This process reads raw lines and writes rows; the pool parses, converts and encodes, batches in order."""
    pending: deque[Any] = deque()

    def drain(keep: int) -> None:
        while len(pending) > keep:
            finish(pending.popleft().get())

    fh = src.open()
    read_error = None
    try:
        batch: list[tuple[int, bytes | _Bad]] = []
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
        finish(_Converted(errors=[(0, read_error)]))


def _import_in_process(plan: _Plan, ctx: ConvertContext, batch_size: int,
                       encode_rows: Callable[[list[CallRecord]], list[tuple]],
                       finish: Callable[[_Converted], None]) -> None:
    """Small files, lists and documents: this thread parses and converts; a worker thread hashes and compresses
    (zlib and sha256 release the GIL) while the next batch is parsed. SQLite writes stay on this thread."""
    pending: deque[Future] = deque()
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="slmigrate-encode") as encoder:
        values = plan.source.values()
        while True:
            conv = _convert(plan.fmt, ctx, itertools.islice(values, batch_size))
            more = bool(conv.records or conv.errors)
            if more:
                pending.append(encoder.submit(_encode, conv, encode_rows))
            while len(pending) > (1 if more else 0):
                finish(pending.popleft().result())
            if not more:
                return


def _store_down(exc: Exception) -> bool:
    """A DB-API OperationalError/InternalError (SQLite or PostgreSQL: locked, disk full, connection lost) is the
    store's failure, not one row's: retrying row by row would only list every call as skipped."""
    return any(cls.__name__ in ("OperationalError", "InternalError") for cls in type(exc).__mro__)


def _insert(store: Any, path: str, conv: _Converted) -> tuple[int, int]:
    """Insert a batch's rows in one transaction; when that fails, row by row, so one row the store refuses is
    skipped (reported with its line) and the rest of the batch is kept. Returns (inserted, duplicates)."""

    def down(exc: Exception, line: int) -> SlmigrateError:
        return SlmigrateError(
            f"writing to the store {store.display} failed ({type(exc).__name__}: {exc}); the calls before "
            f"{path}:{line} are stored. Fix the store (disk space, a lock held by another process, the database "
            "server) and run the same import again: calls already stored count as duplicates")

    try:
        return store.insert_rows(conv.items)
    except Exception as exc:
        if _store_down(exc):
            raise down(exc, conv.lines[0]) from exc
    inserted = duplicates = 0
    for row, line in zip(conv.items, conv.lines):
        try:
            one, dup = store.insert_rows([row])
        except Exception as exc:
            if _store_down(exc):
                raise down(exc, line) from exc
            conv.errors.append((line, f"the store refused the call ({type(exc).__name__}: {exc})"))
        else:
            inserted, duplicates = inserted + one, duplicates + dup
    return inserted, duplicates


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

    def stamp_row(row: tuple) -> tuple:
        nonlocal seq
        row = (new_id(clock + seq, bytes.fromhex(row[1][:20])),) + row[1:]
        seq += 1
        return row

    def finisher(report: FileReport, src: _Source) -> Callable[[_Converted], None]:
        def finish(conv: _Converted) -> None:
            rows = conv.items
            for pos in conv.unstamped:
                rows[pos] = stamp_row(rows[pos])
            if rows:
                inserted, dups = _insert(store, report.path, conv)
                report.imported += inserted
                report.duplicates += dups
            report.records += conv.records
            report.calls += conv.calls
            report.skipped += len(conv.errors)
            report.normalised += len(conv.notes)
            for line, reason in sorted(conv.errors, key=lambda e: e[0]):  # stable: a line's reasons keep order
                result.add_error(report.path, line, reason)
            for line, note in conv.notes:
                result.add_note(report.path, line, note)
            if progress:
                progress(str(src.path), src.position(), src.size)
        return finish

    if workers is None:
        workers = _import_workers()
    parallel = [p.source.mode == "lines" and p.source.size >= PARALLEL_MIN_BYTES for p in plans] if workers > 0 \
        else [False] * len(plans)
    pool = None
    record_log.addHandler(_NOTES)  # before the fork, so the workers catch the record layer's notes too
    try:
        if any(parallel):
            # fork: the children start in milliseconds and inherit the plans, formats and codec as they are here.
            _FORKED.update(plans=plans, agent=agent, tools=tools, store=store)
            pool = mp.get_context("fork").Pool(workers, initializer=engines.die_with_parent)
        for i, (plan, report) in enumerate(zip(plans, result.files)):
            src = plan.source
            finish = finisher(report, src)
            if parallel[i]:
                _import_parallel(pool, workers, i, src, batch_size, finish)
            else:
                _import_in_process(plan, ConvertContext(file=str(src.path), agent=agent, tools=tools), batch_size,
                                   store.encode_rows, finish)
            if progress:
                progress(str(src.path), src.size, src.size)
    except BaseException:
        if pool is not None:
            pool.terminate()  # an error (or Ctrl-C) stops the workers now rather than after their queued batches
        raise
    finally:
        record_log.removeHandler(_NOTES)
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
                "normalised": result.normalised, "calls_in_store": store.count_calls()},
        started=started,
        extra={"files": [asdict(f) for f in result.files]},
    )
    return result
