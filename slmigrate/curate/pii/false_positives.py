"""Title-case words that spaCy's small model takes for people but are labels, headings or everyday words.

spaCy tags most capitalised runs as PERSON, and agent logs are full of them: markdown field labels
(``**Flight Date:** 2024-05-28``), headings, table headers, UI and product words (``Airplane Mode``,
``Water Bottle``). A replaced label damages the training text and every other occurrence of it in the call.

Two signals, each robust on its own:

- **Position**: the span is a field label (text before a ``:`` at the start of a line, markdown list markers and
  ``**bold**`` allowed around it), a heading (``# ...`` or a line underlined with ``===``/``---``), a table header
  row (the row above a ``|---|`` separator) or bold text. Those are labels unless one of their words is a listed
  first name ("**John Smith:** hi", a speaker, stays a name).
- **Vocabulary**: every word of the span is an everyday English word (the spaCy model's own WordNet lemma index)
  that no name list has, or a UI/domain word below. Words that are also names somewhere ("Hope", "Grant",
  "Smith", "Davis") keep the span a name.
"""

from __future__ import annotations

import functools
import re

from slmigrate.curate.pii.recognizers import SPACY_MODEL, common_words, faker_names, person_names

# UI, form and shop words that some locale's name list also holds ("date", "mode", "card") but that in agent
# logs are nearly always words. Only words that are rare as people's names belong here.
UI_WORDS = frozenset({
    "date", "mode", "card", "gift", "status", "service", "support", "customer", "user", "agent", "assistant",
    "system", "tool", "policy", "order", "orders", "payment", "method", "account", "booking", "reservation",
    "flight", "flights", "passenger", "passengers", "cabin", "class", "economy", "business", "basic", "premium",
    "plan", "data", "mobile", "network", "line", "call", "test", "wifi", "sim", "air", "airplane", "bottle",
    "kettle", "lamp", "mouse", "puzzle", "watch", "speaker", "mat", "set", "kit", "shoes", "boots", "hose", "chair",
    "grill", "domain", "details", "summary", "total", "number", "name", "address", "email", "phone", "birth",
    "arrival", "departure", "return", "origin", "destination", "baggage", "bag", "bags", "checked", "insurance",
    "refund", "cancel", "cancellation", "upgrade", "membership", "item", "items", "product", "amount",
    "size", "color", "colour", "small", "medium", "large", "new", "current", "original", "type", "id", "code",
    "settings", "setting", "signal", "roaming", "battery", "device", "app", "apps", "screen", "button", "menu",
    "option", "options", "step", "steps", "note", "notes", "info", "information", "contact", "help", "request",
})

# A field label: optional quote / list marker / bold, the label, optional closing bold, a colon, then a blank or
# the line end ("- **New Flight Date:** May 24", "Payment Method: card", "**Passengers**: ...").
_LABEL = re.compile(r"^[ \t>]*(?:(?:[-*+•]|\d{1,3}[.)])[ \t]+)?(?:\*\*|__|\*|_)?(?P<label>[^:\n*_|.!?,;]{1,60}?)"
                    r"(?:\*\*|__|\*|_)?[ \t]*:(?:\*\*|__|\*|_)?(?=[ \t]|$)")
_TABLE_RULE = re.compile(r"^[ \t]*\|?[ \t]*:?-{3,}:?[ \t]*(?:\|[ \t]*:?-{3,}:?[ \t]*)*\|?[ \t]*$")
_SETEXT_RULE = re.compile(r"^[ \t]*(?:=+|-+)[ \t]*$")
_BOLD = re.compile(r"\*\*[^*\n]+\*\*|__[^_\n]+__")
# Words that close a company's or a band's name: a name before them ("Russell Investments", "Smith Ltd.", "The
# Clark, Romero and Hall Orchestra", "Thomas and Sons") names the organisation, not a person.
ORG_WORDS = frozenset({
    "inc", "incorporated", "corporation", "corp", "ltd", "llc", "llp", "plc", "gmbh", "ag", "sa", "co", "company",
    "group", "holdings", "investments", "partners", "associates", "sons", "brothers", "orchestra", "foundation",
    "research", "bank", "university", "institute", "agency", "labs", "technologies", "solutions", "enterprises",
})
_ORG_AFTER = re.compile(r"(?:(?:,|,?[ \t]+(?:and|&))[ \t]+[A-Z][\w'’\-]*)*[ \t]+(?P<org>[A-Z][A-Za-z]*)\b")
_WORDS = re.compile(r"[^\W\d_]+(?:['’][^\W\d_]+)?")


@functools.lru_cache(maxsize=1)
def english_words() -> frozenset[str]:
    """Lower-case English nouns, verbs, adjectives and adverbs: the lemma index (from WordNet) that ships with
    the spaCy model, read from disk so no pipeline has to be loaded. Empty when the model is not installed."""
    from pathlib import Path

    import spacy.util
    from spacy.lookups import Lookups


    try:
        folder = next(Path(spacy.util.get_package_path(SPACY_MODEL)).glob("*/lemmatizer/lookups"))
    except (ImportError, OSError, StopIteration):
        return frozenset()
    index = Lookups().from_disk(folder).get_table("lemma_index")
    return frozenset(w for words in index.values() for w in words if w.isalpha())


