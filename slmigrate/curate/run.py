"""Curate (paper step S2): turn the stored calls into a dataset that is safe to fine-tune on.

Order of work: quality filters (each drop counted with its reason) -> exact and near-duplicate removal (keep the
first) -> PII/secret scrubbing (``slmigrate.curate.pii``) -> train/validation/test split by session -> a new version of
the curated dataset (``slmigrate.curate.dataset``) with its report, and a "curate" manifest so an unchanged re-run is
skipped.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slmigrate import engines
from slmigrate.curate import dataset as curated
from slmigrate.chat_format import message_text
from slmigrate.config import CurateConfig
from slmigrate.errors import SlmigrateError
from slmigrate.progress import Progress
from slmigrate.results import StageOutput
from slmigrate.record import CallRecord, canonical_bytes, canonical_json
from slmigrate.workspace import Workspace, fingerprint_of

# Bump when curate's output for the same input and config changes, so old results count as stale.
CURATE_LOGIC_VERSION = 2  # 2: metadata, request user/metadata and JSON-escaped values scrubbed
DROP_REASONS = ("failed", "empty_answer", "truncated", "invalid_tool_arguments", "unknown_tool",
                "below_min_outcome", "duplicate", "near_duplicate")
EXPORT_FORMATS = ("openai", "openai-ft")



# --- filters ---
def offered_tools(call: CallRecord) -> set[str]:
    names = {((t.get("function") or {}).get("name") or t.get("name")) for t in call.tools if isinstance(t, dict)}
    names |= {f.get("name") for f in call.request.get("functions") or [] if isinstance(f, dict)}
    return {n for n in names if n}


def outcome_of(call: CallRecord) -> float | None:
    """The workflow's outcome: the record's own field, else a reward/outcome the import left in metadata."""
    if call.outcome is not None:
        return call.outcome
    for key in ("reward", "outcome", "score"):
        value = (call.metadata or {}).get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return None


def drop_reason(call: CallRecord, config: CurateConfig) -> str | None:
    """Why a call is not fit for training, or None when it is."""
    answer = call.answer
    if call.status != "ok" or call.error or answer is None:
        return "failed"
    if call.finish_reason == "length":
        return "truncated"
    tool_calls = list(answer.get("tool_calls") or [])
    if answer.get("function_call"):
        tool_calls.append({"function": answer["function_call"]})
    if not tool_calls and not message_text(answer).strip():
        return "empty_answer"
    offered = offered_tools(call)
    for tc in tool_calls:
        fn = (tc or {}).get("function") or {}
        try:
            json.loads(fn.get("arguments") or "{}")
        except (TypeError, ValueError):
            return "invalid_tool_arguments"
        # Without a tool list in the request we cannot judge (some logs drop it), so only offered lists count.
        if offered and fn.get("name") not in offered:
            return "unknown_tool"
    if config.min_outcome is not None:
        outcome = outcome_of(call)
        if outcome is not None and outcome < config.min_outcome:
            return "below_min_outcome"
    return None


# --- duplicates ---
_WS = re.compile(r"(?:\\[nrt]|\s)+")
_ID = re.compile(r"(?<![A-Za-z0-9])(?=[A-Za-z0-9_\-#]*\d)[A-Za-z0-9_\-#]{5,}(?![A-Za-z0-9])")
_NUM = re.compile(r"\d+(?:\.\d+)?")
_QUOTE_WS = re.compile(r' ?" ?')


def exact_key(call: CallRecord) -> str:
    # The answer, not the whole response: response ids, timestamps and usage differ between identical calls.
    body = canonical_json([call.request, call.answer, call.finish_reason])
    return hashlib.sha256(body.encode("utf-8")).hexdigest()


def near_key(call: CallRecord) -> str:
    """The request with whitespace collapsed, id-like tokens and numbers blanked: a digest over the tool list and
    each message so normalised, in order."""
    key = hashlib.sha256()
    for part in (call.request.get("tools"), *(call.request.get("messages") or ())):
        key.update(_near_part(canonical_bytes(part)))
    return key.hexdigest()


# Normalised digests of recent parts. A log repeats the same tool list and system prompt in every call and each
# earlier turn of a conversation in every later call, and the regexes cost ~0.3 us per character (9 ms for one
# 33 KB tau2 request), so each distinct part is normalised once. Bounded like the embedder's word table.
_NEAR_PARTS: dict[bytes, bytes] = {}
_NEAR_PARTS_MAX = 200_000


def _near_part(raw: bytes) -> bytes:
    exact = hashlib.blake2b(raw, digest_size=16).digest()
    normal = _NEAR_PARTS.get(exact)
    if normal is None:
        text = raw.decode("utf-8")
        text = _QUOTE_WS.sub('"', _WS.sub(" ", text))  # whitespace at the ends of strings does not count either
        text = _NUM.sub("0", _ID.sub("<id>", text))
        normal = hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()
        if len(_NEAR_PARTS) >= _NEAR_PARTS_MAX:
            _NEAR_PARTS.clear()
        _NEAR_PARTS[exact] = normal
    return normal


# --- splits ---
def split_of(session_key: str, shares: tuple[float, float, float], seed: int = 0) -> str:
    """train | validation | test from a hash of the session alone: new data never moves an old session."""
    digest = hashlib.sha256(f"{seed}:{session_key}".encode("utf-8")).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    if u < shares[0]:
        return "train"
    if u < shares[0] + shares[1]:
        return "validation"
    return "test"


def session_key(call: CallRecord) -> str:
    return call.session or f"call:{call.input_id or call.id}"


# Entity tokens: e-mail addresses and id-like tokens (5+ characters of letters, digits, "_", "-", "#" with 3+ digits
# and a letter, or 6+ digits: AO-216530, #W4073673, mia_li_3668, 5551234567), never dates, short digit groups or
# words like "2-Person".
_EMAIL = re.compile(r"(?<![\w.+-])[\w.+-]+@[\w-]+(?:\.[\w-]+)+")
_NOT_ID = re.compile(r"\d{4}-\d{2}-\d{2}.*|\d{1,4}(?:[-_]\d{1,4})*")
_TOKEN_PARTS: dict[bytes, frozenset[bytes]] = {}


def entity_tokens(text: str) -> frozenset[bytes]:
    """Digests of the e-mails and id-like tokens in ``text`` (remembered per distinct text, like near_key's
    parts; digests only: the values themselves are never kept)."""
    exact = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()
    found = _TOKEN_PARTS.get(exact)
    if found is None:
        values = {m.group(0).lower() for m in _EMAIL.finditer(text)}
        for m in _ID.finditer(text):
            token = m.group(0).strip("-_#")
            digits = sum(ch.isdigit() for ch in token)
            if len(token) >= 5 and digits >= 3 and not _NOT_ID.fullmatch(token) and (
                    digits >= 6 or any(ch.isalpha() for ch in token)):
                values.add(token.lower())
        found = frozenset(_digest(v) for v in values)
        if len(_TOKEN_PARTS) >= _NEAR_PARTS_MAX:
            _TOKEN_PARTS.clear()
        _TOKEN_PARTS[exact] = found
    return found


def _digest(value: str) -> bytes:
    return hashlib.blake2b(value.encode("utf-8", "surrogatepass"), digest_size=8, person=b"slm-link").digest()


def _call_texts(call: CallRecord) -> Iterator[str]:
    """The conversation's texts an entity can sit in: every message (content, tool calls) and the answer."""
    for message in (*(call.request.get("messages") or ()), call.answer):
        if isinstance(message, dict):
            yield canonical_json({k: v for k, v in message.items() if k != "tool_call_id"})


