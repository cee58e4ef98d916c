"""Recall and precision of the scrubber per entity type on a labelled corpus (presidio-research's
``synth_dataset_v2.json`` format: ``full_text`` + ``spans[{entity_type, start_position, end_position}]``).

Each sentence goes through the same path as a logged call: one user message, the scrubber's findings for that
call, every occurrence of each found value marked with its type. A labelled span counts as found when a found
span of the matching type overlaps it; a found span is correct when it overlaps a labelled span of its type.

    python -m slmigrate.curate.pii.evaluate ../shared/data/presidio-research/synth_dataset_v2.json \
        [--limit N] [--every N] [--show-misses]

``--every 3`` evaluates every third sentence (a fixed subset for quick iteration); ``--show-misses`` prints each
missed label and each wrong replacement with its sentence to stderr.

    python -m slmigrate.curate.pii.evaluate ../shared/data/tau2-bench/tau2_gpt41_calls.openai.jsonl.gz --person-values

lists the PERSON values found in the distinct message texts of an OpenAI calls file (JSON Lines, gzip or not)
with their counts: agent-log text has no labels, so false persons there are counted by reading this list.
"""

from __future__ import annotations

import json
import re
import sys
from collections import Counter
from pathlib import Path
from typing import Any

# label in the corpus -> the type slmigrate reports for it
LABELS = {"PERSON": "PERSON", "EMAIL_ADDRESS": "EMAIL_ADDRESS", "PHONE_NUMBER": "PHONE_NUMBER",
          "CREDIT_CARD": "CREDIT_CARD", "IBAN_CODE": "IBAN_CODE", "IP_ADDRESS": "IP_ADDRESS", "US_SSN": "US_SSN",
          "STREET_ADDRESS": "STREET_ADDRESS", "US_DRIVER_LICENSE": "US_DRIVER_LICENSE"}


def _overlap(a: tuple[int, int], b: tuple[int, int]) -> bool:
    return a[0] < b[1] and b[0] < a[1]


def score(rows: list[dict[str, Any]], predicted: list[list[tuple[str, tuple[int, int]]]],
          show_misses: bool = False) -> dict[str, dict[str, Any]]:
    """Recall and precision per type from labelled ``rows`` and, per row, the found ``(type, (start, end))``.

    Recall: a labelled span is found when a found span of its type overlaps it. Precision: a found span is
    correct when it overlaps a labelled span of its type; found spans of types the corpus does not label are
    not counted (the corpus cannot say whether they are right)."""
    gold_n: Counter[str] = Counter()
    gold_hit: Counter[str] = Counter()
    pred_n: Counter[str] = Counter()
    pred_ok: Counter[str] = Counter()
    misses: dict[str, list[str]] = {}
    for row, found in zip(rows, predicted):
        text = row["full_text"]
        gold = [(LABELS[s["entity_type"]], (s["start_position"], s["end_position"]), s["entity_value"])
                for s in row["spans"] if s["entity_type"] in LABELS]
        for entity, span, value in gold:
            gold_n[entity] += 1
            if any(e == entity and _overlap(span, p) for e, p in found):
                gold_hit[entity] += 1
            else:
                misses.setdefault(entity, []).append(value)
                if show_misses:
                    print(f"MISS {entity} {value!r} in {text!r}", file=sys.stderr)
        for entity, span in found:
            if entity not in LABELS.values():
                continue
            pred_n[entity] += 1
            if any(e == entity and _overlap(span, g) for e, g, _ in gold):
                pred_ok[entity] += 1
            elif show_misses:
                print(f"FALSE {entity} {text[span[0]:span[1]]!r} in {text!r}", file=sys.stderr)
    return {entity: {
        "labelled": gold_n[entity], "found": gold_hit[entity],
        "recall": round(gold_hit[entity] / gold_n[entity], 3) if gold_n[entity] else None,
        "predicted": pred_n[entity],
        "precision": round(pred_ok[entity] / pred_n[entity], 3) if pred_n[entity] else None,
        "missed_examples": misses.get(entity, [])[:5],
    } for entity in sorted(set(LABELS.values()))}


def evaluate(path: str | Path, limit: int | None = None, analyzer: Any = None, every: int = 1,
             show_misses: bool = False) -> dict[str, Any]:
    from slmigrate.curate.pii import TextAnalyzer
    from slmigrate.curate.pii.scrub import CallScrubber
    from slmigrate.record import CallRecord

    rows = json.loads(Path(path).read_text())
    rows = rows[::every]  # a fixed subset (every Nth sentence) for quick iteration
    if limit:
        rows = rows[:limit]
    analyzer = analyzer or TextAnalyzer()
    analyzer.analyze_many([r["full_text"] for r in rows])
    scrubber = CallScrubber(analyzer)
    predicted = []
    for row in rows:
        text = row["full_text"]
        call = CallRecord(request={"messages": [{"role": "user", "content": text}]})
        # every occurrence of a found value is replaced, so every occurrence is a found span
        predicted.append([(entity, m.span()) for value, entity in scrubber.findings(call).items()
                          for m in re.finditer(re.escape(value), text)])
    return {"sentences": len(rows), "per_type": score(rows, predicted, show_misses)}


def message_texts(path: str | Path) -> list[str]:
    """Distinct message texts (system, user, assistant; requests and responses) of an OpenAI chat-completions
    calls file, one ``{request, response}`` object per line, gzip or not."""
    import gzip

    opener = gzip.open if str(path).endswith(".gz") else open
    texts: dict[str, None] = {}
    with opener(path, "rt", encoding="utf-8") as fh:
        for line in fh:
            if not line.strip():
                continue
            call = json.loads(line)
            messages = list(call.get("request", {}).get("messages", []))
            messages += [c.get("message", {}) for c in (call.get("response") or {}).get("choices", [])]
            texts.update((m["content"], None) for m in messages
                         if isinstance(m.get("content"), str) and m["content"].strip() and m.get("role") != "tool")
    return list(texts)


def person_values(path: str | Path, every: int = 1, analyzer: Any = None) -> dict[str, Any]:
    """Every PERSON value found in the message texts of a calls file, with how many texts it was found in: a
    list to read by eye for labels, headings and product names taken for people."""
    from slmigrate.curate.pii import TextAnalyzer

    texts = message_texts(path)[::every]
    analyzer = analyzer or TextAnalyzer()
    analyzer.analyze_many(texts)
    values = Counter(f.value for t in texts for f in analyzer.cache.get(t, []) if f.entity == "PERSON")
    return {"texts": len(texts), "person_findings": sum(values.values()), "values": values.most_common()}


def main(argv: list[str]) -> None:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return
    limit = int(argv[argv.index("--limit") + 1]) if "--limit" in argv else None
    every = int(argv[argv.index("--every") + 1]) if "--every" in argv else 1
    if "--person-values" in argv:
        result = person_values(argv[0], every)
    else:
        result = evaluate(argv[0], limit, every=every, show_misses="--show-misses" in argv)
    print(json.dumps(result, indent=1, ensure_ascii=False))


if __name__ == "__main__":
    main(sys.argv[1:])