@functools.lru_cache(maxsize=1)
def first_names() -> frozenset[str]:
    """Lower-case first names of the locales the name gazetteer uses, less names that are common words."""
    names = faker_names(("first_names", "first_names_male", "first_names_female"))
    return frozenset(names - common_words() - UI_WORDS)


def _lemma_forms(word: str) -> tuple[str, ...]:
    """The word and the singulars it may be the plural of (the lemma index holds base forms only)."""
    forms = [word]
    if word.endswith("ies"):
        forms.append(word[:-3] + "y")
    if word.endswith("es"):
        forms.append(word[:-2])
    if word.endswith("s"):
        forms.append(word[:-1])
    return tuple(forms)


def is_everyday_word(word: str) -> bool:
    """An English word that no name list holds, or a UI/domain word; ``word`` in lower case."""
    if word in UI_WORDS:
        return True
    if word in person_names() or word in common_words():
        return False
    vocabulary = english_words()
    return any(form in vocabulary for form in _lemma_forms(word))


def _words(value: str) -> list[str]:
    return [w.lower() for w in _WORDS.findall(value)]


def all_everyday_words(value: str) -> bool:
    """Every word of ``value`` is an everyday word ("Water Bottle", "Airplane Mode"); stop words count as words
    but do not suffice alone. A single word must be a UI word: the lemma index also holds words that are given
    names too rare for the name lists ("Belle")."""
    from spacy.lang.en.stop_words import STOP_WORDS

    content = [w for w in _words(value) if w not in STOP_WORDS]
    if len(content) == 1:
        return content[0] in UI_WORDS
    return bool(content) and all(is_everyday_word(w) for w in content)


def looks_like_name(value: str) -> bool:
    """A listed first name, or a listed surname that is no English word ("Kovacs", "Hernandez")."""
    vocabulary = english_words()
    return any(w in first_names() or (w in person_names() and w not in vocabulary) for w in _words(value))


def is_full_name(value: str) -> bool:
    """Two to four words, each a listed first or last name ("Zoë Kraus", "Anna Smith"): a person even where the
    context says structure. One ordinary word makes it a thing ("Sierra Hammock", "Jordan Sneakers")."""
    words = _words(value)
    return 2 <= len(words) <= 4 and all(w in first_names() or w in person_names() for w in words)


def _line(text: str, start: int) -> tuple[int, int]:
    line_start = text.rfind("\n", 0, start) + 1
    line_end = text.find("\n", start)
    return line_start, len(text) if line_end < 0 else line_end


def _next_line(text: str, line_end: int) -> str:
    if line_end >= len(text):
        return ""
    return text[line_end + 1:_line(text, line_end + 1)[1]]


def _is_label(words: str) -> bool:
    """A few words, in title case unless very few ("Date of Birth", "Payment method"); a longer text before a
    colon is a sentence ("Mehrudin shouted at Todd: ...", "Scott had given Belle his address: ...")."""
    from spacy.lang.en.stop_words import STOP_WORDS

    tokens = words.split()
    return len(tokens) <= 3 or (len(tokens) <= 6 and all(t[0].isupper() for t in tokens if t not in STOP_WORDS))


def in_label_position(text: str, start: int, end: int) -> bool:
    """The span [start, end) lies in a field label, a heading, a table header row or bold text."""
    line_start, line_end = _line(text, start)
    line = text[line_start:line_end]
    s, e = start - line_start, min(end, line_end) - line_start
    label = _LABEL.match(line)
    if label and label.start("label") <= s < label.end("label") and _is_label(label.group("label")):
        return True
    if line.lstrip().startswith("#"):
        return True
    below = _next_line(text, line_end)
    if line.strip() and (_SETEXT_RULE.match(below) and not line.lstrip().startswith("|")):
        return True
    if line.lstrip().startswith("|") and _TABLE_RULE.match(below):
        return True
    return any(b.start() <= s and e <= b.end() for b in _BOLD.finditer(line))


def names_organisation(text: str, start: int, end: int) -> bool:
    """The span ends with an organisation word or is followed by one, perhaps after more listed names."""
    words = _words(text[start:end])
    if words and words[-1] in ORG_WORDS:
        return True
    after = _ORG_AFTER.match(text, end)
    return bool(after) and after.group("org").lower() in ORG_WORDS


def not_a_person(text: str, start: int, end: int) -> bool:
    """True when a PERSON span [start, end) of ``text`` is a label, heading or everyday phrase, not a name."""
    value = text[start:end]
    if in_label_position(text, start, end) and not looks_like_name(value):
        return True
    return all_everyday_words(value) or names_organisation(text, start, end)
