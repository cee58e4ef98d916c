"""Quality metrics, chosen by a cluster's output kind (tool_call | json | label | text).

Every metric compares a *prediction* with a *reference*, both OpenAI assistant messages
(``{"content": ..., "tool_calls": [...]}``): the reference is the LLM's recorded answer, the prediction the
small model's answer parsed back into the same form. A metric works on whole lists so that batched metrics
(embeddings, an LLM judge) fit the same interface; it returns one score in [0, 1] per item, or ``None`` where
the item is outside the metric's scope (e.g. argument F1 when the reference answered in text). ``score``
averages the non-None values.

Built-ins register through ``register_metric`` exactly as third-party metrics do::

    @register_metric("json", "my_metric")
    def my_metric(preds, refs, ctx): return [...]

Each kind names one primary metric: the one the migration decision is taken on.

Comparison rules for structured values (tool-call arguments, JSON answers), documented in docs/evaluate.md:
key order and formatting never matter; numbers compare by value (``1 == 1.0``); booleans are not numbers
(``true != 1``); a string never equals a number (``"1" != 1``), because the tool's schema fixes the type and a
tool receiving ``"1"`` where it expects an integer may reject it.
"""

from __future__ import annotations

import json
import math
import re
import unicodedata
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from slmigrate.chat_format import message_text
from slmigrate.errors import SlmigrateError

KINDS = ("tool_call", "json", "label", "text")

Message = dict[str, Any]
MetricFn = Callable[[Sequence[Message | None], Sequence[Message | None], "MetricContext"], list[float | None]]


@dataclass
class MetricContext:
    """What some metrics need beyond the two answers: the requests (offered tools, the prompt for a judge),
    an embedder (anything with ``encode(texts) -> L2-normalised np.ndarray``) and an optional ``Judge``."""

    requests: Sequence[dict[str, Any]] | None = None
    embedder: Any = None
    judge: Any = None


@dataclass
class Metric:
    kind: str
    name: str
    fn: MetricFn
    description: str = ""
    needs: tuple[str, ...] = ()  # context fields without which the metric is skipped ("embedder", "judge")


_REGISTRY: dict[str, dict[str, Metric]] = {k: {} for k in KINDS}
_PRIMARY: dict[str, str] = {}


def register_metric(kind: str, name: str, *, primary: bool = False, description: str = "",
                    needs: tuple[str, ...] = ()) -> Callable[[MetricFn], MetricFn]:
    """Decorator: add a metric for ``kind`` (a new kind is created on first use)."""

    def wrap(fn: MetricFn) -> MetricFn:
        _REGISTRY.setdefault(kind, {})[name] = Metric(kind, name, fn, description or (fn.__doc__ or "").strip(),
                                                      needs)
        if primary:
            _PRIMARY[kind] = name
        return fn

    return wrap


def metrics_for(kind: str) -> dict[str, Metric]:
    if kind not in _REGISTRY:
        raise SlmigrateError(f"unknown output kind {kind!r}; expected one of {', '.join(_REGISTRY)}")
    return dict(_REGISTRY[kind])


def primary_metric(kind: str, overrides: dict[str, str] | None = None) -> str:
    name = (overrides or {}).get(kind) or _PRIMARY.get(kind)
    if name is None or name not in metrics_for(kind):
        raise SlmigrateError(f"no primary metric {name!r} for output kind {kind!r}; pick one of "
                             f"{', '.join(metrics_for(kind))} (evaluate.primary in slmigrate.toml)")
    return name


@dataclass
class Scores:
    """Mean per metric over the items in its scope, plus the per-item scores (for inspection and refine)."""

    means: dict[str, float | None] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    items: dict[str, list[float | None]] = field(default_factory=dict)


