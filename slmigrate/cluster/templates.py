"""Instruction templates: the fixed text an agent sends with every call of one task, variable parts masked.

Agents build each call's instructions from a template - a system prompt, or (MetaGPT, ReAct prompts, many
home-grown agents) the first user message - with variable fields filled in: ids, numbers, quoted user data, code,
names, free text. Calls made from one template do one job; calls from two templates do two, however alike their
words look to an embedding. So the cluster stage first forms tasks from the template (with the tool set), and
the embedding only refines inside a template.

How a call's template is found, over the distinct instruction texts of the log:

1. **Mask** what varies by nature: fenced code blocks, PII placeholders (``<PERSON_1>``, ``<EMAIL_ADDRESS>``),
   e-mails, URLs, file names, numbers, hex ids, long quoted strings; then split into lines.
2. **Line frequency**: in how many distinct instruction texts each masked line occurs (``df``).
3. **Cut** each text's lines at its largest drop in ``df`` (the biggest ratio between consecutive distinct ``df``
   values, the upper one at least ``min_size``): the lines above are the template, the rest are variable slots
   (a scenario, a requirement, a project name drawn from a small pool still sits well below the lines every
   instance carries). A text whose lines all share one ``df``, or whose lines never recur ``min_size`` times,
   is its own template.
4. A line holding a PII placeholder or a mask is never template: scrubbing turns names into the same
   ``<PERSON>`` everywhere, which must neither create a template nor merge two.
5. **Nested templates merge**: a text whose template lines include all of another template's (a ReAct prompt
   whose scratchpad repeats an ``Action: search`` line, a prompt with an optional paragraph) joins the largest
   template it contains.

Each template is named from its own words: its first line that no other template has, with its heading.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

_CODE = re.compile(r"```.*?(```|$)", re.DOTALL)
_PLACEHOLDER = re.compile(r"<[A-Z][A-Z_]*(?:_\d+)?>")
_EMAIL = re.compile(r"\b[\w.+-]+@[\w-]+\.[\w.-]+\b")
_URL = re.compile(r"\bhttps?://\S+")
_FILE = re.compile(r"\b[\w-]+\.(?:py|js|ts|java|go|rs|c|cpp|h|md|txt|json|yaml|yml|csv|html|sql|sh|toml)\b")
_QUOTED = re.compile(r"\"[^\"\n]{25,}\"|'[^'\n]{25,}'")  # long quoted data; short ones ("airline") are kept
_HEX = re.compile(r"\b(?=[0-9a-f]*\d)[0-9a-f]{8,}\b", re.IGNORECASE)
_NUMBER = re.compile(r"\d+(?:[.,:]\d+)*")
_SPACE = re.compile(r"[ \t]+")
MASKS = ("<code>", "<pii>", "<email>", "<url>", "<file>", "<str>")
LEVEL = 0.1  # a template line recurs in at least this share of the texts its typical line is in
MAX_LINES = 400  # lines of one instruction text considered (a longer text's tail is not template-defining here)
_WORD = re.compile(r"[A-Za-z][A-Za-z'-]+")


def mask_lines(text: str) -> list[str]:
    """The text's masked, stripped, non-empty lines (at most ``MAX_LINES``)."""
    text = _CODE.sub("<code>", text)
    text = _PLACEHOLDER.sub("<pii>", text)
    text = _EMAIL.sub("<email>", text)
    text = _URL.sub("<url>", text)
    text = _FILE.sub("<file>", text)
    text = _QUOTED.sub('"<str>"', text)
    text = _HEX.sub("0", text)
    text = _NUMBER.sub("0", text)
    lines = []
    for line in text.splitlines():
        line = _SPACE.sub(" ", line).strip()
        if line:
            lines.append(line)
        if len(lines) >= MAX_LINES:
            break
    return lines


def _variable(line: str) -> bool:
    """Lines that carry data (a PII placeholder or a masked value) or say nothing (punctuation, one mask)."""
    return any(m in line for m in MASKS) or not _WORD.search(line)


