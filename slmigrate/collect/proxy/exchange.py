"""One captured HTTP exchange with a chat-completions endpoint, and its conversion into a ``CallRecord``.

The proxy and the SDK wrapper both capture at the HTTP level: the request body as sent and the response bytes
as received (with their arrival times, for time to first token). Turning that into a record - JSON parsing,
merging a stream, dropping origin identifiers - runs later on the writer thread, off the request path.

What is stored (see docs/security.md): the request body without the ``user`` / ``safety_identifier`` fields,
the merged response (or the upstream's error body), timing, HTTP status, the agent/session tags. Never stored:
any request header (so no ``Authorization``, cookies or API keys), the client's address, unless
``keep_origin`` is set, in which case the client address, the identity fields and the identity headers are kept
under ``metadata["origin"]``.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from slmigrate.record import CallRecord, RecordError, new_id
from slmigrate.collect.streaming import merge_timed_sse

# Request fields that identify the end user rather than the task.
IDENTITY_FIELDS = ("user", "safety_identifier")
# Request headers that identify a user or a device; kept only with keep_origin. Credentials are never kept.
IDENTITY_HEADERS = ("user-agent", "x-forwarded-for", "x-real-ip", "forwarded", "x-user-id", "x-user",
                    "openai-organization", "openai-project", "x-client-id")


@dataclass
class Exchange:
    request_body: bytes
    started_wall: float  # epoch seconds when the request arrived
    source: str = "proxy"
    path: str = "/v1/chat/completions"
    agent: str | None = None
    session: str | None = None
    status_code: int | None = None  # None until the upstream answered
    content_type: str = ""
    pieces: list[tuple[float, bytes]] = field(default_factory=list)  # (seconds since start, raw bytes)
    elapsed: float | None = None  # seconds from request to the end of the response
    transport_error: str | None = None  # connection refused, timeout, stream cut...
    keep_origin: bool = False
    client_ip: str | None = None
    origin_headers: dict[str, str] = field(default_factory=dict)
    route: dict[str, str] = field(default_factory=dict)  # set by the router: who answered and why

    def to_record(self) -> CallRecord | None:
        """The stored form of this exchange. A 2xx answer that is not a chat completion (malformed JSON, an HTML
        page, a stream with garbage events) is stored with ``status="error"`` and why, so curation never trains on
        it. Raises ``RecordError`` for an exchange that cannot be stored at all (the writer dead-letters it)."""
        try:
            request = json.loads(self.request_body or b"{}")
        except (json.JSONDecodeError, UnicodeDecodeError):
            request = {"_unparsed_body": self.request_body.decode("utf-8", errors="replace")}
        except RecursionError:
            raise RecordError(f"the request body is nested deeper than Python's recursion limit "
                              f"({sys.getrecursionlimit()}); it was forwarded but cannot be stored") from None
        if not isinstance(request, dict):
            request = {"_unparsed_body": request}
        metadata: dict[str, Any] = {"path": self.path, "http_status": self.status_code,
                                    "stream": bool(request.get("stream"))}
        if self.route:
            metadata["route"] = self.route
        origin = {key: request.pop(key) for key in IDENTITY_FIELDS if key in request}
        if self.keep_origin:
            for key, value in origin.items():
                request[key] = value
            kept = {"client_ip": self.client_ip, **origin,
                    "headers": {k: v for k, v in self.origin_headers.items() if k in IDENTITY_HEADERS}}
            metadata["origin"] = {k: v for k, v in kept.items() if v}

        response, ttft, problem = self._answer()
        status, error = ("error", problem) if problem else ("ok", None)
        if self.status_code is not None and self.status_code >= 400:
            # The message can echo the prompt, so only the error type goes in the (plain) error column; the
            # whole error body is kept as the response, which is encrypted with the payloads.
            status, error = "error", f"HTTP {self.status_code}: {_error_kind(response)}"
        if self.transport_error:
            status, error = "error", self.transport_error
        rec = CallRecord(
            request=request, response=response,
            input_id=(response or {}).get("id") if status == "ok" else None,
            timestamp=_iso(self.started_wall),
            latency_ms=None if self.elapsed is None else round(self.elapsed * 1000, 3),
            ttft_ms=ttft, agent=self.agent, session=self.session, status=status, error=error,
            source=self.source, metadata=metadata,
        )
        return live_identity(rec, self.started_wall)

    def _answer(self) -> tuple[dict[str, Any] | None, float | None, str | None]:
        """(response to store, time to first token, why it is not a valid chat completion or None)."""
        body = b"".join(piece for _, piece in self.pieces)
        if self.status_code is None:  # the upstream never answered; the transport error says why
            return None, None, None
        answered = self.status_code < 400
        if answered and "text/event-stream" in self.content_type:
            try:
                merged, ttft, stream_error = merge_timed_sse(self.pieces)
            except Exception as exc:  # noqa: BLE001 - a stream too odd to merge is a failed call, not a lost one
                merged, ttft, stream_error = {}, None, f"unmergeable ({type(exc).__name__})"
            if stream_error:
                return merged, ttft, f"stream error: {stream_error}"
            if merged.get("choices"):
                return merged, ttft, None
            return _unparsed(body), ttft, "the stream carried no chat.completion.chunk events"
        try:
            response = json.loads(body) if body else None
        except (json.JSONDecodeError, UnicodeDecodeError):
            kind = self.content_type.split(";")[0].strip() or "no content type"
            return _unparsed(body), None, f"HTTP {self.status_code} answer is not JSON ({kind})" if answered else None
        except RecursionError:
            raise RecordError(f"the upstream's answer is nested deeper than Python's recursion limit "
                              f"({sys.getrecursionlimit()}); it was relayed but cannot be stored") from None
        problem = completion_problem(response) if answered else None
        if not isinstance(response, dict):
            response = None if response is None else {"_unparsed_body": response}
        return response, None, None if problem is None else f"HTTP {self.status_code} answer {problem}"

    def dead_letter(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """What the dead-letter file keeps of an exchange that could not become a record: the plain facts and the
        raw request and response bodies (identity fields included: they could not be parsed out)."""
        columns = {"source": self.source, "agent": self.agent, "session": self.session, "path": self.path,
                   "timestamp": _iso(self.started_wall), "http_status": self.status_code,
                   "latency_ms": None if self.elapsed is None else round(self.elapsed * 1000, 3),
                   "error": self.transport_error}
        body = b"".join(piece for _, piece in self.pieces)
        return columns, {"request_body": self.request_body.decode("utf-8", errors="replace"),
                         "response_body": body.decode("utf-8", errors="replace"),
                         "content_type": self.content_type}


@dataclass
class LiveCall:
    """A call built on the request path (the router's SLM answers) whose hashing and normalising wait for the
    writer thread, like an ``Exchange``'s parsing: a call that cannot be stored never fails the request."""

    record: CallRecord
    started_wall: float

    def to_record(self) -> CallRecord:
        return live_identity(self.record, self.started_wall)

    def dead_letter(self) -> tuple[dict[str, Any], dict[str, Any]]:
        from slmigrate.collect.deadletter import record_parts

        return record_parts(self.record)


def completion_problem(body: Any) -> str | None:
    """Why a 2xx answer is not a chat completion (None when it is), phrased to follow "answer ...". Only shapes and
    types are named, never content: the reason goes in the plain ``error`` column."""
    if body is None:
        return "is empty"
    if not isinstance(body, dict):
        return f"is a JSON {_JSON_TYPES.get(type(body), type(body).__name__)}, not a chat completion object"
    if body.get("error"):
        return f"carries an error ({_error_kind(body)})"
    choices = body.get("choices")
    if not isinstance(choices, list) or not choices:
        return "has no choices"
    if not all(isinstance(c, dict) and isinstance(c.get("message"), dict) for c in choices):
        return "has a choice without a message object"
    return None


_JSON_TYPES = {list: "array", str: "string", int: "number", float: "number", bool: "boolean"}


def _unparsed(body: bytes) -> dict[str, Any] | None:
    return {"_unparsed_body": body.decode("utf-8", errors="replace")} if body else None


def live_identity(rec: CallRecord, started_wall: float) -> CallRecord:
    """Give a live-captured call a unique id and hash.

    The content hash dedupes re-imports of the same log; two live calls with identical text in the same
    millisecond are still two calls, so the random id is part of the hash here.
    """
    rec.id = new_id(int(started_wall * 1000))
    rec.finalise()
    rec.content_hash = hashlib.sha256((rec.id + rec.compute_hash()).encode()).hexdigest()
    return rec


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, tz=timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _error_kind(body: Any) -> str:
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        return str(error.get("code") or error.get("type") or "error")
    if isinstance(error, str):
        return "error"
    return "error"


def now() -> tuple[float, float]:
    """(wall clock, monotonic) at the start of an exchange."""
    return time.time(), time.perf_counter()