def task_key(call: CallRecord) -> bytes:
    """What calls of one task share before clustering: the system prompt and the tools offered."""
    messages = call.request.get("messages") or []
    head = messages[0] if messages and isinstance(messages[0], dict) else {}
    system = message_text(head) if head.get("role") in ("system", "developer") else ""
    return _digest(system + "\x00" + ",".join(sorted(offered_tools(call))))


class SplitPlanner:
    """Assigns each session a split so that calls sharing an entity land on one side and tasks get their test calls.

    ``add`` each kept call (and, after scrubbing, ``add_values`` the PII values found in it): sessions are joined
    by union-find when they share an entity token (rarest tokens first). Two guards keep one giant group from
    swallowing the log (a long chain of shared first names or a product id in every call would): a token in more
    than ``link_max_share`` of the sessions (at least 10) is no entity and is ignored, and a token whose union would
    make a group larger than that share is left unlinked (counted in the report as ``links_skipped``). A group is
    split by ``split_of`` of its smallest session key: an unlinked session keeps the split it always had.
    Each group's test share is the largest its tasks need (``test_calls_per_task``), see ``shares``.
    """

    def __init__(self, config: CurateConfig):
        self.config = config
        self.index: dict[str, int] = {}
        self.keys: list[str] = []
        self.tokens: dict[bytes, set[int]] = {}
        self.tasks: list[set[bytes]] = []
        self.task_calls: Counter[bytes] = Counter()

    def _session(self, call: CallRecord) -> int:
        key = session_key(call)
        at = self.index.get(key)
        if at is None:
            at = self.index[key] = len(self.keys)
            self.keys.append(key)
            self.tasks.append(set())
        return at

    def add(self, call: CallRecord) -> None:
        at = self._session(call)
        task = task_key(call)
        self.tasks[at].add(task)
        self.task_calls[task] += 1
        if self.config.link_entities:
            for text in _call_texts(call):
                for token in entity_tokens(text):
                    self.tokens.setdefault(token, set()).add(at)

    def add_values(self, call: CallRecord, values: Iterable[str]) -> None:
        """PII values the scrubber found in ``call`` (names, e-mails, ids): entities too."""
        if self.config.link_entities:
            at = self._session(call)
            for value in values:
                self.tokens.setdefault(_digest(value.strip().lower()), set()).add(at)

    def shares(self) -> dict[bytes, float]:
        """Test share per task: (target + 2 sqrt(target)) / calls, so the task expects ``test_calls_per_task``
        test calls with a margin, capped at ``max_test_share``; never below the configured test share. Only for
        tasks with at least ``test_calls_per_task`` calls (the others do not have them to give)."""
        target, base = self.config.test_calls_per_task, self.config.split[2]
        out = {}
        if target:
            margin = target + 2 * math.sqrt(target)
            for task, n in self.task_calls.items():
                if n >= target:
                    out[task] = max(base, min(self.config.max_test_share, margin / n))
        return out

    def assign(self) -> tuple[dict[str, str], dict[str, Any]]:
        """Session key -> split, and what the linking did (for the report)."""
        n = len(self.keys)
        parent = list(range(n))
        size = [1] * n

        def find(i: int) -> int:
            while parent[i] != i:
                parent[i] = parent[parent[i]]
                i = parent[i]
            return i

        cap = max(10, int(self.config.link_max_share * n))
        ignored = skipped = 0
        for token, sessions in sorted(self.tokens.items(), key=lambda kv: (len(kv[1]), kv[0])):
            if len(sessions) < 2:
                continue
            if len(sessions) > cap:
                ignored += 1
                continue
            roots = {find(i) for i in sessions}
            if len(roots) < 2:
                continue
            if sum(size[r] for r in roots) > cap:
                skipped += 1
                continue
            first, *rest = sorted(roots)
            for r in rest:
                parent[r] = first
                size[first] += size[r]
        groups: dict[int, list[int]] = {}
        for i in range(n):
            groups.setdefault(find(i), []).append(i)
        task_share = self.shares()
        train, validation, test = self.config.split
        out = {}
        for members in groups.values():
            key = min(self.keys[i] for i in members)
            share = max([test] + [task_share.get(t, test) for i in members for t in self.tasks[i]])
            shares = (train, validation, test) if share <= test else (
                train * (1 - share) / (train + validation or 1), validation * (1 - share) / (train + validation or 1),
                share)
            split = split_of(key, shares, self.config.seed)
            for i in members:
                out[self.keys[i]] = split
        linked = [m for m in groups.values() if len(m) > 1]
        report = {"groups": len(groups), "linked_groups": len(linked),
                  "linked_sessions": sum(len(m) for m in linked),
                  "largest_group_sessions": max((len(m) for m in groups.values()), default=0),
                  "tokens_ignored": ignored, "links_skipped": skipped, "group_cap_sessions": cap,
                  "test_share": {"configured": test, "max_used": max(task_share.values(), default=test)}}
        return out, report


