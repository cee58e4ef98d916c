"""The canonical form of one logged LLM call (see ARCHITECTURE.md, "The call record").

Every source - the proxy, the SDK wrapper, every import format - converts into ``CallRecord``. The request is an
OpenAI chat-completions request (``messages``, ``tools``, sampling parameters) and the response an OpenAI
``chat.completion`` object; tool-call arguments stay JSON strings exactly as the model produced them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

try:  # several times faster than json for the large payloads hashed on every insert
    import orjson
except ImportError:  # pragma: no cover - orjson is a declared dependency
    orjson = None  # type: ignore[assignment]

_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
# The widest integer both stores hold (SQLite INTEGER, PostgreSQL BIGINT); a larger token count is nonsense.
MAX_COUNT = 2**63 - 1
TIMESTAMP_MISSING_KEY = "timestamp_missing"  # metadata flag: the log gave no time, the import time stands in
_SURROGATE = re.compile("[\ud800-\udfff]")

log = logging.getLogger("slmigrate.record")


class RecordError(ValueError):
    """A call that cannot become a storable record (the reason says why); callers skip or dead-letter it."""


def new_id(timestamp_ms: int | None = None, entropy: bytes | None = None) -> str:
    """A ULID: 48 bits of milliseconds then 80 bits of entropy, Crockford base32, so ids sort by time.

    Imports pass a content hash as ``entropy`` so the same call always gets the same id.
    """
    ms = int(time.time() * 1000) if timestamp_ms is None else int(timestamp_ms)
    rand = (entropy or os.urandom(10))[:10]
    value = (ms & ((1 << 48) - 1)) << 80 | int.from_bytes(rand.ljust(10, b"\0"), "big")
    return "".join(_CROCKFORD[(value >> (5 * i)) & 31] for i in reversed(range(26)))


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_timestamp(value: Any) -> str | None:
    """Normalise the timestamps found in logs (ISO strings, epoch seconds / ms / ns) to ISO-8601 UTC."""
    if value is None or value == "":
        return None
    if isinstance(value, (int, float)):
        seconds = float(value)
        if seconds > 1e17:  # nanoseconds (OTel)
            seconds /= 1e9
        elif seconds > 1e11:  # milliseconds
            seconds /= 1e3
        dt = datetime.fromtimestamp(seconds, tz=timezone.utc)
        return dt.isoformat(timespec="milliseconds").replace("+00:00", "Z")
    text = str(value).strip()
    if text.isdigit():
        return parse_timestamp(int(text))
    try:
        dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return text  # keep what the log said rather than lose it
    if dt.tzinfo is None:
        # Naive timestamps are taken as UTC: logs rarely carry a zone, and guessing local time would shift them.
        dt = dt.replace(tzinfo=timezone.utc)
    return dt.astimezone(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def timestamp_ms(iso: str | None) -> int | None:
    if not iso:
        return None
    try:
        return int(datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp() * 1000)
    except ValueError:
        return None


def canonical_bytes(obj: Any) -> bytes:
    """Sorted-key compact UTF-8 JSON, the input of content hashes."""
    if orjson is not None:
        try:
            return orjson.dumps(obj, option=orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS)
        except TypeError:  # e.g. integers beyond 64 bits: the standard library copes
            pass
    return json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def canonical_json(obj: Any) -> str:
    return canonical_bytes(obj).decode("utf-8")


@dataclass
class CallRecord:
    """One LLM call. ``request``/``response`` are OpenAI chat-completions shapes."""

    request: dict[str, Any]
    response: dict[str, Any] | None = None
    id: str = ""
    input_id: str | None = None
    timestamp: str | None = None
    latency_ms: float | None = None
    ttft_ms: float | None = None
    agent: str | None = None
    session: str | None = None
    model: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    status: str = "ok"  # ok | error
    error: str | None = None
    source: str = "import"  # proxy | sdk | router | import:FORMAT
    outcome: float | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    content_hash: str = ""

    def finalise(self) -> "CallRecord":
        """Fill the derived fields (model, usage, hash, id) from the payload and normalise every column to what
        the stores hold; idempotent. Raises ``RecordError`` for a call that cannot be stored at all."""
        if self.model is None:
            self.model = (self.response or {}).get("model") or self.request.get("model")
        usage = (self.response or {}).get("usage") or {}
        if not isinstance(usage, dict):
            usage = {}
        if self.prompt_tokens is None and usage.get("prompt_tokens") is not None:
            self.prompt_tokens = usage["prompt_tokens"]
        if self.completion_tokens is None and usage.get("completion_tokens") is not None:
            self.completion_tokens = usage["completion_tokens"]
        self.normalise()
        if self.prompt_tokens is None and self.completion_tokens is None and self.request.get("messages"):
            self._estimate_usage()
        if self.timestamp is None:
            # The id needs a time; the report must not mistake the import time for when the call happened.
            self.timestamp = now_iso()
            self.metadata[TIMESTAMP_MISSING_KEY] = True
        if not self.content_hash:
            try:
                self.content_hash = self.compute_hash()
            except UnicodeEncodeError:
                # A lone surrogate ("\ud800" in a JSON log) parses but cannot be encoded as UTF-8 anywhere.
                self.replace_surrogates()
                self.content_hash = self.compute_hash()
            except RecursionError:
                raise RecordError("the call is nested too deeply to store (more levels than Python's "
                                  f"recursion limit of {sys.getrecursionlimit()})") from None
        if not self.id:
            self.id = new_id(timestamp_ms(self.timestamp), bytes.fromhex(self.content_hash[:20]))
        return self

    def _estimate_usage(self) -> None:
        """A log without usage: count the tokens with the model's tokenizer, and say so (slmigrate.usage)."""
        from slmigrate import usage

        counted = usage.estimate(self.request, self.answer, self.model)
        if counted is not None:
            self.prompt_tokens, self.completion_tokens = counted
            self.metadata[usage.ESTIMATED_KEY] = usage.tokenizer_label(self.model)

    def normalise(self) -> list[str]:
        """Bring every column into the stores' types: a non-string model or id becomes its JSON text, a
        count outside 0..2**63-1 or a non-finite time is dropped. Returns what was changed (also logged as a
        warning): one odd value from a client or an upstream must never make the record unstorable."""
        changed: list[str] = []
        for name in ("model", "agent", "session", "input_id", "timestamp", "error", "source"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                setattr(self, name, _as_text(value))
                changed.append(f"{name} was a {type(value).__name__}, kept as its JSON text")
        numeric = ((("prompt_tokens", "completion_tokens"), _as_count, "is not a count in 0..2**63-1"),
                   (("latency_ms", "ttft_ms", "outcome"), _as_float, "is not a finite number"))
        for names, convert, problem in numeric:
            for name in names:
                value = getattr(self, name)
                if value is None:
                    continue
                fixed = convert(value)
                if fixed is None:
                    changed.append(f"{name} {_short(value)} {problem}; dropped")
                setattr(self, name, fixed)
        if not isinstance(self.metadata, dict):
            self.metadata = {"value": self.metadata}
            changed.append("metadata was not an object; kept under 'value'")
        if self.status not in ("ok", "error"):
            changed.append(f"status {_short(self.status)} is not ok/error; stored as error")
            self.status = "error"
        for note in changed:
            log.warning("call %s: %s", self.input_id or self.id or "(new)", note)
        return changed

    def replace_surrogates(self) -> None:
        """Replace lone UTF-16 surrogates (which no store can encode) with U+FFFD in every text of the call."""
        self.request = _replace_surrogates(self.request)
        self.response = _replace_surrogates(self.response)
        self.metadata = _replace_surrogates(self.metadata)
        for name in ("model", "agent", "session", "input_id", "timestamp", "error", "source"):
            setattr(self, name, _replace_surrogates(getattr(self, name)))
        log.warning("call %s: lone UTF-16 surrogates replaced by U+FFFD", self.input_id or "(new)")

    def compute_hash(self) -> str:
        # The same logged call imported twice must hash the same; two real calls with identical text at other
        # times must not (curate decides later whether they are duplicates worth dropping).
        key = canonical_bytes([self.input_id, self.timestamp, self.request, self.response, self.agent])
        return hashlib.sha256(key).hexdigest()

    # --- views used by several stages ---
    @property
    def messages(self) -> list[dict[str, Any]]:
        return list(self.request.get("messages") or [])

    @property
    def tools(self) -> list[dict[str, Any]]:
        return list(self.request.get("tools") or [])

    @property
    def answer(self) -> dict[str, Any] | None:
        """The assistant message of the first choice, or None when the call failed."""
        choices = (self.response or {}).get("choices") or []
        if not choices:
            return None
        return choices[0].get("message")

    @property
    def finish_reason(self) -> str | None:
        choices = (self.response or {}).get("choices") or []
        return choices[0].get("finish_reason") if choices else None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "CallRecord":
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})


def _as_text(value: Any) -> str:
    try:
        return json.dumps(value, ensure_ascii=False, sort_keys=True, default=str)
    except (TypeError, ValueError, RecursionError):
        return repr(value)[:1000]


def _as_count(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    try:
        count = int(value)
    except (TypeError, ValueError, OverflowError):
        return None
    if isinstance(value, float) and value != count:
        return None
    return count if 0 <= count <= MAX_COUNT else None


def _as_float(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        return None
    return number if math.isfinite(number) else None


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _replace_surrogates(node: Any) -> Any:
    if isinstance(node, str):
        return _SURROGATE.sub("\ufffd", node)
    if isinstance(node, dict):
        return {_replace_surrogates(k): _replace_surrogates(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_replace_surrogates(x) for x in node]
    return node


def tool_call_names(message: dict[str, Any] | None) -> list[str]:
    if not message:
        return []
    return [((tc.get("function") or {}).get("name") or "") for tc in (message.get("tool_calls") or [])]
