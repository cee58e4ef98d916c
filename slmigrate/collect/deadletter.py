"""The dead-letter file: captured calls that could not be stored, kept instead of lost.

The background writer puts a call here when it cannot become a record (``to_record()`` raised, e.g. a request
nested deeper than Python's recursion limit) or when the store refuses that one call while storing others (see
``slmigrate.collect.writer``). One JSON line per call, appended to ``WORKSPACE/deadletter.jsonl``, created 0600:

    {"time": ..., "reason": why it was not stored, "source"/"agent"/"session"/... : the plain columns that could
     be read, "payload": the request and response (or the raw HTTP bodies when they could not be parsed)}

When an encryption key is configured the payload is sealed with the store's codec, as ``"payload_codec"`` and a
base64 ``"payload"``, so the file holds nothing in clear that the store would have encrypted; ``read()`` opens
either form.
"""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path
from typing import Any

from slmigrate.record import CallRecord, now_iso
from slmigrate.redact import redact_urls

FILE_NAME = "deadletter.jsonl"
_COLUMNS = ("id", "timestamp", "source", "agent", "session", "model", "status", "error", "latency_ms")


def entry(item: Any, reason: str, codec: Any) -> dict[str, Any]:
    """The dead-letter line for a queued item (a ``CallRecord`` or anything with ``dead_letter()``).

    ``codec`` seals the payload (None: no usable codec, so the payload is left out rather than written in clear).
    Never raises: a line with the reason is better than none.
    """
    line: dict[str, Any] = {"time": now_iso(), "reason": redact_urls(str(reason))[:2000]}
    try:
        columns, payload = _parts(item)
    except Exception as exc:  # noqa: BLE001 - an item too odd to describe still gets its line
        columns, payload = {"item": type(item).__name__}, None
        line["payload_error"] = f"could not read the call: {type(exc).__name__}"
    line.update({k: _plain(v) for k, v in columns.items() if v is not None})
    if payload is not None:
        line.update(_seal(payload, codec))
    return line


def append(path: Path, lines: list[dict[str, Any]]) -> None:
    """Append ``lines`` to the file, creating it readable by its owner only. Raises ``OSError``."""
    text = "".join(json.dumps(line, default=str) + "\n" for line in lines)  # ASCII: lone surrogates stay escaped
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        os.fchmod(fd, 0o600)  # also for a file someone created wider
        os.write(fd, text.encode("ascii"))
    finally:
        os.close(fd)


def read(path: Path) -> list[dict[str, Any]]:
    """Every line of a dead-letter file with its payload opened (needs the key when it was sealed)."""
    from slmigrate.store import codec_for

    out = []
    for raw in Path(path).read_text(encoding="ascii").splitlines():
        line = json.loads(raw)
        if "payload_codec" in line:
            sealed = base64.b64decode(line["payload"])
            line["payload"] = json.loads(codec_for(line.pop("payload_codec")).decode(sealed))
        out.append(line)
    return out


def record_parts(rec: CallRecord) -> tuple[dict[str, Any], dict[str, Any]]:
    return ({name: getattr(rec, name) for name in _COLUMNS},
            {"request": rec.request, "response": rec.response, "metadata": rec.metadata})


def _parts(item: Any) -> tuple[dict[str, Any], Any]:
    if isinstance(item, CallRecord):
        return record_parts(item)
    if hasattr(item, "dead_letter"):
        return item.dead_letter()
    return {"item": type(item).__name__}, {"repr": repr(item)[:100_000]}


def _seal(payload: Any, codec: Any) -> dict[str, Any]:
    try:
        # default=repr: a value the store could not take (a set, bytes) is kept as its text.
        text = json.dumps(payload, default=repr)
    except (RecursionError, ValueError, TypeError) as exc:
        return {"payload_error": f"the payload could not be written as JSON: {type(exc).__name__}"}
    if codec is None:
        return {"payload_error": "no usable payload codec (check the encryption key); payload left out"}
    from slmigrate.store import PLAIN_CODECS

    if codec.name in PLAIN_CODECS:
        return {"payload": json.loads(text)}
    return {"payload_codec": codec.name, "payload": base64.b64encode(codec.encode(text)).decode("ascii")}


def _plain(value: Any) -> Any:
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return repr(value)[:200]