# --- the stage ---
# Where and on how many workers the PII pass runs changes speed, not output.
RUN_ONLY_KEYS = {"workers", "engine", "ray_address"}


def fingerprint(ws: Workspace, config: CurateConfig) -> str:
    settings = config.model_dump(mode="json", exclude=RUN_ONLY_KEYS)
    return fingerprint_of("curate", CURATE_LOGIC_VERSION, settings, ws.store.fingerprint())


@dataclass(frozen=True)
class CurateResult(StageOutput):
    """``curate``'s report; ``to_dict()`` is the report file's body (with ``skip_reason`` when skipped). Every
    field has a default: a skipped run returns the stored report, which an older version may have written."""

    calls_in: int = 0
    calls_out: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    splits: dict[str, int] = field(default_factory=dict)
    sessions: dict[str, int] = field(default_factory=dict)
    pii: str = "off"
    entities: dict[str, int] = field(default_factory=dict)
    split_groups: dict[str, Any] = field(default_factory=dict)  # the entity-aware split's linking and test share
    duration_s: float = 0.0
    version: str | None = None
    examples: list[dict[str, Any]] = field(default_factory=list)
    skipped: bool = False  # nothing changed since the last run: this is that run's report
    skip_reason: str | None = None


def curate(ws: Workspace, config: CurateConfig | None = None, *, progress: Progress | None = None,
           force: bool = False) -> CurateResult:
    """Run the curate stage; returns its report (``skipped`` is True when nothing changed since the last run)."""
    config = config or CurateConfig()
    engines.check_engine(config.engine, config.ray_address)
    if config.engine == "ray" and config.pii != "off":
        engines.require_ray()  # before loading the calls: a missing Ray should fail fast
    started = time.time()
    fp = fingerprint(ws, config)
    if not force and ws.is_fresh("curate", fp) and curated.current_version(ws):
        try:
            report = curated.load_report(ws)
        except (OSError, ValueError):
            report = None
        if report is not None:
            return CurateResult.of({**report, "skipped": True,
                                    "skip_reason": "no new calls and the same config since the last curate run"})
    from slmigrate.curate.pii import resolve_entities

    entities = resolve_entities(config.entities)
    total = ws.store.count_calls()
    if total == 0:
        raise SlmigrateError(f"the workspace {ws.root} holds no calls; import some first with "
                             "`slmigrate collect import FILE`")
    dropped: Counter[str] = Counter()
    calls_in = [0]
    kept_calls = _kept(ws, config, total, dropped, calls_in, progress)
    planner = SplitPlanner(config)
    if config.pii == "off":
        # Nothing needs the whole set at once: a first pass over the store collects each session's entity tokens
        # (digests only) for the split, then the calls stream from the store through the filters into the dataset.
        for call in _kept(ws, config, total, Counter(), [0], None):
            planner.add(call)
        scrubbed: Iterable[CallRecord] = kept_calls
        replaced: list[dict[str, str]] = []
        analyzer = None
    else:
        # The scrubber's whole-batch vetoes and consistent replacements need every kept call in memory.
        raw = list(kept_calls)
        for call in raw:
            planner.add(call)
        scrubbed, replaced, analyzer = _scrub(raw, config, entities, progress)
        _add_found_values(planner, raw, analyzer, config)
        del raw
    split_by_session, linking = planner.assign()
    entity_counts: Counter[str] = Counter()
    for r in replaced:
        entity_counts.update(r.values())

    splits: Counter[str] = Counter()
    sessions: dict[str, set[str]] = {s: set() for s in curated.SPLITS}

    def rows() -> Iterator[dict[str, Any]]:
        for call in scrubbed:
            key = session_key(call)
            split = split_by_session[key]
            splits[split] += 1
            sessions[split].add(key)
            yield curated.to_row(call, split)

    report: dict[str, Any] = {}

    def finish_report() -> dict[str, Any]:  # after the last row: only then are the counts known
        calls_out = sum(splits.values())
        report.update({
            "calls_in": calls_in[0],
            "calls_out": calls_out,
            "dropped": {r: dropped.get(r, 0) for r in DROP_REASONS},
            "splits": {s: splits.get(s, 0) for s in curated.SPLITS},
            "sessions": {s: len(v) for s, v in sessions.items()},
            "split_groups": linking,
            "pii": config.pii,
            "entities": dict(entity_counts.most_common()),
            "distinct_texts_analysed": len(analyzer.cache) if analyzer else 0,
            "examples": _examples(scrubbed, replaced, config.examples) if replaced else [],
            "store_fingerprint": ws.store.fingerprint(),
            "duration_s": round(time.time() - started, 2),
            "skipped": False,
        })
        return report

    version = curated.write_curated(ws, rows(), finish_report, config.model_dump(mode="json"))
    report["version"] = version
    # The version lives in the report file too, for `skipped` re-runs that return it.
    curated.write_report(ws, version, report)
    ws.write_manifest("curate", fingerprint=fp, config=config.model_dump(mode="json"),
                      counts={"calls_in": report["calls_in"], "calls_out": report["calls_out"], **report["splits"]},
                      started=started, extra={"store_fingerprint": ws.store.fingerprint(), "version": version})
    return CurateResult.of(report)


