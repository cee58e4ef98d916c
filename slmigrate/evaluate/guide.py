"""Tool calls decoded inside the request's own tool schemas (llguidance).

A small model that learned the ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` format still
slips on what the request already says: a function that is not offered, an argument key that is not in the
function's schema, a string where the schema wants a number, a missing required argument, an unclosed brace.
Each slip costs a whole call in ``exact``. The request carries the JSON Schema of every tool it offers, so the
decoder can rule those slips out: at each step only tokens that keep the answer inside the grammar

    answer := TEXT | call ("\\n" call)*        (TEXT: plain content that does not start with "<tool_call>")
    call   := "<tool_call>" {"name": <one offered name>, "arguments": <that tool's parameters>} "</tool_call>"

are allowed, and the model's greedy choice among them is taken. Keys and separators are written exactly as
``chat_format.serialise_answer`` writes them (``", "``, ``": "``), so a constrained answer is tokenised as the
training answers were. Plain text stays free: ``tool_choice="required"`` (or a named function) drops the TEXT
branch, ``"none"`` turns the guide off.

The masks come from llguidance (guidance-ai's Rust grammar engine, also behind vLLM's and llama.cpp's structured
output; llama.cpp's docs quote ~50 us per mask for a 128k vocabulary), against tens of milliseconds per forward
pass here; building a request's grammar took a median 2 ms for SmolLM2's tokenizer (BFCL's 600 tool sets).
Most steps need no mask at all: the model's own argmax is checked first, and the full mask is computed only
when that token is ruled out.
Forced stretches (the scaffolding, a key once its first letters are written) come back from
:meth:`Guide.forced` and are fed as a draft, so they cost no forward pass of their own.

A schema llguidance cannot compile (or a tokenizer it cannot read) leaves that request unconstrained - the
guide is an aid, never a reason to fail a call.
"""

from __future__ import annotations

import json
import logging
import weakref
from collections.abc import Iterable
from typing import Any

from slmigrate import chat_format

log = logging.getLogger(__name__)

# The separators chat_format.serialise_answer writes (json.dumps defaults); no other whitespace.
_JSON_OPTIONS = {"item_separator": ", ", "key_separator": ": ", "whitespace_flexible": False, "lenient": True}
_TOKENIZERS: "weakref.WeakKeyDictionary[Any, dict[tuple[int, ...], Any]]" = weakref.WeakKeyDictionary()


def grammar(tools: list[dict[str, Any]], tool_choice: Any = None) -> str | None:
    """The Lark grammar (llguidance dialect) of answers to a request offering ``tools``; None when unconstrained."""
    if not tools or tool_choice == "none":
        return None
    named = (tool_choice or {}).get("function", {}).get("name") if isinstance(tool_choice, dict) else None
    alternatives = []
    for tool in tools:
        fn = (tool or {}).get("function") or {}
        name = fn.get("name")
        if not isinstance(name, str) or (named and name != named):
            continue
        params = fn.get("parameters")
        params = dict(params) if isinstance(params, dict) and params else {"type": "object"}
        params.setdefault("type", "object")
        # JSON Schema lets an object carry keys it does not list; a tool call with an argument its function
        # does not take is a wrong call (OpenAI's strict mode and BFCL's checker say the same)
        params.setdefault("additionalProperties", False)
        alternatives.append({"type": "object", "properties": {"name": {"const": name}, "arguments": params},
                             "required": ["name", "arguments"], "additionalProperties": False})
    if not alternatives:
        return None
    schema: dict[str, Any] = {"anyOf": alternatives} if len(alternatives) > 1 else alternatives[0]
    schema["x-guidance"] = _JSON_OPTIONS
    text_allowed = tool_choice in (None, "auto")
    return "\n".join([
        "start: " + ("calls | TEXT" if text_allowed else "calls"),
        'calls: call ("\\n" call)*',
        'call: "<tool_call>" body "</tool_call>"',
        "body: %json " + json.dumps(schema, ensure_ascii=False),
        *([f"TEXT: /{_not_starting_with(chat_format.TOOL_CALL_OPEN)}/"] if text_allowed else []),
    ])


