"""Replacing what was found, consistently within one session.

Every entity value found anywhere in a call (system prompt, user, assistant and tool messages, tool-call
arguments and results, the answer, the request's ``user`` and ``metadata``, the record's metadata) is replaced
wherever it occurs in that call and in every later call of its session, by the same replacement: ``<PERSON_1>``
(placeholder mode) or one seeded fake value (synthetic mode). So the answer still refers to the same entity as
the prompt, the same e-mail is the same placeholder in every turn, and a value the analyser missed in one text is
still caught when it found it in another.

JSON texts are parsed, their string values (and keys that are ids) replaced, and dumped again: the JSON stays
valid and keeps its structure. Values are matched in the decoded strings, so a PEM key whose line breaks are
``\\n`` escapes in a JSON text, or a name written as ``\\u00eb`` escapes, is replaced like any other.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import random
import re
import string
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from slmigrate.collect.formats._common import AGENT_KEYS, OUTCOME_KEYS, SESSION_KEYS
from slmigrate.curate.pii.engine import STRUCT, VETOABLE, Found, TextAnalyzer, is_json_container
from slmigrate.record import CallRecord

# Never replaced: values that are part of the agent's interface rather than of anyone's data.
BUILTIN_ALLOW = {"gift_card", "credit_card", "paypal", "certificate", "bank_account", "basic_economy", "economy",
                 "business", "round_trip", "one_way", "regular", "silver", "gold", "Human", "AI", "User",
                 "Assistant", "USA", "US", "Visa", "Mastercard", "MasterCard", "Amex", "American Express",
                 "Discover", "PayPal", "Paypal"} | {
    # Names of languages, formats and tools that spaCy's small model takes for people in instruction templates
    # ("You are a python code to Mermaid Sequence Diagram translator" lost "Mermaid", and with it the task's
    # name); none is a plausible person's name.
    "Mermaid", "PlantUML", "Graphviz", "Markdown", "Jinja", "Jupyter", "Django", "Flask", "FastAPI", "Pandas",
    "NumPy", "PyTorch", "TensorFlow", "Kubernetes", "Terraform", "Ansible", "GraphQL", "PostgreSQL", "SQLite",
    "MongoDB", "Redis", "Elasticsearch", "TypeScript", "JavaScript", "Rust", "Golang", "Kotlin", "Swift"}

# Priority when one value was found as two types (higher wins on equal score).
_PRIORITY = {"PRIVATE_KEY": 9, "OPENAI_API_KEY": 9, "ANTHROPIC_API_KEY": 9, "AWS_ACCESS_KEY": 9,
             "AWS_SECRET_KEY": 9, "GCP_KEY": 9, "AZURE_KEY": 9, "GITHUB_TOKEN": 9, "SLACK_TOKEN": 9, "STRIPE_KEY": 9,
             "API_TOKEN": 9, "JWT": 9, "BEARER_TOKEN": 8, "URL_PASSWORD": 8, "SECRET": 7, "EMAIL_ADDRESS": 6,
             "PAYMENT_ID": 6, "USER_ID": 5, "CREDIT_CARD": 5, "IBAN_CODE": 5, "US_SSN": 5, "STREET_ADDRESS": 4,
             "PERSON": 3}

# Top-level metadata keys whose scalar values are kept as they are: the fields slmigrate's importers fill
# (session, agent and outcome keys, turn/step/trial counters) and the task labels that tau-bench, tau2 and users
# put there to say which task a call belongs to. Everything else in metadata is scrubbed like a tool result; users
# add their own keys with `[curate] keep_metadata`.
SAFE_METADATA_KEYS = frozenset({
    *SESSION_KEYS, *AGENT_KEYS, *OUTCOME_KEYS, "turn", "step", "trial", "task_id", "task_tag", "task_type",
    "label", "domain", "role", "mode", "split", "source", "workload_id", "environment", "env", "version",
})
# Text-bearing fields of a message besides tool calls (reasoning models return their chain of thought too).
_TEXT_FIELDS = ("content", "reasoning_content", "reasoning", "refusal")
# Request fields OpenAI defines for the caller's own data: ``user`` and ``safety_identifier`` identify the end
# user (often an e-mail or an account id).
_REQUEST_EXTRAS = ("user", "safety_identifier", "metadata")


def _loose(obj: dict[str, Any], keep: frozenset[str]) -> dict[str, Any]:
    """The part of a free-form dict to scrub: all of it but scalar values under kept keys."""
    return {k: v for k, v in obj.items()
            if not (k in keep and (v is None or isinstance(v, (str, int, float, bool))))}


def side_text(obj: Any, keep: frozenset[str] = frozenset()) -> str | None:
    """A free-form dict (record metadata, the request's user/metadata) as the JSON text the analyser and the
    replacement see, without its kept keys; None when nothing in it needs scrubbing."""
    if not isinstance(obj, dict):
        return None
    loose = _loose(obj, keep)
    return json.dumps(loose, ensure_ascii=False, default=str) if loose else None


_AS_USER_ID = {"user": "user_id", "safety_identifier": "customer_id"}
_FROM_USER_ID = {v: k for k, v in _AS_USER_ID.items()}


def _request_extras(request: dict[str, Any]) -> dict[str, Any]:
    # Renamed to keys the key rules know: the whole value is then taken as the account id it is.
    return {_AS_USER_ID.get(k, k): request[k] for k in _REQUEST_EXTRAS if request.get(k)}


def texts_of(call: CallRecord, keep_metadata: frozenset[str] = SAFE_METADATA_KEYS) -> list[str]:
    """Every free-text or JSON string of a call that may hold PII, in conversation order (the record's metadata
    and the request's user/metadata first, as JSON texts)."""
    out: list[str] = [t for t in (side_text(call.metadata, keep_metadata),
                                  side_text(_request_extras(call.request))) if t]
    messages = list(call.request.get("messages") or [])
    for choice in (call.response or {}).get("choices") or []:
        if isinstance(choice, dict) and isinstance(choice.get("message"), dict):
            messages.append(choice["message"])
    for message in messages:
        if not isinstance(message, dict):
            continue
        for name in _TEXT_FIELDS:
            content = message.get(name)
            if isinstance(content, str):
                out.append(content)
            elif isinstance(content, list):
                out.extend(p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
        for tc in message.get("tool_calls") or []:
            args = (tc.get("function") or {}).get("arguments") if isinstance(tc, dict) else None
            if isinstance(args, str):
                out.append(args)
        fc = message.get("function_call")
        if isinstance(fc, dict) and isinstance(fc.get("arguments"), str):
            out.append(fc["arguments"])
    return [t for t in out if t]


def allow_list_of(call: CallRecord, extra: set[str] | frozenset[str] = frozenset()) -> set[str]:
    """Tool names, schema property names and enum values of the call's tools: structure, never PII."""
    allow = set(BUILTIN_ALLOW) | set(extra)

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                allow.add(str(k))
                if k == "enum" and isinstance(v, list):
                    allow.update(str(x) for x in v)
                elif k in ("name", "title") and isinstance(v, str):
                    allow.add(v)
                walk(v)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(call.request.get("tools") or [])
    walk(call.request.get("functions") or [])
    return allow


class Replacer:
    """Makes the replacement for each value of one call, in order of first appearance."""

    def __init__(self, mode: str, seed: int, call_key: str):
        self.mode = mode
        self.counters: Counter[str] = Counter()
        self.mapping: dict[str, str] = {}
        digest = hashlib.sha256(f"{seed}:{call_key}".encode()).digest()
        self.rng = random.Random(int.from_bytes(digest[:8], "big"))
        self._faker = None

    @property
    def faker(self):
        if self._faker is None:
            self._faker = _shared_faker()
            self._faker.seed_instance(self.rng.getrandbits(32))
        return self._faker

    def add(self, value: str, entity: str, known: dict[str, str] | None = None) -> None:
        if value in self.mapping:
            return
        if self.mode == "placeholder":
            self.counters[entity] += 1
            self.mapping[value] = f"<{entity}_{self.counters[entity]}>"
            return
        used = set(self.mapping.values())
        for _ in range(20):
            fake = self._synthetic(value, entity)
            if fake != value and fake not in used:
                break
        self.mapping[value] = fake
        parts, fake_parts = value.split(), fake.split()
        if entity == "PERSON" and len(parts) > 1 and len(fake_parts) == len(parts) and known:
            # "James Lee" -> "Mark Jones" makes a lone "James" elsewhere in the call "Mark".
            for part, fake_part in zip(parts, fake_parts):
                if known.get(part) == "PERSON" and part not in self.mapping:
                    self.mapping[part] = fake_part

    def _shape(self, value: str) -> str:
        """Same shape, other characters: digits stay digits, letters keep their case, the rest stays."""
        out = []
        for ch in value:
            if ch.isdigit():
                out.append(self.rng.choice(string.digits))
            elif ch.isupper() and ch.isascii():
                out.append(self.rng.choice(string.ascii_uppercase))
            elif ch.islower() and ch.isascii():
                out.append(self.rng.choice(string.ascii_lowercase))
            else:
                out.append(ch)
        return "".join(out)

    def _person(self, value: str) -> str:
        parts = value.split()
        if len(parts) == 1:
            return self.mapping.get(value) or self.faker.first_name()
        # Reuse the fakes already chosen for the parts so "James", "Lee" and "James Lee" stay one person.
        first = self.mapping.get(parts[0]) or self.faker.first_name()
        last = self.mapping.get(parts[-1]) or self.faker.last_name()
        return " ".join([first, *parts[1:-1], last]) if len(parts) > 2 else f"{first} {last}"

    def _synthetic(self, value: str, entity: str) -> str:
        f = self.faker
        if entity == "PERSON":
            return self._person(value)
        if entity == "EMAIL_ADDRESS":
            user = re.sub(r"[^a-z0-9.]", "", f.user_name().lower()) or "user"
            return f"{user}{self.rng.randint(10, 9999)}@example.com"
        if entity == "STREET_ADDRESS":
            if re.match(r"(?i)(apt|apartment|suite|ste|unit|floor|#)\b", value):
                return f.secondary_address()
            return f.street_address()
        if entity == "DATE_OF_BIRTH" and re.fullmatch(r"\d{4}-\d{2}-\d{2}", value):
            return f.date_of_birth(minimum_age=18, maximum_age=90).isoformat()
        if entity == "CREDIT_CARD":
            return f.credit_card_number()
        if entity == "IBAN_CODE":
            return f.iban()
        if entity == "US_SSN":
            return f.ssn()
        if entity == "IP_ADDRESS":
            return f.ipv6() if ":" in value else f.ipv4_public()
        if entity == "USER_ID":
            m = re.fullmatch(r"([a-z]+(?:_[a-z]+)*)_(\d+)", value)
            if m:
                return f"{f.first_name().lower()}_{f.last_name().lower()}_{self._shape(m.group(2))}"
            return self._shape(value)
        if entity in ("ORDER_ID", "RESERVATION_ID") and value[:2] == "#W":
            return "#W" + self._shape(value[2:])  # the order-number format stays recognisable
        if entity == "PAYMENT_ID":
            m = re.fullmatch(r"([a-z_]+_)(\d+)", value)
            return m.group(1) + self._shape(m.group(2)) if m else self._shape(value)
        prefix = _SECRET_PREFIX.match(value)
        if prefix:  # a fake key still looks like the kind of key it replaces
            return prefix.group(0) + self._shape(value[prefix.end():])
        return self._shape(value)


_SECRET_PREFIX = re.compile(r"^(?:sk-(?:proj-|svcacct-|admin-|ant-)?|AKIA|ASIA|gh[pousr]_|github_pat_|xox[a-z]-|eyJ)")
_FAKER = None


def _shared_faker():
    global _FAKER
    if _FAKER is None:
        from faker import Faker

        _FAKER = Faker("en_US")
    return _FAKER


def _pattern(values: list[str]) -> re.Pattern[str]:
    # Longest first, so an e-mail wins over the name inside it; no match inside a longer word or id.
    alternation = "|".join(re.escape(v) for v in sorted(values, key=len, reverse=True))
    return re.compile(rf"(?<![A-Za-z0-9_])(?:{alternation})(?![A-Za-z0-9_])")


def _name_parts(found: dict[str, str], texts: list[str], skip: set[str], tools_text: str) -> dict[str, str]:
    """Parts of a full name found in a call that also stand alone in it ("Asya Godina" ... "Asya said"): the
    same person, referred to by first or last name later in the conversation."""
    from slmigrate.curate.pii.recognizers import common_words

    parts: dict[str, str] = {}
    for value, entity in found.items():
        if entity != "PERSON" or " " not in value.strip():
            continue
        for part in re.split(r"\s+", value.strip()):
            part = part.strip(".,")
            if (len(part) < 3 or not part[0].isalpha() or part in found or part in skip or part in tools_text
                    or part.lower() in common_words()):
                continue
            standalone = re.compile(rf"(?<![\w\-]){re.escape(part)}(?![\w\-])")
            # standalone somewhere, not only inside the full name itself
            if any(len(standalone.findall(t)) > t.count(value) for t in texts):
                parts[part] = "PERSON"
    return parts


# A phone number written as one ("+1 (415) 555-0142", "415-555-0142"): a JSON value of that shape is a
# contact, not structure, whatever its key is called. Bare digit runs stay vetoable: they are item ids as often.
_PHONE_SHAPE = re.compile(r"\+?\(?\d[\d ().\-]{5,}\d")


def _unmistakable(found: Found) -> bool:
    """A finding that stays PII even as a short value under a neutral JSON key, where structure would veto it:
    a number written as a phone number, or a full name whose every word is a listed first or last name
    (``"owner": "Zoë Kraus"`` in a tool result; ``"product": "Sierra Hammock"`` stays structure)."""
    if found.entity == "PHONE_NUMBER":
        return _phone_shaped(found.value)
    if found.entity == "PERSON":
        from slmigrate.curate.pii.false_positives import is_full_name

        return is_full_name(found.value)
    return False


def _phone_shaped(value: str) -> bool:
    return (bool(_PHONE_SHAPE.fullmatch(value)) and sum(c.isdigit() for c in value) >= 7
            and (value.startswith("+") or "(" in value or re.search(r"\d[ .\-]\d", value) is not None))


def _decoded_strings(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for k, v in node.items():
            yield str(k)
            yield from _decoded_strings(v)
    elif isinstance(node, list):
        for item in node:
            yield from _decoded_strings(item)
    elif isinstance(node, str):
        yield node


class CallScrubber:
    """Scrubs calls given a filled TextAnalyzer cache. One replacer per session, so a value gets one replacement
    in every call of its session; calls must come in order (curate's are). Output texts are cached per (text,
    replacements that apply to it): calls of one session repeat history, and map it the same way turn after
    turn."""

    def __init__(self, analyzer: TextAnalyzer, mode: str = "placeholder", seed: int = 0,
                 allow: set[str] | frozenset[str] = frozenset(), structural: set[str] | frozenset[str] = frozenset(),
                 tools_text: str = "", keep_metadata: Iterable[str] = ()):
        if mode not in ("placeholder", "synthetic", "off"):
            raise ValueError(mode)
        self.analyzer = analyzer
        self.mode = mode
        self.seed = seed
        self.allow = frozenset(allow)
        # Values seen as structure across the whole batch (see engine.STRUCT); a call's own are added per call.
        self.structural = frozenset(structural)
        self.tools_text = tools_text  # tool schemas of the whole batch (user-simulator calls often carry none)
        self.keep_metadata = SAFE_METADATA_KEYS | frozenset(keep_metadata)
        self.last_mapping: dict[str, str] = {}
        self._replacers: dict[str, Replacer] = {}
        self._regexes: dict[str, tuple[int, re.Pattern[str]]] = {}
        self._out_cache: dict[tuple[str, tuple[tuple[str, str], ...]], str] = {}
        self._decoded: dict[str, str] = {}

    def texts(self, call: CallRecord) -> list[str]:
        return texts_of(call, self.keep_metadata)

    def findings(self, call: CallRecord) -> dict[str, str]:
        """value -> entity for every value to replace in the call, in order of first appearance."""
        allow = allow_list_of(call, self.allow)
        # Words of the agent's own tool descriptions ("Toggles Airplane Mode ON or OFF") are not anyone's data.
        tools_text = self.tools_text + json.dumps(call.request.get("tools") or call.request.get("functions") or [],
                                                  ensure_ascii=False)
        texts = self.texts(call)
        per_text = [self.analyzer.analyze(text) for text in texts]
        structural = set(self.structural)
        structural.update(f.value for found in per_text for f in found if f.entity == STRUCT)
        best: dict[str, Found] = {}
        for found in per_text:
            for f in found:
                if f.entity == STRUCT or f.value in allow:
                    continue
                if (f.source != "key" and f.entity in VETOABLE and (f.value in tools_text or (
                        f.value in structural and not _unmistakable(f)))):
                    continue
                old = best.get(f.value)
                if old is None or (f.score, _PRIORITY.get(f.entity, 0)) > (old.score, _PRIORITY.get(old.entity, 0)):
                    best[f.value] = f
        found = {v: f.entity for v, f in best.items()}
        found.update(_name_parts(found, texts, allow | structural, tools_text))
        return found

    def _replacer(self, call: CallRecord) -> Replacer:
        key = call.session or call.id or call.content_hash
        replacer = self._replacers.get(key)
        if replacer is None:
            replacer = self._replacers[key] = Replacer(self.mode, self.seed, key)
        return replacer

    def _regex(self, key: str, mapping: dict[str, str]) -> re.Pattern[str]:
        # A session's mapping only grows: recompile when it did.
        size, regex = self._regexes.get(key, (-1, None))
        if size != len(mapping) or regex is None:
            regex = _pattern(list(mapping))
            self._regexes[key] = (len(mapping), regex)
        return regex

    def scrub(self, call: CallRecord) -> tuple[CallRecord, dict[str, str]]:
        """A scrubbed copy of ``call`` and value -> entity type for what was found in it; ``last_mapping`` then
        holds value -> replacement for the call's session so far (never store either: they hold the PII)."""
        self.last_mapping = {}
        if self.mode == "off":
            return call, {}
        found = self.findings(call)
        replacer = self._replacer(call)
        if not found and not replacer.mapping:
            return call, {}
        # Multi-word names first in synthetic mode so single names reuse their parts' fakes.
        order = list(found)
        if self.mode == "synthetic":
            order.sort(key=lambda v: -len(v.split()) if found[v] == "PERSON" else 0)
        for value in order:
            replacer.add(value, found[value], found)
        # The whole session's mapping: a value found in an earlier call is replaced here too.
        mapping = self.last_mapping = replacer.mapping
        regex = self._regex(call.session or call.id or call.content_hash, mapping)
        fn = lambda t: self._text(t, mapping, regex)  # noqa: E731
        request = _map_messages(call.request, fn)
        extras = _request_extras(call.request)
        if extras:
            scrubbed = _scrub_side(extras, frozenset(), fn)
            request.update({_FROM_USER_ID.get(k, k): v for k, v in scrubbed.items()})
        response = call.response
        if response is not None:
            response = dict(response)
            choices = []
            for choice in response.get("choices") or []:
                if isinstance(choice, dict):
                    choice = dict(choice)
                    if isinstance(choice.get("message"), dict):
                        choice["message"] = _map_message(choice["message"], fn)
                    if choice.get("logprobs"):
                        choice["logprobs"] = None  # the answer again, token by token: no replacement reaches it
                choices.append(choice)
            if "choices" in response:
                response["choices"] = choices
        metadata = (_scrub_side(call.metadata, self.keep_metadata, fn) if isinstance(call.metadata, dict)
                    else copy.copy(call.metadata))
        # A shallow copy with the new payloads: the other fields are scalars; asdict() would deep-copy the whole
        # 30 KB request first only to throw it away.
        clone = dataclasses.replace(call, request=request, response=response, metadata=metadata)
        return clone, {v: found[v] for v in found if v in mapping}

    def _searchable(self, text: str) -> str:
        """``text`` plus, for a JSON text with escapes, its decoded strings: values are found in decoded views
        (a PEM's line breaks, a name's accents), and would never be seen in the escaped text."""
        if "\\" not in text:
            return text
        hit = self._decoded.get(text)
        if hit is None:
            obj = is_json_container(text)
            hit = text if obj is None else text + "\n" + "\n".join(_decoded_strings(obj))
            if len(self._decoded) > 50_000:
                self._decoded.clear()
            self._decoded[text] = hit
        return hit

    def _text(self, text: str, mapping: dict[str, str], regex: re.Pattern[str]) -> str:
        searchable = self._searchable(text)
        present = tuple((v, r) for v, r in mapping.items() if v in searchable)
        if not present:
            return text
        key = (text, present)
        cached = self._out_cache.get(key)
        if cached is None:
            cached = replace_in_text(text, mapping, regex)
            if len(self._out_cache) > 200_000:
                self._out_cache.clear()
            self._out_cache[key] = cached
        return cached


def _scrub_side(obj: dict[str, Any], keep: frozenset[str], fn: Callable[[str], str]) -> dict[str, Any]:
    """A free-form dict with the strings outside its kept keys passed through ``fn`` (as one JSON text), in its
    own key order."""
    text = side_text(obj, keep)
    if text is None:
        return dict(obj)
    loose = _loose(obj, keep)
    new = json.loads(fn(text))
    if len(new) != len(loose):  # two keys became one replacement: order no longer lines up
        return {**{k: v for k, v in obj.items() if k not in loose}, **new}
    scrubbed = iter(new.items())
    out: dict[str, Any] = {}
    for k, v in obj.items():
        if k in loose:
            k, v = next(scrubbed)
        out[k] = v
    return out


def replace_in_text(text: str, mapping: dict[str, str], regex: re.Pattern[str] | None = None) -> str:
    regex = regex or _pattern(list(mapping))
    obj = is_json_container(text)
    if obj is None:
        return regex.sub(lambda m: mapping[m.group(0)], text)

    def sub(s: str) -> str:
        return regex.sub(lambda m: mapping[m.group(0)], s)

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            return {sub(k) if isinstance(k, str) else k: walk(v) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(x) for x in node]
        if isinstance(node, str):
            return sub(node)
        return node

    ascii_only = text.isascii()
    return json.dumps(walk(obj), ensure_ascii=ascii_only)


def _map_message(message: dict[str, Any], fn: Callable[[str], str]) -> dict[str, Any]:
    message = dict(message)
    for name in _TEXT_FIELDS:
        content = message.get(name)
        if isinstance(content, str):
            message[name] = fn(content)
        elif isinstance(content, list):
            message[name] = [
                {**p, "text": fn(p["text"])} if isinstance(p, dict) and isinstance(p.get("text"), str) else p
                for p in content
            ]
    if isinstance(message.get("name"), str):  # a participant's name ({"role": "user", "name": "mia"})
        message["name"] = fn(message["name"])
    if message.get("tool_calls"):
        calls = []
        for tc in message["tool_calls"]:
            if isinstance(tc, dict) and isinstance((tc.get("function") or {}).get("arguments"), str):
                tc = {**tc, "function": {**tc["function"], "arguments": fn(tc["function"]["arguments"])}}
            calls.append(tc)
        message["tool_calls"] = calls
    fc = message.get("function_call")
    if isinstance(fc, dict) and isinstance(fc.get("arguments"), str):
        message["function_call"] = {**fc, "arguments": fn(fc["arguments"])}
    return message


def _map_messages(request: dict[str, Any], fn: Callable[[str], str]) -> dict[str, Any]:
    request = dict(request)
    if isinstance(request.get("messages"), list):
        request["messages"] = [_map_message(m, fn) if isinstance(m, dict) else m for m in request["messages"]]
    return request