def _add_found_values(planner: SplitPlanner, raw: list[CallRecord], analyzer: Any, config: CurateConfig) -> None:
    """The values the PII pass found in each call (before replacement: a placeholder is numbered per session,
    the value behind it is what two sessions share) join the call's entity tokens."""
    if analyzer is None or not config.link_entities:
        return
    from slmigrate.curate.pii.engine import STRUCT
    from slmigrate.curate.pii.scrub import SAFE_METADATA_KEYS, texts_of

    keep = SAFE_METADATA_KEYS | frozenset(config.keep_metadata)
    for call in raw:
        values = {f.value for t in texts_of(call, keep) for f in analyzer.cache.get(t, ()) if f.entity != STRUCT}
        planner.add_values(call, values)


def _kept(ws: Workspace, config: CurateConfig, total: int, dropped: Counter[str], calls_in: list[int],
          progress: Progress | None) -> Iterator[CallRecord]:
    """The stored calls that pass the filters and are no (near-)duplicate of an earlier one, streamed page by page
    from the store. Only 16-byte digests of the keys are remembered (about 100 bytes per call), never the calls."""

    def counted() -> Iterator[CallRecord]:
        for i, call in enumerate(ws.store.iter_calls()):
            calls_in[0] = i + 1
            if progress and (i % 200 == 0 or i == total - 1):
                progress("load", i + 1, total)
            yield call

    return _filtered(counted(), config, dropped)


