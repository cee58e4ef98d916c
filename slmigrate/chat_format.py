"""How a logged call becomes model text and back: shared by finetune, evaluate and the router.

Three jobs, all driven by the model's own chat template:

* ``render_prompt(tokenizer, messages, tools)`` -> the prompt text the small model sees, ending with the
  template's generation prompt. Tools go through the template when it supports them (``tools=`` of
  ``apply_chat_template``); otherwise they are described in the system message in the text form below.
* ``serialise_answer(message)`` -> the text the small model must learn to produce for an assistant message.
* ``parse_answer(text)`` -> the OpenAI assistant message that text stands for (the inverse of the above).

The answer format. Plain text and JSON answers are their content, verbatim. A tool call is one line::

    <tool_call>{"name": "get_order", "arguments": {"order_id": "#W123"}}</tool_call>

one line per call, after any text content. This is the Hermes/Qwen convention, so templates that render tool
calls natively (Qwen2.5, SmolLM3, Hermes) see the same shape in history as in answers. ``parse_answer`` turns
the lines back into OpenAI ``tool_calls`` with JSON-string ``arguments``.

The text form of tools (templates without tool support, e.g. SmolLM2): appended to the system message::

    # Tools
    You may call these functions. To call one, answer with one line per call:
    <tool_call>{"name": <function name>, "arguments": <JSON object>}</tool_call>
    {"name": "get_order", "description": "...", "parameters": {...}}     <- one JSON line per tool

Over-long prompts (``max_tokens``) lose whole old turns first - never the system message's start, never the
latest user turn and what follows it; only if that is still too long is the system message's tail cut.
``Rendered`` says how many messages and characters were cut.

Static prompt pruning: the calls of one task usually share a long, fixed system prompt, and an agent's tool
step offers the same tool schemas on every call. ``StaticPrompt.of(calls)`` finds both (``static_prefix``,
``static_tools``) and ``apply`` drops them, so a specialist trained without them needs far fewer input tokens
per call; evaluation and the router apply the same ``StaticPrompt`` (saved next to the adapter) before rendering.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

Message = dict[str, Any]
OtherParts = Literal["drop", "name", "json"]

TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"
TOOLS_HEADER = (
    "# Tools\n"
    "You may call these functions. To call one, answer with one line per call:\n"
    '<tool_call>{"name": <function name>, "arguments": <JSON object>}</tool_call>'
)
# Prefixes shorter than this are not worth a separate code path at serving time.
MIN_PREFIX_CHARS = 64


# --- messages -------------------------------------------------------------------------------------------

def message_text(message: Message | None, *, sep: str = "", other_parts: OtherParts = "drop") -> str:
    """The text of a message's content, the one place content becomes text.

    A string is itself; None (or no message) is ""; a list of OpenAI content parts is the parts' text joined by
    ``sep`` - a part's text is its ``text`` (or ``input_text``), a bare string part is itself; any other value
    is JSON. Tool calls, names and refusals are not content: callers that want them add them.

    ``other_parts`` is what becomes of a part without text (an image, audio, a refusal part):

    * ``"drop"``: left out - the text a model reads and writes (prompts, answers, metrics, the judge, curate);
    * ``"name"``: shown as ``[image_url]`` - the cluster view, where an image in the turn says something about
      the task (with ``sep=" "``; both feed view fingerprints and embedding caches, so they must not change);
    * ``"json"``: kept as JSON - token counts, since a part is sent and paid for whether or not it is text.
    """
    content = (message or {}).get("content")
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = (_part_text(part, other_parts) for part in content)
        return sep.join(t for t in texts if t is not None)
    return json.dumps(content, ensure_ascii=False, default=str)


def _part_text(part: Any, other_parts: OtherParts) -> str | None:
    """One content part's text, or None when it is dropped."""
    if isinstance(part, str):
        return part
    if isinstance(part, dict):
        # An empty text counts as no text: the cluster view has always named such a part "[text]".
        text = part.get("text") or part.get("input_text")
        if text:
            return str(text)
    if other_parts == "name":
        return f"[{part.get('type', 'part')}]" if isinstance(part, dict) else str(part)
    if other_parts == "json":
        return json.dumps(part, ensure_ascii=False, default=str)
    return None


