"""``calls list / show / export``: look at the stored calls and write them back out.

``export --format openai`` writes one ``{id, input_id, timestamp, ..., request, response}`` object per line -
exactly what ``collect import`` reads as ``openai`` - so export then import round-trips requests, responses and
the content hash. ``--format openai-ft`` writes OpenAI fine-tuning JSONL (prompt messages + the answer, tools).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from slmigrate.errors import SlmigrateError
from slmigrate.record import CallRecord
from slmigrate.workspace import Workspace

EXPORT_FORMATS = ("openai", "openai-ft")
LIST_FIELDS = ("id", "input_id", "agent", "session", "model", "timestamp", "latency_ms", "prompt_tokens",
               "completion_tokens", "status", "error", "source", "outcome")


def list_calls(ws: Workspace, limit: int | None = None) -> list[dict[str, Any]]:
    """Calls in time (id) order without their payloads, each with its cluster (None before ``cluster`` ran)."""
    if limit is not None and limit < 0:
        raise SlmigrateError(f"--limit must be 0 or more, got {limit}")
    rows = [{f: getattr(rec, f) for f in LIST_FIELDS}
            for rec in ws.store.iter_calls(decode=False, limit=limit or None)]
    clusters = ws.store.clusters_of()
    for row in rows:
        row["cluster"] = clusters.get(row["id"])
    return rows


def show_call(ws: Workspace, call_id: str) -> dict[str, Any]:
    """One call in full (by slmigrate id or the input's own id)."""
    rec = ws.store.get_call(call_id)
    if rec is None:
        raise SlmigrateError(f"no call with id {call_id!r} in {ws.root}; `slmigrate calls list` shows the ids")
    out = rec.to_dict()
    out["cluster"] = ws.store.clusters_of([rec.id]).get(rec.id)
    return out


def to_openai(rec: CallRecord) -> dict[str, Any]:
    """The ``openai`` import format for one call (input_id written even when null, so the hash round-trips)."""
    return {
        "id": rec.id, "input_id": rec.input_id, "timestamp": _logged_timestamp(rec), "latency_ms": rec.latency_ms,
        "ttft_ms": rec.ttft_ms, "agent": rec.agent, "session": rec.session, "model": rec.model,
        "status": rec.status, "error": rec.error, "source": rec.source, "outcome": rec.outcome,
        "metadata": rec.metadata, "request": rec.request, "response": rec.response,
    }


def _logged_timestamp(rec: CallRecord) -> str | None:
    """The timestamp the log gave, or None when the store filled in the import time.

    An import hashes a call that had no timestamp without one; writing the filled-in import time would make a
    re-import of the export hash differently and come back as new calls.
    """
    if rec.timestamp is None or not rec.content_hash:
        return rec.timestamp
    untimed = CallRecord(request=rec.request, response=rec.response, input_id=rec.input_id, agent=rec.agent)
    return None if untimed.compute_hash() == rec.content_hash else rec.timestamp


def to_openai_ft(rec: CallRecord) -> dict[str, Any] | None:
    """Fine-tuning form: the prompt messages plus the answer, and the tools. None for failed calls."""
    answer = rec.answer
    if answer is None:
        return None
    out: dict[str, Any] = {"messages": [*rec.messages, answer]}
    if rec.tools:
        out["tools"] = rec.tools
    if "parallel_tool_calls" in rec.request:
        out["parallel_tool_calls"] = rec.request["parallel_tool_calls"]
    return out


@contextmanager
def _output(out: str | Path | None) -> Iterator[IO[str]]:
    if out is None or str(out) == "-":
        yield sys.stdout
        return
    path = Path(out)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(path, "w", encoding="utf-8")
    except OSError as exc:
        raise SlmigrateError(f"cannot write {path}: {exc.strerror}; pass --out with a writable path") from exc
    with fh:
        yield fh


def export_calls(ws: Workspace, format: str = "openai", out: str | Path | None = None) -> dict[str, int]:
    """Write every stored call as JSONL to ``out`` (stdout when None); returns {"written", "skipped"}."""
    if format not in EXPORT_FORMATS:
        raise SlmigrateError(f"unknown export format {format!r}; expected one of: {', '.join(EXPORT_FORMATS)}")
    convert = to_openai if format == "openai" else to_openai_ft
    written = skipped = 0
    with _output(out) as fh:
        for rec in ws.store.iter_calls():  # streamed in batches: exports of any size stay in flat memory
            obj = convert(rec)
            if obj is None:
                skipped += 1
                continue
            fh.write(json.dumps(obj, ensure_ascii=False) + "\n")
            written += 1
    return {"written": written, "skipped": skipped}