def _filtered(calls: Iterable[CallRecord], config: CurateConfig, dropped: Counter[str]) -> Iterator[CallRecord]:
    """The calls that pass the quality filters and are no (near-)duplicate of an earlier one of ``calls``; each
    dropped call is counted in ``dropped`` under its reason."""
    seen_exact: set[bytes] = set()
    seen_near: set[bytes] = set()
    for call in calls:
        reason = drop_reason(call, config)
        if reason is None:
            key = bytes.fromhex(exact_key(call))[:16]
            if key in seen_exact:
                reason = "duplicate"
            seen_exact.add(key)
        if reason is None and config.near_duplicates:
            key = bytes.fromhex(near_key(call))[:16]
            if key in seen_near:
                reason = "near_duplicate"
            seen_near.add(key)
        if reason:
            dropped[reason] += 1
        else:
            yield call


def _scrub(calls: list[CallRecord], config: CurateConfig, entities: Any,
           progress: Progress | None) -> tuple[list[CallRecord], list[dict[str, str]], Any]:
    from slmigrate.curate.pii import scrub_calls

    return scrub_calls(calls, mode=config.pii, entities=entities, seed=config.seed, workers=config.workers,
                       allow=config.allow, score_threshold=config.score_threshold, progress=progress,
                       engine=config.engine, address=config.ray_address, keep_metadata=config.keep_metadata)