def _arguments_object(arguments: Any) -> Any:
    """Tool-call arguments as a JSON value (they are stored as JSON strings); unparseable text stays text."""
    if isinstance(arguments, str):
        try:
            return json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError:
            return arguments
    return {} if arguments is None else arguments


def serialise_answer(message: Message | None) -> str:
    """The text a model should produce for this assistant message: its content, then one line per tool call."""
    if not message:
        return ""
    parts = []
    content = message_text(message).strip()
    if content:
        parts.append(content)
    for call in message.get("tool_calls") or []:
        fn = call.get("function") or {}
        body = {"name": fn.get("name", ""), "arguments": _arguments_object(fn.get("arguments"))}
        parts.append(TOOL_CALL_OPEN + json.dumps(body, ensure_ascii=False) + TOOL_CALL_CLOSE)
    # Legacy single function_call (pre-tools OpenAI format).
    legacy = message.get("function_call")
    if legacy and not message.get("tool_calls"):
        body = {"name": legacy.get("name", ""), "arguments": _arguments_object(legacy.get("arguments"))}
        parts.append(TOOL_CALL_OPEN + json.dumps(body, ensure_ascii=False) + TOOL_CALL_CLOSE)
    return "\n".join(parts)


def parse_answer(text: str) -> Message:
    """A model's output as an OpenAI assistant message (``tool_calls`` with JSON-string arguments).

    A ``<tool_call>`` whose JSON does not parse stays in the content, so a broken call is visible as text
    rather than silently dropped. A missing closing tag (output cut at max_new_tokens) is tolerated.
    """
    decoder = json.JSONDecoder()
    calls: list[Message] = []
    kept: list[str] = []
    pos = 0
    while True:
        start = text.find(TOOL_CALL_OPEN, pos)
        if start < 0:
            kept.append(text[pos:])
            break
        kept.append(text[pos:start])
        body_start = start + len(TOOL_CALL_OPEN)
        stripped = len(text[body_start:]) - len(text[body_start:].lstrip())
        try:
            body, end = decoder.raw_decode(text, body_start + stripped)
        except json.JSONDecodeError:
            body, end = None, -1
        if not isinstance(body, dict) or not isinstance(body.get("name"), str):
            close = text.find(TOOL_CALL_CLOSE, body_start)
            stop = len(text) if close < 0 else close + len(TOOL_CALL_CLOSE)
            kept.append(text[start:stop])
            pos = stop
            continue
        arguments = body.get("arguments", body.get("parameters", {}))
        calls.append({
            "id": f"call_{len(calls)}", "type": "function",
            "function": {"name": body["name"], "arguments": json.dumps(arguments, ensure_ascii=False)},
        })
        rest = text[end:]
        after = len(rest) - len(rest.lstrip())
        pos = end + after + (len(TOOL_CALL_CLOSE) if rest.lstrip().startswith(TOOL_CALL_CLOSE) else 0)
    content = "".join(kept).strip()
    message: Message = {"role": "assistant", "content": content or (None if calls else "")}
    if calls:
        message["tool_calls"] = calls
    return message


# --- tools ----------------------------------------------------------------------------------------------