def _not_starting_with(prefix: str) -> str:
    """A regex (Rust syntax, no look-ahead there) of the non-empty texts that do not start with ``prefix``:
    a plain answer may start with anything, even "<", as long as it is not the start of a tool call."""
    def lit(ch: str) -> str:
        return ch if ch.isalnum() else f"\\x{{{ord(ch):X}}}"

    heads = ["".join(lit(c) for c in prefix[:i]) for i in range(len(prefix))]
    branches = [head + f"[^{lit(prefix[i])}]" for i, head in enumerate(heads)]
    return "(" + "|".join(branches) + ")[\\s\\S]*|" + "|".join(h for h in heads if h)  # or a bare "<too"


def _ll_tokenizer(tokenizer: Any, stops: Iterable[int]) -> Any:
    """llguidance's view of ``tokenizer`` with ``stops`` as end tokens (built once: it takes about a second)."""
    import llguidance.hf

    key = tuple(sorted(stops))
    per_stops = _TOKENIZERS.setdefault(tokenizer, {})
    if key not in per_stops:
        per_stops[key] = llguidance.hf.from_tokenizer(tokenizer, eos_token=list(key) or None)
    return per_stops[key]


class Guide:
    """The grammar state of one answer being decoded: which next tokens keep it valid."""

    def __init__(self, matcher: Any):
        self._matcher = matcher

    @classmethod
    def for_request(cls, tokenizer: Any, request: dict[str, Any], stops: Iterable[int]) -> "Guide | None":
        """A guide for ``request``'s tool calls, or None (no tools, ``tool_choice="none"``, or a schema
        llguidance cannot compile)."""
        lark = grammar(list(request.get("tools") or []), request.get("tool_choice"))
        if lark is None:
            return None
        try:
            import llguidance

            ll = _ll_tokenizer(tokenizer, stops)
            matcher = llguidance.LLMatcher(ll, llguidance.LLMatcher.grammar_from_lark(lark), log_level=0)
        except Exception as exc:  # noqa: BLE001 - a tokenizer llguidance cannot read: decode unconstrained
            log.debug("no tool-call guide: %s", exc)
            return None
        if matcher.is_error():
            log.debug("no tool-call guide: %s", matcher.get_error())
            return None
        return cls(matcher)

    @property
    def active(self) -> bool:
        return not (self._matcher.is_error() or self._matcher.is_stopped())

    def allows(self, token: int) -> bool:
        """Whether ``token`` may come next (anything may, once the guide is inactive)."""
        return not self.active or self._matcher.validate_tokens([int(token)]) == 1

    def pick(self, logits: Any) -> int:
        """The highest-scoring allowed token of a 1-D ``logits`` row (the plain argmax once inactive)."""
        best = int(logits.argmax())
        if self.allows(best):
            return best
        allowed = self._allowed(logits)
        return best if allowed is None else int(logits.masked_fill(~allowed, float("-inf")).argmax())

    def mask(self, logits: Any) -> None:
        """Rule out, in place, every token of a 1-D ``logits`` row the grammar does not allow next."""
        allowed = self._allowed(logits) if self.active else None
        if allowed is not None:
            logits.masked_fill_(~allowed, float("-inf"))

    def _allowed(self, logits: Any) -> Any:
        """A boolean row shaped like ``logits``: the tokens the grammar allows next (None when none is: the
        guide then stands aside rather than leave the model no token). Rows wider than the tokenizer's
        vocabulary (padded embedding matrices) have their padding ruled out."""
        import torch

        bias = torch.frombuffer(bytearray(self._matcher.compute_logit_bias()), dtype=torch.uint8) > 0
        allowed = torch.zeros(logits.shape[-1], dtype=torch.bool)
        n = min(bias.shape[0], allowed.shape[0])
        allowed[:n] = bias[:n]
        return allowed.to(logits.device) if bool(allowed.any()) else None

    def advance(self, token: int) -> None:
        """Record that ``token`` was generated (a token the grammar rules out ends the guidance)."""
        if self.active:
            self._matcher.consume_token(int(token))

    def forced(self, limit: int) -> list[int]:
        """Up to ``limit`` tokens the grammar forces next (scaffolding, the rest of a unique key)."""
        if not self.active or limit < 1:
            return []
        return list(self._matcher.compute_ff_tokens())[:limit]