def score(kind: str, predictions: Sequence[Message | None], references: Sequence[Message | None],
          ctx: MetricContext | None = None, only: Sequence[str] | None = None) -> Scores:
    """Run every metric registered for ``kind`` (or ``only`` those) whose needs the context meets."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    ctx = ctx or MetricContext()
    out = Scores()
    for name, metric in metrics_for(kind).items():
        if only is not None and name not in only:
            continue
        if any(getattr(ctx, need) is None for need in metric.needs):
            continue
        values = metric.fn(predictions, references, ctx)
        scoped = [v for v in values if v is not None]
        out.items[name] = values
        out.counts[name] = len(scoped)
        out.means[name] = sum(scoped) / len(scoped) if scoped else None
    return out


# --- structured values -------------------------------------------------------------------------------------

def normalise_value(value: Any) -> Any:
    """The canonical form that equality is taken on: integral floats become ints, containers recurse."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, float):
        return int(value) if math.isfinite(value) and value.is_integer() else value
    if isinstance(value, dict):
        return {str(k): normalise_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [normalise_value(v) for v in value]
    return value


def canonical(value: Any) -> str:
    # json.dumps keeps true/1 and "1"/1 apart, which is exactly the type strictness we want.
    return json.dumps(normalise_value(value), sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def values_equal(a: Any, b: Any) -> bool:
    return canonical(a) == canonical(b)


_FENCE = re.compile(r"^\s*```[a-zA-Z0-9_-]*\s*\n?(.*?)\n?\s*```\s*$", re.S)
_MISSING = object()


def parse_json_text(text: str | None) -> Any:
    """JSON from an answer's text, allowing a surrounding Markdown code fence; ``_MISSING`` when it fails."""
    if text is None:
        return _MISSING
    m = _FENCE.match(text)
    body = m.group(1) if m else text
    try:
        return json.loads(body)
    except (json.JSONDecodeError, TypeError):
        return _MISSING


# --- tool calls --------------------------------------------------------------------------------------------

@dataclass
class _Call:
    name: str
    args: Any  # a dict when the arguments parsed as a JSON object, else _MISSING


def _calls(msg: Message | None) -> list[_Call]:
    out = []
    for tc in (msg or {}).get("tool_calls") or []:
        fn = (tc or {}).get("function") or {}
        raw = fn.get("arguments")
        if isinstance(raw, dict):
            args = raw
        elif raw is None or (isinstance(raw, str) and not raw.strip()):
            args = {}  # an empty argument string is how OpenAI encodes a call without arguments
        else:
            args = parse_json_text(raw) if isinstance(raw, str) else _MISSING
            if not isinstance(args, dict):
                args = _MISSING
        out.append(_Call(str(fn.get("name") or ""), args))
    return out


def _offered(request: dict[str, Any] | None) -> set[str] | None:
    if not request or not request.get("tools"):
        return None
    names = set()
    for tool in request["tools"]:
        fn = tool.get("function") if isinstance(tool, dict) and "function" in tool else tool
        if isinstance(fn, dict) and fn.get("name"):
            names.add(fn["name"])
    return names or None


def _request(ctx: MetricContext, i: int) -> dict[str, Any] | None:
    return ctx.requests[i] if ctx.requests is not None and i < len(ctx.requests) else None


def _call_key(c: _Call, with_args: bool) -> str:
    if not with_args:
        return c.name
    return c.name + "\x00" + (canonical(c.args) if c.args is not _MISSING else "\x00invalid")


def _same_calls(pred: list[_Call], ref: list[_Call], with_args: bool) -> bool:
    # Parallel calls compare as a multiset: the order an LLM lists independent calls in carries no meaning.
    if any(c.args is _MISSING for c in pred) and with_args:
        return False
    return Counter(_call_key(c, with_args) for c in pred) == Counter(_call_key(c, with_args) for c in ref)


@register_metric("tool_call", "valid_call", description=(
    "Reference calls a tool and the answer is a well-formed call: arguments a JSON object, name among the "
    "offered tools (when the request lists them)."))
def valid_call(preds, refs, ctx):
    out: list[float | None] = []
    for i, (p, r) in enumerate(zip(preds, refs)):
        if not _calls(r):
            out.append(None)
            continue
        calls = _calls(p)
        offered = _offered(_request(ctx, i))
        ok = bool(calls) and all(c.args is not _MISSING and c.name and (offered is None or c.name in offered)
                                 for c in calls)
        out.append(float(ok))
    return out


@register_metric("tool_call", "tool_choice", description=(
    "Right choice between calling a tool and answering in text."))
def tool_choice(preds, refs, ctx):
    return [float(bool(_calls(p)) == bool(_calls(r))) for p, r in zip(preds, refs)]


def _call_match(preds, refs, with_args: bool) -> list[float | None]:
    out: list[float | None] = []
    for p, r in zip(preds, refs):
        pc, rc = _calls(p), _calls(r)
        if not rc:
            # A text reference is matched by a text answer; its wording is for the text metrics to judge.
            out.append(float(not pc))
        else:
            out.append(float(_same_calls(pc, rc, with_args)))
    return out


@register_metric("tool_call", "name_accuracy", description=(
    "Same function names as the reference (as a multiset); a text reference needs a text answer."))
def name_accuracy(preds, refs, ctx):
    return _call_match(preds, refs, with_args=False)


@register_metric("tool_call", "exact", primary=True, description=(
    "Same names and arguments (parsed JSON, key order and formatting ignored, 1 == 1.0, \"1\" != 1); "
    "a text reference needs a text answer."))
def call_exact(preds, refs, ctx):
    return _call_match(preds, refs, with_args=True)


def _arg_items(calls: list[_Call]) -> Counter:
    items: Counter = Counter()
    for c in calls:
        if c.args is _MISSING:
            continue
        for k, v in c.args.items():
            items[(c.name, k, canonical(v))] += 1
    return items


def f1(pred: Counter, ref: Counter) -> float:
    if not pred and not ref:
        return 1.0
    hit = sum((pred & ref).values())
    if hit == 0:
        return 0.0
    precision, recall = hit / sum(pred.values()), hit / sum(ref.values())
    return 2 * precision * recall / (precision + recall)


@register_metric("tool_call", "argument_f1", description=(
    "F1 over (function, argument, value) triples, for references that call a tool; partial credit."))
def argument_f1(preds, refs, ctx):
    out: list[float | None] = []
    for p, r in zip(preds, refs):
        rc = _calls(r)
        if not rc:
            out.append(None)
            continue
        pc = _calls(p)
        if not pc:
            out.append(0.0)
            continue
        ref_items, pred_items = _arg_items(rc), _arg_items(pc)
        if not ref_items and not pred_items:
            # Calls without arguments: argument F1 reduces to whether the right functions were called.
            out.append(float(_same_calls(pc, rc, with_args=False)))
        else:
            out.append(f1(pred_items, ref_items))
    return out


# --- JSON --------------------------------------------------------------------------------------------------

def _flatten(value: Any, prefix: str = "") -> dict[str, str]:
    """Leaf paths -> canonical values; empty containers are leaves so that {} vs {"a": 1} still differ."""
    if isinstance(value, dict) and value:
        out: dict[str, str] = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    if isinstance(value, list) and value:
        out = {}
        for i, v in enumerate(value):
            out.update(_flatten(v, f"{prefix}[{i}]"))
        return out
    return {prefix: canonical(value)}


@register_metric("json", "json_valid", description="The answer parses as JSON (a Markdown code fence is allowed).")
def json_valid(preds, refs, ctx):
    return [float(parse_json_text(message_text(p)) is not _MISSING) for p in preds]


def _json_scores(preds, refs, score: Callable[[Any, Any], float]) -> list[float | None]:
    """``score(pred, ref)`` per pair whose reference parses as JSON (None otherwise); ``pred`` may be _MISSING."""
    out: list[float | None] = []
    for p, r in zip(preds, refs):
        ref = parse_json_text(message_text(r))
        out.append(None if ref is _MISSING else score(parse_json_text(message_text(p)), ref))
    return out


def _same_keys(pred: Any, ref: Any) -> float:
    if isinstance(ref, dict):
        return float(isinstance(pred, dict) and set(pred) == set(ref))
    return float(pred is not _MISSING and type(normalise_value(pred)) is type(normalise_value(ref)))


def _field_accuracy(pred: Any, ref: Any) -> float:
    if pred is _MISSING:
        return 0.0
    rf, pf = _flatten(ref), _flatten(pred)
    paths = set(rf) | set(pf)
    return sum(1 for k in paths if rf.get(k) is not None and rf.get(k) == pf.get(k)) / len(paths)


@register_metric("json", "same_keys", description=(
    "Same top-level keys as the reference object (for non-objects: same JSON type)."))
def same_keys(preds, refs, ctx):
    return _json_scores(preds, refs, _same_keys)


@register_metric("json", "json_exact", primary=True, description=(
    "The parsed answer equals the reference (key order and formatting ignored, 1 == 1.0, \"1\" != 1)."))
def json_exact(preds, refs, ctx):
    return _json_scores(preds, refs, lambda pred, ref: float(pred is not _MISSING and values_equal(pred, ref)))


@register_metric("json", "field_accuracy", description=(
    "Share of leaf fields (union of both answers' paths) holding the same value; extra or missing fields "
    "count against it."))
def field_accuracy(preds, refs, ctx):
    return _json_scores(preds, refs, _field_accuracy)


# --- short labels ------------------------------------------------------------------------------------------

def normalise_label(text: str) -> str:
    """Case, Unicode form, surrounding whitespace/quotes/punctuation and inner runs of spaces don't matter."""
    text = unicodedata.normalize("NFKC", text).casefold().strip()
    text = text.strip(" \t\n\r\"'`.,;:!?()[]{}")
    return re.sub(r"\s+", " ", text)


@register_metric("label", "label_exact", primary=True, description="Normalised exact match of the label.")
def label_exact(preds, refs, ctx):
    return [float(normalise_label(message_text(p)) == normalise_label(message_text(r))) for p, r in zip(preds, refs)]


# --- free text ---------------------------------------------------------------------------------------------

_TOKEN = re.compile(r"\w+", re.UNICODE)


def tokens(text: str) -> list[str]:
    return _TOKEN.findall(unicodedata.normalize("NFKC", text).casefold())


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Longest common subsequence by dynamic programming over one row (O(len(a) * len(b)) time)."""
    if len(a) < len(b):
        a, b = b, a
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 (beta = 1) over lower-cased word tokens; two empty texts score 1."""
    p, r = tokens(prediction), tokens(reference)
    if not p and not r:
        return 1.0
    if not p or not r:
        return 0.0
    lcs = lcs_length(p, r)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(p), lcs / len(r)
    return 2 * precision * recall / (precision + recall)


@register_metric("text", "rouge_l", primary=True, description="ROUGE-L F1 (longest common word subsequence).")
def rouge_l_metric(preds, refs, ctx):
    return [rouge_l(message_text(p), message_text(r)) for p, r in zip(preds, refs)]


@register_metric("text", "embedding_similarity", needs=("embedder",), description=(
    "Cosine similarity of sentence embeddings (all-MiniLM-L6-v2 by default), clipped to [0, 1]."))
def embedding_similarity(preds, refs, ctx):
    import numpy as np

    p_texts, r_texts = [message_text(p) for p in preds], [message_text(r) for r in refs]
    if not p_texts:
        return []
    # One encode call for both sides: embedders batch, and each distinct text is embedded once.
    distinct = sorted(set(p_texts) | set(r_texts))
    vecs = np.asarray(ctx.embedder.encode(distinct), dtype=float)
    index = {t: i for i, t in enumerate(distinct)}
    out: list[float | None] = []
    for p, r in zip(p_texts, r_texts):
        if not p.strip() and not r.strip():
            out.append(1.0)
        elif not p.strip() or not r.strip():
            out.append(0.0)
        else:
            out.append(float(min(1.0, max(0.0, vecs[index[p]] @ vecs[index[r]]))))
    return out


@register_metric("text", "judge", needs=("judge",), description=(
    "An LLM judge: rubric score scaled to [0, 1], or pairwise preference vs the reference (0.5 = as good)."))
def judge_metric(preds, refs, ctx):
    return ctx.judge.score([message_text(p) for p in preds], [message_text(r) for r in refs],
                           [_request(ctx, i) for i in range(len(preds))])
