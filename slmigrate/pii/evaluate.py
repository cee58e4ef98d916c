"""Recall and precision of the scrubber per entity type on a labelled corpus (presidio-research's
``synth_dataset_v2.json`` format: ``full_text`` + ``spans[{entity_type, start_position, end_position}]``).

Each sentence goes through the same path as a logged call: one user message, the scrubber's findings for that
call, every occurrence of each found value marked with its type. A labelled span counts as found when a found
span of the matching type overlaps it; a found span is correct when it overlaps a labelled span of its type.

    python -m slmigrate.pii.evaluate ../shared/data/presidio-research/synth_dataset_v2.json [--limit N] [--every N]
        [--show-misses]

``--every 3`` evaluates every third sentence (a fixed subset for quick iteration); ``--show-misses`` prints each
missed label and each wrong replacement with its sentence to stderr.
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


def evaluate(path: str | Path, limit: int | None = None, analyzer: Any = None, every: int = 1,
             show_misses: bool = False) -> dict[str, Any]:
    from slmigrate.pii import TextAnalyzer
    from slmigrate.pii.scrub import CallScrubber
    from slmigrate.record import CallRecord

    rows = json.loads(Path(path).read_text())
    rows = rows[::every]  # a fixed subset (every Nth sentence) for quick iteration
    if limit:
        rows = rows[:limit]
    analyzer = analyzer or TextAnalyzer()
    analyzer.analyze_many([r["full_text"] for r in rows])
    scrubber = CallScrubber(analyzer)
    gold_n: Counter[str] = Counter()
    gold_hit: Counter[str] = Counter()
    pred_n: Counter[str] = Counter()
    pred_ok: Counter[str] = Counter()
    misses: dict[str, list[str]] = {}
    for row in rows:
        text = row["full_text"]
        call = CallRecord(request={"messages": [{"role": "user", "content": text}]})
        predicted: list[tuple[str, tuple[int, int]]] = []
        for value, entity in scrubber.findings(call).items():
            for m in re.finditer(re.escape(value), text):
                predicted.append((entity, m.span()))
        gold = [(LABELS[s["entity_type"]], (s["start_position"], s["end_position"]), s["entity_value"])
                for s in row["spans"] if s["entity_type"] in LABELS]
        for entity, span, value in gold:
            gold_n[entity] += 1
            if any(e == entity and _overlap(span, p) for e, p in predicted):
                gold_hit[entity] += 1
            else:
                misses.setdefault(entity, []).append(value)
                if show_misses:
                    print(f"MISS {entity} {value!r} in {text!r}", file=sys.stderr)
        for entity, span in predicted:
            if entity not in LABELS.values():
                continue
            pred_n[entity] += 1
            if any(e == entity and _overlap(span, g) for e, g, _ in gold):
                pred_ok[entity] += 1
            elif show_misses:
                print(f"FALSE {entity} {text[span[0]:span[1]]!r} in {text!r}", file=sys.stderr)
    per_type = {}
    for entity in sorted(set(LABELS.values())):
        per_type[entity] = {
            "labelled": gold_n[entity], "found": gold_hit[entity],
            "recall": round(gold_hit[entity] / gold_n[entity], 3) if gold_n[entity] else None,
            "predicted": pred_n[entity],
            "precision": round(pred_ok[entity] / pred_n[entity], 3) if pred_n[entity] else None,
            "missed_examples": misses.get(entity, [])[:5],
        }
    return {"sentences": len(rows), "per_type": per_type}


def main(argv: list[str]) -> None:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return
    limit = int(argv[argv.index("--limit") + 1]) if "--limit" in argv else None
    every = int(argv[argv.index("--every") + 1]) if "--every" in argv else 1
    print(json.dumps(evaluate(argv[0], limit, every=every, show_misses="--show-misses" in argv), indent=1,
                     ensure_ascii=False))


if __name__ == "__main__":
    main(sys.argv[1:])