def curate_calls(calls: Iterable[CallRecord], config: CurateConfig | None = None, *,
                 progress: Progress | None = None) -> tuple[list[CallRecord], Counter[str]]:
    """Curate a given batch of calls the way ``curate`` curates the store: the same quality filters,
    (near-)duplicate removal within the batch, and PII scrubbing with the same settings; nothing is written.
    Returns (the kept calls, scrubbed; drops by reason). ``slmigrate refine`` curates new traffic with it."""
    config = config or CurateConfig()
    engines.check_engine(config.engine, config.ray_address)
    dropped: Counter[str] = Counter()
    kept = list(_filtered(calls, config, dropped))
    if config.pii == "off" or not kept:
        return kept, dropped
    from slmigrate.curate.pii import resolve_entities

    scrubbed, _, _ = _scrub(kept, config, resolve_entities(config.entities), progress)
    return list(scrubbed), dropped


def _examples(calls: list[CallRecord], replaced: list[dict[str, str]], limit: int) -> list[dict[str, Any]]:
    """A few scrubbed snippets (after replacement only: the report must not carry the PII it removed)."""
    from slmigrate.curate.pii import texts_of

    order = sorted(range(len(calls)), key=lambda i: -len(replaced[i]))
    out: list[dict[str, Any]] = []
    for i in order[:limit]:
        if not replaced[i]:
            break
        for text in reversed(texts_of(calls[i])):
            hits = [r for r in replaced[i] if r in text]
            if hits:
                at = text.index(hits[0])
                out.append({"id": calls[i].id, "entities": sorted(set(replaced[i].values())),
                            "text": text[max(0, at - 120): at + 240]})
                break
    return out


# --- export ---
def _ft_message(message: dict[str, Any]) -> dict[str, Any]:
    """An assistant/other message with only the fields fine-tuning formats accept."""
    keep = {k: v for k, v in message.items() if k in ("role", "content", "name", "tool_calls", "tool_call_id")}
    if not keep.get("tool_calls"):
        keep.pop("tool_calls", None)
    else:
        keep["tool_calls"] = [{"id": tc.get("id"), "type": tc.get("type") or "function",
                               "function": {"name": tc["function"].get("name"),
                                            "arguments": tc["function"].get("arguments")}}
                              for tc in keep["tool_calls"]]
    return keep


def export_record(call: curated.CuratedCall, fmt: str) -> dict[str, Any]:
    if fmt == "openai":
        return {"id": call.id, "input_id": call.input_id, "session": call.session, "agent": call.agent,
                "split": call.split, "outcome": call.outcome, "request": call.request, "response": call.response,
                "metadata": call.metadata}
    messages = [_ft_message(m) for m in call.messages if isinstance(m, dict)]
    messages.append(_ft_message({**(call.answer or {}), "role": "assistant"}))
    row: dict[str, Any] = {"messages": messages}
    if call.tools:
        row["tools"] = call.tools
    return row


def export(ws: Workspace, out: str | Path, fmt: str = "openai", split: str = "all",
           version: str | None = None) -> dict[str, Any]:
    """Write the curated calls as JSON Lines: ``openai`` (request/response with ids, for inspection and other
    importers) or ``openai-ft`` (``{"messages", "tools"}`` per line: OpenAI fine-tuning, TRL, axolotl)."""
    if fmt not in EXPORT_FORMATS:
        raise SlmigrateError(f"unknown export format {fmt!r}; expected one of {', '.join(EXPORT_FORMATS)}")
    if split != "all" and split not in curated.SPLITS:
        raise SlmigrateError(f"unknown split {split!r}; expected one of {', '.join(curated.SPLITS)} or all")
    calls = curated.load_curated(ws, None if split == "all" else split, version)
    path = Path(out)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", encoding="utf-8") as fh:
            for call in calls:
                fh.write(json.dumps(export_record(call, fmt), ensure_ascii=False) + "\n")
    except OSError as exc:
        raise SlmigrateError(f"cannot write {path}: {exc.strerror}; pass another --out") from exc
    return {"out": str(path), "format": fmt, "split": split, "calls": len(calls),
            "version": version or curated.current_version(ws)}
