"""No train/serve skew on personal data: the small model is served requests scrubbed the way its training was.

``curate`` replaced names, e-mails, ids and secrets in the training calls (``[curate] pii``: consistent fakes in
``synthetic`` mode, ``<PERSON_1>`` in ``placeholder`` mode), so a specialist has only ever seen that space. The
router gets raw traffic. ``Pseudonymiser`` runs curate's own scrubber (``slmigrate.curate.pii.CallScrubber``, with
the mode, entities, seed, allow list and score threshold the workspace's curate stage recorded) over a request
bound for the small model and keeps, per request, which replacement stands for which original value; ``Restore``
maps the replacements in the model's answer back to the originals - in plain text, inside JSON strings (escaped as
JSON) and in tool-call arguments - before the answer is validated and returned. The small model never sees the
raw values; the agent never sees the fakes.

What differs from curate, by necessity: curate scrubs a whole batch at once and keeps one replacement per value
across a session, and values it saw as structure anywhere in the batch veto loose matches everywhere; here each
request is scrubbed on its own (it carries its session's history, so its replacements are consistent within it).
A value the model invents (a fake that no request value stands for) is left as it is.

The LLM paths (fallback, shadow reference, the live guard's check) and the router's call log keep the raw
request: logs are scrubbed when they are curated, not when they are written.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from slmigrate.record import CallRecord


@dataclass(frozen=True)
class Restore:
    """Replacement -> original value for one request; maps an answer of the small model back."""

    originals: dict[str, str] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.originals)

    def text(self, text: str, *, as_json: bool | None = None) -> str:
        """``text`` with every replacement back to its original; ``as_json`` (default: when ``text`` is a JSON
        object or array) writes the originals JSON-escaped, so the text stays the JSON it was, formatting and all."""
        if not self.originals or not text:
            return text
        if as_json is None:
            from slmigrate.curate.pii.engine import is_json_container

            as_json = is_json_container(text) is not None
        table = self._json_table() if as_json else self.originals
        return _regex(tuple(table)).sub(lambda m: table[m.group(0)], text)

    def _json_table(self) -> dict[str, str]:
        table: dict[str, str] = {}
        for fake, original in self.originals.items():
            escaped = json.dumps(original, ensure_ascii=False)[1:-1]
            # A fake as the model may have written it inside a JSON string: as is, or with \u escapes.
            for form in (json.dumps(fake, ensure_ascii=False)[1:-1], json.dumps(fake)[1:-1]):
                table.setdefault(form, escaped)
        return table

    def message(self, message: dict[str, Any]) -> dict[str, Any]:
        """An assistant message with its text fields and tool-call arguments mapped back (a new dict)."""
        if not self.originals:
            return message
        out = dict(message)
        for name in ("content", "reasoning_content", "reasoning", "refusal"):
            value = out.get(name)
            if isinstance(value, str):
                out[name] = self.text(value)
            elif isinstance(value, list):
                out[name] = [{**p, "text": self.text(p["text"])} if isinstance(p, dict)
                             and isinstance(p.get("text"), str) else p for p in value]
        if isinstance(out.get("tool_calls"), list):
            out["tool_calls"] = [self._call(tc) for tc in out["tool_calls"]]
        if isinstance(out.get("function_call"), dict):
            out["function_call"] = self._function(out["function_call"])
        return out

    def _call(self, call: Any) -> Any:
        if isinstance(call, dict) and isinstance(call.get("function"), dict):
            return {**call, "function": self._function(call["function"])}
        return call

    def _function(self, fn: dict[str, Any]) -> dict[str, Any]:
        args = fn.get("arguments")
        if isinstance(args, str):  # a JSON text, even when the model broke it (validation then says so)
            return {**fn, "arguments": self.text(args, as_json=True)}
        return fn


_REGEXES: dict[tuple[str, ...], re.Pattern[str]] = {}


def _regex(values: tuple[str, ...]) -> re.Pattern[str]:
    # curate's matching rule (longest first, never inside a longer word or id), compiled once per value set.
    from slmigrate.curate.pii.scrub import _pattern

    found = _REGEXES.get(values)
    if found is None:
        if len(_REGEXES) > 1024:
            _REGEXES.clear()
        found = _REGEXES[values] = _pattern(list(values))
    return found


class Pseudonymiser:
    """curate's scrubber, per request. Thread-safe (one analysis at a time: presidio and spaCy are not)."""

    def __init__(self, mode: str, *, entities: list[str] | None = None, seed: int = 0, allow: Iterable[str] = (),
                 score_threshold: float = 0.4, keep_metadata: Iterable[str] = (), analyzer: Any = None):
        from slmigrate.curate.pii import TextAnalyzer, resolve_entities

        if mode not in ("placeholder", "synthetic"):
            raise ValueError(f"pseudonymisation mode {mode!r}: placeholder or synthetic")
        self.mode = mode
        self.seed = seed
        self.allow = frozenset(allow)
        self.keep_metadata = tuple(keep_metadata)
        self.analyzer = analyzer or TextAnalyzer(resolve_entities(entities), score_threshold)
        self._lock = threading.Lock()

    @classmethod
    def for_workspace(cls, ws: Any) -> "Pseudonymiser | None":
        """The workspace's curate settings as its last curate run recorded them; None when curate did not scrub
        (``pii = "off"``) or never ran (no training data, nothing to match)."""
        if not ws.manifest("curate"):
            return None
        from slmigrate.config import workspace_config

        config = workspace_config(ws).curate
        if config.pii == "off":
            return None
        return cls(config.pii, entities=config.entities, seed=config.seed, allow=config.allow,
                   score_threshold=config.score_threshold, keep_metadata=config.keep_metadata)

    def warm(self) -> None:
        """Load presidio and spaCy now (seconds), not on the first request."""
        self.pseudonymise({"messages": [{"role": "user", "content": "Hello, this is Maria Lopez."}]})

    def pseudonymise(self, request: dict[str, Any], key: str | None = None) -> tuple[dict[str, Any], Restore]:
        """(the request as curate would have scrubbed it, the way back). ``key`` seeds the replacements (curate
        seeds them per session); by default the request's content, so the same request gets the same fakes."""
        from slmigrate.curate.pii import CallScrubber

        if key is None:
            key = hashlib.sha256(json.dumps(request.get("messages"), sort_keys=True, ensure_ascii=False,
                                            default=str).encode()).hexdigest()[:16]
        call = CallRecord(request=request, id=key, session=key)
        with self._lock:
            if len(self.analyzer.cache) > 20_000:  # a long-running router: each distinct text is analysed once
                self.analyzer.cache.clear()
            scrubber = CallScrubber(self.analyzer, self.mode, self.seed, self.allow, keep_metadata=self.keep_metadata)
            clean, _ = scrubber.scrub(call)
            mapping = scrubber.last_mapping
        originals: dict[str, str] = {}
        for value, replacement in mapping.items():
            originals.setdefault(replacement, value)
        return clean.request, Restore(originals)
