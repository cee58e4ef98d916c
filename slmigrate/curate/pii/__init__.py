"""PII, PHI and secret scrubbing for logged LLM calls (curate's privacy step).

- ``engine``: presidio + the offline spaCy model + slmigrate's recognisers, each distinct text analysed once.
- ``recognizers``: secrets, account ids, street addresses, JSON key rules.
- ``scrub``: consistent replacement of every found value throughout a session: messages, tool arguments and
  results, the answer, the request's user/metadata and the record's metadata.

``scrub_calls`` is the one-call entry point.
"""

from __future__ import annotations

from collections.abc import Iterable

from slmigrate.curate.pii.engine import (ALL_ENTITIES, DEFAULT_ENTITIES, OPTIONAL_ENTITIES, Found, TextAnalyzer,
                                  analyze_parallel, build_analyzer)
from slmigrate.curate.pii.scrub import SAFE_METADATA_KEYS, CallScrubber, replace_in_text, texts_of
from slmigrate.progress import Progress
from slmigrate.record import CallRecord

__all__ = ["ALL_ENTITIES", "DEFAULT_ENTITIES", "OPTIONAL_ENTITIES", "SAFE_METADATA_KEYS", "Found", "TextAnalyzer",
           "CallScrubber",
           "build_analyzer", "scrub_calls", "texts_of", "replace_in_text", "resolve_entities"]


def resolve_entities(entities: Iterable[str] | None) -> list[str]:
    """The entity list to scrub; ``None`` means the defaults. Unknown names are an error naming the known ones."""
    from slmigrate.errors import SlmigrateError

    if not entities:
        return list(DEFAULT_ENTITIES)
    wanted = [e.strip().upper() for item in entities for e in str(item).split(",") if e.strip()]
    if "DEFAULT" in wanted:
        wanted = [e for e in wanted if e != "DEFAULT"] + list(DEFAULT_ENTITIES)
    unknown = sorted(set(wanted) - set(ALL_ENTITIES))
    if unknown:
        raise SlmigrateError(f"unknown entity type(s) {', '.join(unknown)}; known: {', '.join(ALL_ENTITIES)} "
                             "(or DEFAULT for the default set)")
    return sorted(set(wanted))


def scrub_calls(
    calls: list[CallRecord], *, mode: str = "placeholder", entities: Iterable[str] | None = None,
    workers: int | None = None, seed: int = 0, allow: Iterable[str] = (), score_threshold: float = 0.4,
    analyzer: TextAnalyzer | None = None, progress: Progress | None = None,
    engine: str = "local", address: str | None = None, keep_metadata: Iterable[str] = (),
) -> tuple[list[CallRecord], list[dict[str, str]], TextAnalyzer | None]:
    """Scrub ``calls``; returns the scrubbed copies, per call the replacements made (replacement -> entity
    type; the original values are not returned) and the analyzer (its cache holds each distinct text's findings).

    ``progress(phase, done, total)`` is told about the analysis and replacement phases. ``workers``: see
    ``analyze_parallel`` (default: one per usable CPU core, at most 8). ``keep_metadata``: metadata keys whose
    scalar values stay as they are, besides ``SAFE_METADATA_KEYS``. Calls of one session get one replacement per
    value, so pass them in order; the analysis runs in parallel, the replacement in this process.
    """
    if mode == "off":
        return list(calls), [{} for _ in calls], None
    analyzer = analyzer or TextAnalyzer(resolve_entities(entities), score_threshold)
    keep = SAFE_METADATA_KEYS | frozenset(keep_metadata)
    distinct = list(dict.fromkeys(t for c in calls for t in texts_of(c, keep)))
    done = 0

    def tick(n: int) -> None:
        nonlocal done
        done += n
        if progress:
            progress("analyse", done, len(distinct))

    analyze_parallel(analyzer, distinct, workers, tick, engine=engine, address=address)
    # Structure seen anywhere in the batch vetoes loose matches everywhere (an item id quoted by the agent in a
    # call whose tool result is not in its history is still an item id) - unless a key rule named it PII.
    from slmigrate.curate.pii.engine import STRUCT

    keyed = {f.value for t in distinct for f in analyzer.cache.get(t, []) if f.source == "key"}
    structural = {f.value for t in distinct for f in analyzer.cache.get(t, []) if f.entity == STRUCT} - keyed
    import json

    tools_text = "\n".join(dict.fromkeys(
        json.dumps(c.request.get("tools") or c.request.get("functions") or [], ensure_ascii=False) for c in calls))
    scrubber = CallScrubber(analyzer, mode, seed, frozenset(allow), frozenset(structural), tools_text, keep)
    replaced: list[dict[str, str]] = []
    out = []
    for i, call in enumerate(calls):
        clean, mapping = scrubber.scrub(call)
        replaced.append({scrubber.last_mapping[v]: e for v, e in mapping.items()})
        out.append(clean)
        if progress and (i % 50 == 0 or i == len(calls) - 1):
            progress("replace", i + 1, len(calls))
    return out, replaced, analyzer
