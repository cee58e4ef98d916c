"""The task view of a call: the few parts of a request/response that say *which job* the call does.

A call's task is set by its instructions (system prompt), the tools it may use, the turn it answers (the latest
user message or tool result) and the shape of what it produced (which tool it called, which JSON keys, a short
label or free text). Names, numbers and ids inside those parts vary from call to call without changing the task,
so digits are masked: this makes more views identical, which both sharpens clusters and lets the embedder skip
repeats. Metadata (agent tags, task tags, domains) is deliberately not part of the view.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from slmigrate.chat_format import message_text
from slmigrate.record import CallRecord

OUTPUT_KINDS = ("tool_call", "json", "label", "text")
# Chunks of a long system prompt are embedded separately and averaged, so a prompt whose task-defining part sits
# at the end (a scenario after generic guidelines) is still told apart from its siblings.
SYSTEM_CHUNK_CHARS = 480
SYSTEM_MAX_CHUNKS = 48
TURN_CHARS = 320
LABEL_MAX_WORDS = 4

_DIGITS = re.compile(r"\d+")
_HEXISH = re.compile(r"\b(?=[0-9a-f]*\d)[0-9a-f]{12,}\b", re.IGNORECASE)
_SPACE = re.compile(r"\s+")


def mask(text: str) -> str:
    """Collapse the parts of a text that vary per call (numbers, hex ids, whitespace)."""
    text = _HEXISH.sub("<id>", text)
    text = _DIGITS.sub("0", text)
    return _SPACE.sub(" ", text).strip()


# System prompts repeat across thousands of calls and can be tens of kilobytes: mask and hash each distinct one once.
_mask_system = lru_cache(maxsize=4096)(mask)


def digest64(text: str) -> int:
    """A 64-bit content hash (stable across processes and machines, unlike ``hash()``)."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "big")


@lru_cache(maxsize=4096)
def _instructions_digest(text: str) -> int:
    return digest64(text) if text else 0


def view_text(message: dict[str, Any]) -> str:
    """A message's content as the view sees it: parts joined by spaces, an image or audio part named
    (``[image_url]``). Views feed fingerprints and embedding caches, so this rule must not change."""
    return message_text(message, sep=" ", other_parts="name")


@dataclass(frozen=True)
class TaskView:
    system_chunks: tuple[str, ...]
    tools: str
    turn: str
    answer: str
    kind: str  # output kind of this call's answer
    tool_name: str | None  # the first tool called, if any
    # Content hash of the call's instructions (system prompt, else leading user message: ``instruction_text``),
    # whose template forms tasks before the embedding (templates.py); not embedded itself.
    instructions: int = 0

    def text(self) -> str:
        """One readable string (for keywords and for showing a representative call)."""
        system = " ".join(self.system_chunks)[:400]
        return f"{system} | {self.tools} | {self.turn} | {self.answer}"


def system_prompt(messages: list[dict[str, Any]]) -> str:
    """The leading system/developer messages (the agent's instructions for this call)."""
    parts = []
    for message in messages:
        if message.get("role") in ("system", "developer"):
            parts.append(view_text(message))
        else:
            break
    return "\n".join(p for p in parts if p)


def instruction_text(messages: list[dict[str, Any]]) -> tuple[str, bool]:
    """(the call's instructions, whether they come from user content): the system prompt, or, when there is
    none, the leading user message - where agents such as MetaGPT or ReAct prompts put their template."""
    system = system_prompt(messages)
    if system:
        return system, False
    for message in messages:
        if message.get("role") == "user":
            return view_text(message), True
    return "", False


def latest_turn(messages: list[dict[str, Any]]) -> str:
    """The latest user message or tool result, which is what this call responds to."""
    for message in reversed(messages):
        role = message.get("role")
        if role in ("user", "tool", "function"):
            label = "user" if role == "user" else "tool result"
            return f"{label}: {view_text(message)}"
    return "no user turn"


def output_kind(message: dict[str, Any] | None) -> str:
    """tool_call | json | label (a few words, no sentence) | text."""
    if not message:
        return "text"
    if message.get("tool_calls") or message.get("function_call"):
        return "tool_call"
    text = view_text(message).strip()
    if _json_value(text) is not None:
        return "json"
    words = text.split()
    if 0 < len(words) <= LABEL_MAX_WORDS and not re.search(r"[.!?]\s*$", text) and "\n" not in text:
        return "label"
    return "text"


def _json_value(text: str) -> Any:
    stripped = text.strip()
    if stripped.startswith("```"):
        stripped = stripped.strip("`")
        stripped = (stripped[4:] if stripped.lower().startswith("json") else stripped).strip()
    if not stripped or stripped[0] not in "[{":
        return None
    try:
        return json.loads(stripped)
    except ValueError:
        return None


def answer_shape(message: dict[str, Any] | None) -> tuple[str, str, str | None]:
    """(shape text, output kind, tool name): what the call produced, without its particular values."""
    kind = output_kind(message)
    if message is None:
        return "no answer (failed call)", kind, None
    if kind == "tool_call":
        calls = message.get("tool_calls") or [{"function": message.get("function_call") or {}}]
        described = []
        for call in calls:
            fn = call.get("function") or {}
            try:
                keys = sorted(json.loads(fn.get("arguments") or "{}"))
            except (ValueError, TypeError):
                keys = []
            described.append(f"{fn.get('name') or '?'}({', '.join(map(str, keys))})")
        first = (calls[0].get("function") or {}).get("name")
        return "calls tool " + "; ".join(described), kind, first
    text = view_text(message)
    if kind == "json":
        value = _json_value(text)
        if isinstance(value, dict):
            return "JSON object with keys " + ", ".join(sorted(map(str, value))), kind, None
        return "JSON array", kind, None
    if kind == "label":
        return "short label answer", kind, None
    return "free-text reply", kind, None


@lru_cache(maxsize=4096)
def system_chunks(masked_system: str) -> tuple[str, ...]:
    """The embedded chunks of a masked system prompt; cached so every call with the same prompt shares one tuple
    (cheap to hash and compare when a million calls are grouped by view)."""
    return tuple(masked_system[i:i + SYSTEM_CHUNK_CHARS] for i in
                 range(0, min(len(masked_system), SYSTEM_CHUNK_CHARS * SYSTEM_MAX_CHUNKS), SYSTEM_CHUNK_CHARS))


def task_view(call: CallRecord) -> TaskView:
    messages = call.messages
    instructions = instruction_text(messages)[0]
    chunks = system_chunks(_mask_system(system_prompt(messages)))
    names = sorted({(t.get("function") or {}).get("name") or t.get("name") or "?" for t in call.tools})
    tools = ("tools offered: " + ", ".join(names)) if names else "no tools offered"
    shape, kind, tool_name = answer_shape(call.answer)
    return TaskView(
        system_chunks=chunks or ("no system prompt",),
        tools=tools,
        turn=mask(latest_turn(messages))[:TURN_CHARS],
        answer=shape,
        kind=kind,
        tool_name=tool_name,
        instructions=_instructions_digest(instructions),
    )


def next_action(call: CallRecord) -> str:
    """What the model did: the tool it called, or ``text`` (used to score fine clusters)."""
    shape = answer_shape(call.answer)
    return shape[2] or "text"