@dataclass
class Template:
    id: int
    lines: tuple[str, ...]  # the template's own lines, in text order (the first: its tool list's id)
    name: str = ""
    texts: list[int] = field(default_factory=list)  # instruction-text ids using it

    @property
    def residual(self) -> bool:
        """Not a template: no instruction text, or a user message used whole (clustered by embedding alone)."""
        return len(self.lines) < 2 or self.lines[0] == "\x00own"


class TemplateMiner:
    """Collects the distinct instruction texts of a log (``add``), then finds their templates (``fit``)."""

    def __init__(self) -> None:
        self._ids: dict[tuple[int, int], int] = {}  # (instruction digest, tool list) -> text id
        self.tools: list[int] = []  # per text id: its tool list's id
        self.lines: list[tuple[str, ...]] = []  # per text id: its masked lines (deduplicated, in order)
        self.from_user: list[bool] = []  # per text id: taken from the leading user message (no system prompt)

    def add(self, digest: int, tools: int, text_fn) -> int:
        """The id of the instruction text with ``digest`` offered with tool list ``tools``; ``text_fn()`` gives
        (its raw text, whether it is user content rather than a system prompt) the first time."""
        found = self._ids.get((digest, tools))
        if found is None:
            found = self._ids[(digest, tools)] = len(self.lines)
            self.tools.append(tools)
            text, from_user = text_fn()
            self.lines.append(tuple(dict.fromkeys(mask_lines(text))))
            self.from_user.append(bool(from_user))
        return found

    def fit(self, min_size: int) -> tuple[list[int], list[Template]]:
        """Per text id its template id, and the templates (numbered by first text)."""
        df = Counter(line for lines in self.lines for line in lines)
        keys: list[tuple[str, ...]] = []
        for text_id, lines in enumerate(self.lines):
            key = self._cut(lines, df, min_size)
            # A user message used whole (no recurring lines cut from slots) is a conversation's opening, not a
            # template: a chat log's every conversation would otherwise be a task. Marked by a private prefix.
            if key is None:
                key = (("\x00own", str(text_id)) if self.from_user[text_id] else
                       tuple(ln for ln in lines if not _variable(ln)))
            # The tool list is part of the key (as "\x01<id>", never a masked line), so templates offered with
            # different tools never merge below.
            keys.append((f"\x01{self.tools[text_id]}",) + key if key and key[0] != "\x00own" else key)
        # Nested templates merge into the largest template they contain (fewest extra lines), deterministically.
        distinct = sorted(set(keys), key=lambda k: (len(k), k))
        as_set = {k: frozenset(k) for k in distinct}
        parent: dict[tuple[str, ...], tuple[str, ...]] = {}
        for k in distinct:
            # B joins A when B = A + lines that recur elsewhere too (slot values from a pool, such as a ReAct
            # scratchpad's "Action: search"); a prompt that adds a paragraph of its own stays apart.
            inside = [a for a in distinct if a != k and len(a) > 1 and len(k) > 1 and a[0] == k[0]
                      and as_set[a] < as_set[k] and min(df[ln] for ln in as_set[k] - as_set[a]) >= min_size]
            parent[k] = max(inside, key=lambda a: (len(a), a)) if inside else k

        def root(k):
            while parent[k] != k:
                k = parent[k]
            return k

        templates: dict[tuple[str, ...], Template] = {}
        text_template = []
        for text_id, k in enumerate(keys):
            r = root(k)
            if r not in templates:
                templates[r] = Template(len(templates), r)
            templates[r].texts.append(text_id)
            text_template.append(templates[r].id)
        ordered = list(templates.values())
        _name(ordered, self.lines)
        return text_template, ordered

    @staticmethod
    def _cut(lines: tuple[str, ...], df: Counter, min_size: int) -> tuple[str, ...] | None:
        """The template lines of one text, or None when the text has none (it is used whole).

        A line is the template's when it recurs in at least ``min_size`` distinct texts and in at least
        ``LEVEL`` times as many as the text's typical line (the char-weighted median): a slot whose values
        come from a small pool (an error message, a project name) recurs, but in a fraction of the template's
        texts. The template must be at least half the text's characters; else the text is used whole."""
        fixed = [ln for ln in lines if not _variable(ln)]
        if not fixed:
            return ()
        by_df = sorted(fixed, key=lambda ln: df[ln])
        total = sum(len(ln) for ln in fixed)
        seen, typical = 0, df[by_df[-1]]
        for ln in by_df:
            seen += len(ln)
            if seen >= total / 2:
                typical = df[ln]
                break
        level = max(min_size, LEVEL * typical)
        kept = tuple(ln for ln in fixed if df[ln] >= level)
        return kept if sum(len(ln) for ln in kept) >= 0.5 * total else None


