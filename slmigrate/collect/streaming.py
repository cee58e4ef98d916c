"""Streamed chat completions: parse server-sent events and merge ``chat.completion.chunk`` objects.

A streamed answer arrives as many chunks, each holding a *delta* (a piece of text, or a fragment of a tool call's
arguments). Every capture path (the proxy, the SDK wrapper, log imports that recorded raw chunks) stores the
merged result: one ``chat.completion`` object, as if the call had not been streamed. Merging is pure and has no
dependencies, so import formats can use it too.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

# Delta keys that are not text to concatenate.
_STRUCTURED = {"role", "tool_calls", "function_call"}


def merge_chunks(chunks: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Merge ``chat.completion.chunk`` dicts into one ``chat.completion`` dict.

    Text fields of each delta (``content``, ``refusal``, ``reasoning_content``, ...) are concatenated per choice;
    streamed tool calls are assembled by their ``index`` (arguments stay the JSON string the model produced);
    the last non-null ``usage`` wins (OpenAI sends it in a final chunk with no choices).
    """
    merged: dict[str, Any] = {"id": None, "object": "chat.completion", "created": None, "model": None}
    choices: dict[int, dict[str, Any]] = {}
    usage = None
    for chunk in chunks:
        if not isinstance(chunk, dict):
            continue
        for key in ("id", "created", "model", "system_fingerprint", "service_tier"):
            if chunk.get(key) is not None and merged.get(key) is None:
                merged[key] = chunk[key]
        if chunk.get("usage"):
            usage = chunk["usage"]
        for raw in chunk.get("choices") or []:
            index = raw.get("index", 0) or 0
            choice = choices.setdefault(
                index, {"index": index, "message": {"role": "assistant", "content": None},
                        "finish_reason": None, "_tools": {}}
            )
            _merge_delta(choice, raw.get("delta") or raw.get("message") or {})
            if raw.get("finish_reason") is not None:
                choice["finish_reason"] = raw["finish_reason"]
            if raw.get("logprobs"):
                logprobs = choice.setdefault("logprobs", {"content": []})
                logprobs["content"].extend((raw["logprobs"] or {}).get("content") or [])
    merged["choices"] = []
    for index in sorted(choices):
        choice = choices[index]
        tools = choice.pop("_tools")
        if tools:
            choice["message"]["tool_calls"] = [tools[k] for k in sorted(tools)]
        if choice["message"].get("content") == "":
            # Streams open with an empty content delta; the unstreamed form of a text-less answer is null.
            choice["message"]["content"] = None
        merged["choices"].append(choice)
    if usage is not None:
        merged["usage"] = usage
    return {k: v for k, v in merged.items() if v is not None or k in ("id", "model")}


def _merge_delta(choice: dict[str, Any], delta: dict[str, Any]) -> None:
    message = choice["message"]
    if delta.get("role"):
        message["role"] = delta["role"]
    for key, value in delta.items():
        if key in _STRUCTURED or not isinstance(value, str):
            continue
        message[key] = (message.get(key) or "") + value
    if delta.get("function_call"):  # the legacy single-function form
        call = message.setdefault("function_call", {"name": "", "arguments": ""})
        _merge_function(call, delta["function_call"])
    tools: dict[int, dict[str, Any]] = choice["_tools"]
    for position, fragment in enumerate(delta.get("tool_calls") or []):
        # Fragments name their call by index; a provider that omits it sends whole calls in order.
        index = fragment.get("index")
        if index is None:
            index = _index_by_id(tools, fragment.get("id"), position)
        call = tools.setdefault(index, {"id": None, "type": "function", "function": {"name": "", "arguments": ""}})
        if fragment.get("id"):
            call["id"] = fragment["id"]
        if fragment.get("type"):
            call["type"] = fragment["type"]
        _merge_function(call["function"], fragment.get("function") or {})


def _merge_function(call: dict[str, Any], fragment: dict[str, Any]) -> None:
    name = fragment.get("name")
    # OpenAI sends the name once; some servers resend it whole on every fragment, a few split it. Only a new
    # piece is appended, so neither doubles it.
    if name and name != call.get("name"):
        call["name"] = (call.get("name") or "") + name
    if isinstance(fragment.get("arguments"), str):
        call["arguments"] = (call.get("arguments") or "") + fragment["arguments"]


def _index_by_id(tools: dict[int, dict[str, Any]], call_id: str | None, position: int) -> int:
    for index, call in tools.items():
        if call_id and call.get("id") == call_id:
            return index
    return len(tools) if call_id else position


