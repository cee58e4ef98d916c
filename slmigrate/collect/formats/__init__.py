"""Log formats: how each kind of log file turns into canonical ``CallRecord``s.

A format is any object with a ``name``, a ``detect(first_objects) -> score`` and a
``convert(obj, ctx) -> list[CallRecord]``. The built-in formats register themselves through ``register`` exactly
as a third-party package would (directly, or through the ``slmigrate.collect.formats`` entry-point group), so adding a
format never means editing the importer.

``detect`` sees the first few parsed JSON values of a file and returns a score in [0, 1]; ``auto`` picks the
highest. ``convert`` raises ``FormatError`` for a record it cannot use: the importer reports it with file:line
and goes on with the rest.

``convert`` sees one record at a time and must keep no state between records: the batches of a big JSON Lines
file are converted in separate worker processes, each with its own ``ConvertContext``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from slmigrate.errors import SlmigrateError
from slmigrate.record import CallRecord


class FormatError(ValueError):
    """One record could not be converted; the message says why (it ends up in the import report)."""


@dataclass
class ConvertContext:
    """What a format may need besides the record itself."""

    file: str = ""
    line: int = 0
    agent: str | None = None  # --agent: tag for records that carry none
    tools: list[dict[str, Any]] | None = None  # --tools FILE, already in OpenAI form
    extra: dict[str, Any] = field(default_factory=dict)
    # Parts of a multi-call record (a span in an OTLP batch) that could not be used; the importer reports each
    # as a skipped record at this record's line, and keeps the record's other calls.
    problems: list[str] = field(default_factory=list)

    def skip(self, reason: str) -> None:
        self.problems.append(reason)


@runtime_checkable
class Format(Protocol):
    name: str
    description: str

    def detect(self, first_objects: list[Any]) -> float: ...

    def convert(self, obj: Any, ctx: ConvertContext) -> list[CallRecord]: ...


_REGISTRY: dict[str, Format] = {}
_ALIASES: dict[str, str] = {}
_loaded = False


def register(fmt: Format, *, aliases: tuple[str, ...] = ()) -> Format:
    """Make ``fmt`` available to ``collect import --format`` and to auto-detection. Later wins on a name clash."""
    if not isinstance(fmt, Format):
        raise TypeError(f"{fmt!r} is not a log format: it needs name, description, detect() and convert()")
    _REGISTRY[fmt.name] = fmt
    for alias in aliases:
        _ALIASES[alias] = fmt.name
    return fmt


def _ensure_loaded() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    # Built-ins first, then plug-ins, so a plug-in can deliberately replace a built-in.
    from slmigrate.collect.formats import anthropic, conversation, langfuse, openai, openai_ft, otel, toolbench  # noqa: F401

    from importlib.metadata import entry_points

    for ep in entry_points(group="slmigrate.formats"):
        obj = ep.load()
        register(obj() if isinstance(obj, type) else obj)


def names() -> list[str]:
    _ensure_loaded()
    return list(_REGISTRY)


def get(name: str) -> Format:
    _ensure_loaded()
    key = _ALIASES.get(name, name)
    if key not in _REGISTRY:
        raise SlmigrateError(
            f"unknown log format {name!r}; expected auto or one of: {', '.join(_REGISTRY)}"
        )
    return _REGISTRY[key]


def detect(first_objects: list[Any]) -> tuple[str | None, float, dict[str, float]]:
    """The best-scoring format for these sample values, its score, and every score (for error messages)."""
    _ensure_loaded()
    scores: dict[str, float] = {}
    for name, fmt in _REGISTRY.items():
        try:
            scores[name] = float(fmt.detect(first_objects))
        except Exception:  # a plug-in's detector must not break detection of everything else
            scores[name] = 0.0
    best = max(scores, key=lambda n: scores[n], default=None)
    if best is None or scores[best] <= 0:
        return None, 0.0, scores
    return best, scores[best], scores


__all__ = ["ConvertContext", "Format", "FormatError", "register", "get", "names", "detect"]