def template_supports_tools(tokenizer) -> bool:
    """Whether the tokenizer's chat template renders a ``tools`` argument (Qwen2.5, Llama 3.x, ... do)."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("tool_use") or template.get("default")
    return isinstance(template, str) and "tools" in template


def tools_text(tools: list[Message]) -> str:
    """The documented text form of tools, for templates without tool support."""
    lines = [TOOLS_HEADER]
    for tool in tools:
        fn = tool.get("function", tool)
        spec = {"name": fn.get("name"), "description": fn.get("description", ""),
                "parameters": fn.get("parameters", {})}
        lines.append(json.dumps(spec, ensure_ascii=False))
    return "\n".join(lines)


def _plain_messages(messages: list[Message], tools: list[Message], native_tools: bool) -> list[Message]:
    """Messages every template can render: string content; tool calls as text unless rendered natively."""
    out: list[Message] = []
    for msg in messages:
        role = msg.get("role", "user")
        if role == "developer":  # OpenAI's newer name for the system role
            role = "system"
        if role == "function":  # legacy function result
            role = "tool"
        item: Message = {"role": role, "content": message_text(msg)}
        if role == "assistant" and (msg.get("tool_calls") or msg.get("function_call")):
            if native_tools and msg.get("tool_calls"):
                item["tool_calls"] = [
                    {"type": "function", "id": c.get("id"),
                     "function": {"name": (c.get("function") or {}).get("name", ""),
                                  "arguments": _arguments_object((c.get("function") or {}).get("arguments"))}}
                    for c in msg["tool_calls"]
                ]
            else:
                item["content"] = serialise_answer(msg)
        if role == "tool" and msg.get("tool_call_id"):
            item["tool_call_id"] = msg["tool_call_id"]
        out.append(item)
    if tools and not native_tools:
        text = tools_text(tools)
        if out and out[0]["role"] == "system":
            out[0] = {**out[0], "content": (out[0]["content"].rstrip() + "\n\n" + text).lstrip()}
        else:
            out.insert(0, {"role": "system", "content": text})
    return out


# --- rendering ------------------------------------------------------------------------------------------

@dataclass
class Rendered:
    """A rendered prompt and what had to be cut to fit."""

    text: str
    dropped_messages: int = 0  # old history messages left out
    system_chars_cut: int = 0  # characters cut from the system message's end (last resort)
    fits: bool = True  # False when even the minimal prompt exceeds max_tokens


def _apply(tokenizer, messages: list[Message], tools: list[Message], native: bool, *, generation: bool) -> str:
    kwargs: dict[str, Any] = {"tokenize": False, "add_generation_prompt": generation}
    if native and tools:
        kwargs["tools"] = tools
    return tokenizer.apply_chat_template(messages, **kwargs)


def _turn_starts(messages: list[Message]) -> list[int]:
    """Indexes where a droppable unit of history starts: a user message. A turn is the user's message and the
    agent's work on it (tool calls, tool results, replies), so dropping whole turns never leaves an orphaned
    tool result or a conversation that opens with the assistant."""
    return [i for i, m in enumerate(messages) if m["role"] == "user"]


def render_prompt(tokenizer, messages: list[Message], tools: list[Message] | None = None, *,
                  max_tokens: int | None = None) -> Rendered:
    """The prompt text for a call (ending with the generation prompt), cut to ``max_tokens`` if given."""
    tools = list(tools or [])
    native = bool(tools) and template_supports_tools(tokenizer)
    plain = _plain_messages(messages, tools, native)
    text = _apply(tokenizer, plain, tools, native, generation=True)
    if max_tokens is None or count_tokens(tokenizer, text) <= max_tokens:
        return Rendered(text)

    system = plain[:1] if plain and plain[0]["role"] == "system" else []
    history = plain[len(system):]
    user_turns = [i for i, m in enumerate(history) if m["role"] == "user"]
    # The latest user turn and everything after it (the agent's work on it so far) are never cut.
    protected_from = user_turns[-1] if user_turns else max(len(history) - 1, 0)
    dropped = protected_from
    for start in sorted({i for i in _turn_starts(history) if 0 < i < protected_from} | {protected_from}):
        text = _apply(tokenizer, system + history[start:], tools, native, generation=True)
        if count_tokens(tokenizer, text) <= max_tokens:
            return Rendered(text, dropped_messages=start)
    # Still too long with only the protected turns: cut the system message's tail, keeping its start.
    kept = history[dropped:]
    if system:
        content = system[0]["content"]

        def with_system(chars: int) -> str:
            return _apply(tokenizer, [{**system[0], "content": content[:chars]}] + kept, tools, native,
                          generation=True)

        # Binary search for the longest system prefix that fits (tokens are not proportional to chars).
        lo, hi = 0, len(content)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if count_tokens(tokenizer, with_system(mid)) <= max_tokens:
                lo = mid
            else:
                hi = mid - 1
        if lo > 0:
            return Rendered(with_system(lo), dropped_messages=dropped, system_chars_cut=len(content) - lo)
    return Rendered(text, dropped_messages=dropped, fits=False)


def render_answer(tokenizer, answer: Message) -> str:
    """The target text that follows a rendered prompt: the serialised answer plus the template's end-of-turn.

    What a template appends after an assistant turn (e.g. ``<|im_end|>``) is what teaches the model to stop,
    so it is taken from the template itself: render a one-turn probe with and without the answer and keep
    the difference. It does not depend on the history, so it holds for any prompt of this template.
    """
    answer_text = serialise_answer(answer)
    probe = [{"role": "user", "content": "?"}]
    prompt = _apply(tokenizer, probe, [], False, generation=True)
    full = _apply(tokenizer, probe + [{"role": "assistant", "content": answer_text}], [], False,
                  generation=False)
    if full.startswith(prompt) and answer_text in full[len(prompt):]:
        return full[len(prompt):]
    # Templates that rewrite earlier turns once an answer follows: the answer and the end-of-sequence token.
    return answer_text + (tokenizer.eos_token or "")


def count_tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


# --- static prefix pruning -------------------------------------------------------------------------------

def system_text(messages: list[Message]) -> str | None:
    if messages and messages[0].get("role") in ("system", "developer"):
        return message_text(messages[0])
    return None


def static_prefix(calls_messages: list[list[Message]], *, min_chars: int = MIN_PREFIX_CHARS) -> str:
    """The system-prompt prefix every call shares, cut back to a line break or space ('' if too short)."""
    systems = [system_text(m) for m in calls_messages]
    if not systems or any(s is None for s in systems):
        return ""
    first, last = min(systems), max(systems)  # the common prefix of all strings is that of min and max
    n = 0
    while n < min(len(first), len(last)) and first[n] == last[n]:
        n += 1
    prefix = first[:n]
    if n < len(first) or n < len(last):
        # Cut at a boundary so the prefix never ends mid-word of a part that varies.
        boundary = max(prefix.rfind("\n"), prefix.rfind(" "))
        prefix = prefix[: boundary + 1] if boundary >= 0 else ""
    return prefix if len(prefix) >= min_chars else ""


def static_tools(calls_tools: list[list[Message]]) -> list[Message]:
    """The tool list every call offers, when it is the same non-empty list in each (else [])."""
    if not calls_tools or not calls_tools[0]:
        return []
    first = _canonical(calls_tools[0])
    return list(calls_tools[0]) if all(_canonical(t) == first for t in calls_tools[1:]) else []


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, ensure_ascii=False)


@dataclass(frozen=True)
class StaticPrompt:
    """What every call of a task repeats verbatim, which a specialist learns instead of reading: the system
    prompt's shared prefix and, when every call offers the same tools, the tool list. A request whose tools
    differ from the learned ones keeps them (the specialist then reads them as the base model would)."""

    prefix: str = ""
    tools: tuple[Message, ...] = ()

    PREFIX_FILE = "static_prefix.txt"
    TOOLS_FILE = "static_tools.json"

    @classmethod
    def of(cls, calls: Sequence[Any]) -> "StaticPrompt":
        """From training calls (anything with ``messages`` and ``tools``)."""
        tools = static_tools([list(c.tools or []) for c in calls])
        return cls(static_prefix([c.messages for c in calls]), tuple(tools))

    def __bool__(self) -> bool:
        return bool(self.prefix or self.tools)

    def apply(self, messages: list[Message], tools: list[Message] | None) -> tuple[list[Message], list[Message]]:
        """The messages and tools the specialist is shown: the static parts removed."""
        tools = list(tools or [])
        if self.tools and _canonical(tools) == _canonical(list(self.tools)):
            tools = []
        return prune_prefix(messages, self.prefix), tools

    def save(self, folder: Path) -> None:
        if self.prefix:
            (folder / self.PREFIX_FILE).write_text(self.prefix, encoding="utf-8")
        if self.tools:
            (folder / self.TOOLS_FILE).write_text(json.dumps(list(self.tools), indent=1) + "\n",
                                                  encoding="utf-8")

    @classmethod
    def load(cls, folder: str | Path) -> "StaticPrompt":
        """What an adapter folder was trained without (nothing for adapters trained with the whole prompt)."""
        folder = Path(folder)
        prefix, tools = folder / cls.PREFIX_FILE, folder / cls.TOOLS_FILE
        return cls(prefix.read_text(encoding="utf-8") if prefix.exists() else "",
                   tuple(json.loads(tools.read_text(encoding="utf-8"))) if tools.exists() else ())


def prune_prefix(messages: list[Message], prefix: str) -> list[Message]:
    """The messages with ``prefix`` removed from the system message (unchanged when it does not start so)."""
    text = system_text(messages)
    if not prefix or text is None or not text.startswith(prefix):
        return messages
    out = copy.copy(messages)
    out[0] = {**messages[0], "content": text[len(prefix):].lstrip()}
    return out