def iter_sse_data(body: bytes | str) -> list[str]:
    """The ``data:`` payloads of a server-sent-event body, in order (multi-line data joined with newlines)."""
    text = body.decode("utf-8", errors="replace") if isinstance(body, bytes) else body
    events: list[str] = []
    lines: list[str] = []
    for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n"):
        if not line:
            if lines:
                events.append("\n".join(lines))
                lines = []
            continue
        if line.startswith("data:"):
            value = line[5:]
            lines.append(value[1:] if value.startswith(" ") else value)
    if lines:
        events.append("\n".join(lines))
    return events


def chunks_from_sse(body: bytes | str) -> list[dict[str, Any]]:
    """Decoded JSON chunks of an SSE body; ``[DONE]`` and undecodable events are skipped."""
    out = []
    for data in iter_sse_data(body):
        if data.strip() == "[DONE]":
            continue
        try:
            out.append(json.loads(data))
        except json.JSONDecodeError:
            continue
    return out


def has_token(chunk: dict[str, Any]) -> bool:
    """Whether a chunk carries output (text or a tool-call fragment): the first such chunk is "first token"."""
    for choice in chunk.get("choices") or []:
        delta = choice.get("delta") or {}
        if delta.get("tool_calls") or delta.get("function_call"):
            return True
        if any(isinstance(v, str) and v for k, v in delta.items() if k != "role"):
            return True
    return False


def merge_timed_sse(pieces: list[tuple[float, bytes]]) -> tuple[dict[str, Any], float | None, str | None]:
    """Merge an SSE body received as ``(seconds since request start, bytes)`` pieces.

    Returns the merged completion, the time to first token in ms (the arrival time of the piece that completed
    the first event carrying output) and what was wrong with the stream, or None: an ``error`` event, or events
    that are not ``chat.completion.chunk`` objects (undecodable JSON, a wrong shape). Such events are left out of
    the merge, so one garbage line can neither break it nor pass for part of a good answer.
    """
    buffer = b""
    chunks: list[dict[str, Any]] = []
    ttft = None
    error = None
    bad = 0

    def take(events: list[str], arrived: float | None) -> None:
        nonlocal ttft, error, bad
        for data in events:
            if data.strip() == "[DONE]":
                continue
            try:
                chunk = json.loads(data)
            except (ValueError, RecursionError):
                bad += 1
                continue
            if isinstance(chunk, dict) and chunk.get("error"):
                error = _error_text(chunk["error"])
                continue
            if not _is_chunk(chunk):
                bad += 1
                continue
            if ttft is None and arrived is not None and has_token(chunk):
                ttft = round(arrived * 1000, 3)
            chunks.append(chunk)

    for arrived, piece in pieces:
        buffer += piece
        # Only complete events (ended by a blank line) are parsed; the rest waits for the next piece.
        normalised = buffer.replace(b"\r\n", b"\n")
        cut = normalised.rfind(b"\n\n")
        if cut < 0:
            continue
        complete, buffer = normalised[: cut + 2], normalised[cut + 2:]
        take(iter_sse_data(complete), arrived)
    if buffer.strip():
        take(iter_sse_data(buffer), None)
    if error is None and bad:
        error = f"{bad} event(s) not a chat.completion.chunk (undecodable JSON or a wrong shape)"
    return merge_chunks(chunks), ttft, error


def _is_chunk(chunk: Any) -> bool:
    """Whether ``chunk`` has the shape ``merge_chunks`` relies on: an object whose choices carry object deltas."""
    if not isinstance(chunk, dict):
        return False
    choices = chunk.get("choices")
    if choices is None:
        return isinstance(chunk.get("usage"), dict)  # the final usage-only chunk may omit choices
    if not isinstance(choices, list):
        return False
    for choice in choices:
        if not isinstance(choice, dict) or not isinstance(choice.get("index", 0) or 0, int):
            return False
        delta = choice.get("delta") or choice.get("message") or {}
        if not isinstance(delta, dict) or not isinstance(delta.get("tool_calls") or [], list):
            return False
        if not all(isinstance(tc, dict) and isinstance(tc.get("function") or {}, dict)
                   for tc in delta.get("tool_calls") or []):
            return False
        if not isinstance(delta.get("function_call") or {}, dict):
            return False
    return isinstance(chunk.get("usage") or {}, dict)


def _error_text(error: Any) -> str:
    if isinstance(error, dict):
        return str(error.get("code") or error.get("type") or "error")
    return "error"