_INSTRUCTION = re.compile(r"\byou are\b|\brole\b|\byour (?:task|goal|job)\b|^(?:please |now )?(?:write|translate|"
                          r"summari[sz]e|classify|extract|generate|answer|review|rewrite|decide|determine|"
                          r"convert|create|plan|select|choose|analy[sz]e)\b", re.IGNORECASE)


_TAG_LINE = re.compile(r"^</?[\w-]+>$")
_NULL_VALUE = re.compile(r"^\"?[\w ]+\"?\s*:\s*(?:null|true|false|\[\]|\{\}|\"\")?,?$", re.IGNORECASE)


def _clean(line: str) -> str:
    line = re.sub(r"^[#>*\-\s\d.)]+", "", line)
    line = re.sub(r"^(?:NOTICE|Role|Instructions?)\s*:\s*", "", line, flags=re.IGNORECASE)
    line = re.sub(r"\*\*|__|[`#<>\[\]{}\"]+|(?<!\w)_|_(?!\w)", "", line).strip(" :;,'*")
    return re.sub(r"\s+", " ", line)


def _nameable(line: str) -> bool:
    """Lines a name may come from: words, not a bare tag (<policy>) or an empty JSON field ("x": null)."""
    return bool(_WORD.search(line)) and not _TAG_LINE.match(line) and not _NULL_VALUE.match(line)


def _sentence(line: str, words: int = 14) -> str:
    """The line's first sentence (or clause before ';'), at most ``words`` words."""
    first = re.split(r"(?<=[a-z0-9)])[.;!?](?:\s|$)", line, maxsplit=1)[0]
    cut = first.split()
    return " ".join(cut[:words]) + ("..." if len(cut) > words else "")


def _name(templates: list[Template], text_lines: list[tuple[str, ...]]) -> None:
    """Each template's name from its own words: its heading (first line, when short) and its first instruction
    line ("You are ...", "Translate ...") that no other template has, else its first line of its own. Lines
    whose only variable part is a PII placeholder count here when nearly all the template's texts have them
    (scrubbing may take a word of the instructions for a name), shown with "…" in its place."""
    count = Counter(line for t in templates for line in set(t.lines[1:]))
    for t in templates:
        if t.residual:
            t.name = ""
            continue
        seen = Counter(ln for i in t.texts for ln in text_lines[i] if "<pii>" in ln)
        common = {ln for ln, n in seen.items() if n >= 0.8 * len(t.texts)
                  and not any(m in ln.replace("<pii>", "") for m in MASKS)}
        template_lines = set(t.lines[1:]) | common
        ordered = [ln for ln in text_lines[t.texts[0]] if ln in template_lines]
        lines = [ln.replace("<pii>", "…") for ln in ordered if _nameable(ln.replace("<pii>", "…"))] or \
            list(t.lines[1:])
        count.update(ln.replace("<pii>", "…") for ln in common)
        own = [ln for ln in lines if count[ln] == 1]
        headings = [ln for ln in own if ln.startswith("#")]
        pick = next((ln for ln in own if _INSTRUCTION.search(_clean(ln))), None)
        if pick is None and len(headings) >= 2:
            # A document of its own (a policy): its title, or its first two headings when the title is a word.
            first = _clean(headings[0])
            t.name = (first if len(first.split()) >= 2 else " · ".join(_clean(h) for h in headings[:2]))[:90]
            continue
        pick = pick or next((ln for ln in own if len(_clean(ln).split()) >= 2), None) or (own[0] if own else None)
        head = _clean(lines[0])
        body = _sentence(_clean(pick)) if pick else ""
        if head and len(head.split()) <= 5 and head.lower() not in body.lower() and pick != lines[0] \
                and head.upper() != head:
            name = f"{head} · {body}" if body else head
        else:
            name = body or _sentence(head)
        t.name = name[:90]
