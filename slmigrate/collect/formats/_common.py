"""Pieces every format shares: legacy function-calling upgrade, stream merging, completions, metadata fields.

Nothing here mutates its input: a record that needs no change is returned as is (so an export/import round trip
keeps payloads byte-for-byte equal), and one that does is copied first.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Iterable

from slmigrate.collect.formats import FormatError

# Keys that, inside a record's metadata (or at its top level), obviously name these CallRecord fields.
AGENT_KEYS = ("agent", "agent_name", "agent_id", "component")
SESSION_KEYS = ("session", "session_id", "sessionId", "simulation_id", "trace_id", "traceId", "conversation_id",
                "thread_id", "run_id", "episode_id")
OUTCOME_KEYS = ("outcome", "reward", "score", "success")


def dicts(objs: Iterable[Any]) -> list[dict[str, Any]]:
    return [o for o in objs if isinstance(o, dict)]


def share(objs: list[Any], pred: Callable[[dict[str, Any]], bool]) -> float:
    """The share of sampled values that are dicts satisfying ``pred`` (0 when nothing was sampled)."""
    if not objs:
        return 0.0
    hits = 0
    for o in objs:
        try:
            hits += bool(isinstance(o, dict) and pred(o))
        except Exception:
            pass
    return hits / len(objs)


def args_string(value: Any) -> str:
    """Tool-call arguments as the JSON string OpenAI uses; strings are kept exactly as logged."""
    if isinstance(value, str):
        return value
    return json.dumps({} if value is None else value, ensure_ascii=False)


def content_string(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False)


# --- legacy functions / function_call -> tools / tool_calls ---

def tool_from_function(fn: dict[str, Any]) -> dict[str, Any]:
    return {"type": "function", "function": fn}


def normalise_tools(value: Any, origin: str = "tools") -> list[dict[str, Any]]:
    """Accept OpenAI tools, legacy ``functions`` entries or Anthropic tool specs; return OpenAI tools."""
    if isinstance(value, dict):
        for key in ("tools", "functions"):
            if isinstance(value.get(key), list):
                return normalise_tools(value[key], origin)
        raise FormatError(f"{origin}: expected a list of tools or an object with a 'tools' list")
    if not isinstance(value, list):
        raise FormatError(f"{origin}: expected a list of tools, got {type(value).__name__}")
    out = []
    for i, tool in enumerate(value):
        if not isinstance(tool, dict):
            raise FormatError(f"{origin}[{i}]: expected an object, got {type(tool).__name__}")
        if isinstance(tool.get("function"), dict):
            out.append(tool)
        elif "input_schema" in tool and "name" in tool:  # Anthropic tool spec
            fn = {"name": tool["name"], "parameters": tool.get("input_schema") or {}}
            if tool.get("description"):
                fn["description"] = tool["description"]
            out.append(tool_from_function(fn))
        elif "name" in tool:  # a bare function spec (legacy ``functions``, or OTel's flat definitions)
            out.append(tool_from_function({k: v for k, v in tool.items() if k != "type"}))
        else:
            raise FormatError(f"{origin}[{i}]: a tool needs a 'function' object or a 'name'")
    return out


def _legacy_call_id(index: int) -> str:
    # Deterministic, so the same history converts to the same ids in every call that contains it.
    return f"call_{index}"


def upgrade_message(msg: dict[str, Any], index: int) -> dict[str, Any]:
    """An assistant message with a legacy ``function_call`` gets an equivalent ``tool_calls`` entry."""
    fc = msg.get("function_call")
    if not isinstance(fc, dict) or msg.get("tool_calls"):
        return msg
    new = {k: v for k, v in msg.items() if k != "function_call"}
    new["tool_calls"] = [{
        "id": _legacy_call_id(index),
        "type": "function",
        "function": {"name": fc.get("name") or "", "arguments": args_string(fc.get("arguments"))},
    }]
    return new


def upgrade_messages(messages: list[Any]) -> list[Any]:
    """Legacy function messages become tool messages answering the matching (upgraded) call."""
    for m in messages:  # a plain loop: this check runs on every message of every imported call
        if type(m) is dict and (m.get("role") == "function" or type(m.get("function_call")) is dict):
            break
    else:
        return messages
    out: list[Any] = []
    pending: list[tuple[str, str]] = []  # (call id, function name) not yet answered
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            out.append(msg)
            continue
        if msg.get("role") == "assistant":
            msg = upgrade_message(msg, i)
            pending = [(tc.get("id") or "", (tc.get("function") or {}).get("name") or "")
                       for tc in (msg.get("tool_calls") or []) if isinstance(tc, dict)]
        elif msg.get("role") == "function":
            name = msg.get("name") or ""
            match = next((p for p in pending if p[1] == name), pending[0] if pending else None)
            if match:
                pending.remove(match)
            msg = {"role": "tool", "tool_call_id": match[0] if match else _legacy_call_id(i),
                   "content": content_string(msg.get("content"))}
            if name:
                msg["name"] = name
        out.append(msg)
    return out


def upgrade_request(request: dict[str, Any]) -> dict[str, Any]:
    """``functions``/``function_call`` request fields and legacy messages in their tools/tool_calls form."""
    messages = request.get("messages")
    new_messages = upgrade_messages(messages) if isinstance(messages, list) else messages
    legacy_fields = "functions" in request or "function_call" in request
    if new_messages is messages and not legacy_fields:
        return request
    new = {k: v for k, v in request.items() if k not in ("functions", "function_call")}
    new["messages"] = new_messages
    if isinstance(request.get("functions"), list) and "tools" not in request:
        new["tools"] = [tool_from_function(f) for f in request["functions"]]
    fc = request.get("function_call")
    if fc is not None and "tool_choice" not in request:
        if isinstance(fc, dict) and fc.get("name"):
            new["tool_choice"] = {"type": "function", "function": {"name": fc["name"]}}
        elif isinstance(fc, str):
            new["tool_choice"] = fc
    return new


def upgrade_response(response: dict[str, Any] | None, n_messages: int) -> dict[str, Any] | None:
    """A legacy ``function_call`` answer gets the id it will have as message ``n_messages`` of the next call."""
    if not response or not isinstance(response.get("choices"), list):
        return response
    changed = False
    choices = []
    for ch in response["choices"]:
        if isinstance(ch, dict) and isinstance(ch.get("message"), dict):
            msg = upgrade_message(ch["message"], n_messages)
            if msg is not ch["message"]:
                ch = {**ch, "message": msg}
                if ch.get("finish_reason") == "function_call":
                    ch["finish_reason"] = "tool_calls"
                changed = True
        choices.append(ch)
    return {**response, "choices": choices} if changed else response


# --- responses ---

def completion(message: dict[str, Any], *, model: str | None = None, finish_reason: str | None = None,
               usage: dict[str, Any] | None = None, id: str | None = None,
               created: int | None = None) -> dict[str, Any]:
    """A ``chat.completion`` object around one assistant message."""
    if finish_reason is None:
        finish_reason = "tool_calls" if message.get("tool_calls") else "stop"
    out: dict[str, Any] = {"object": "chat.completion"}
    if id:
        out["id"] = id
    if created is not None:
        out["created"] = created
    if model:
        out["model"] = model
    out["choices"] = [{"index": 0, "message": message, "finish_reason": finish_reason}]
    if usage:
        out["usage"] = usage
    return out


STREAM_END = "[DONE]"  # the payload of the last server-sent event of an OpenAI-style stream


def parse_sse(text: str) -> list[dict[str, Any]]:
    """``data: {...}`` lines of a server-sent-event stream, up to ``data: [DONE]``."""
    chunks = []
    for line in text.splitlines():
        line = line.strip()
        if not line.startswith("data:"):
            continue
        payload = line[5:].strip()
        if payload == STREAM_END:
            break
        if not payload:
            continue
        try:
            chunks.append(json.loads(payload))
        except ValueError as exc:
            raise FormatError(f"stream chunk is not JSON: {payload[:60]!r}") from exc
    return chunks


def until_stream_end(events: list[Any]) -> list[Any]:
    """A logged list of stream events up to the end sentinel, which loggers often keep as a last item
    (``"[DONE]"`` or ``"data: [DONE]"``): the list then means what the SSE text with that sentinel means."""
    for i, event in enumerate(events):
        if isinstance(event, str) and event.strip().removeprefix("data:").strip() == STREAM_END:
            return events[:i]
    return events


def merge_stream(chunks: list[Any]) -> dict[str, Any]:
    """Merge ``chat.completion.chunk`` objects into the ``chat.completion`` they stream.

    Content deltas concatenate; tool-call deltas are keyed by their ``index`` (the id and name arrive in the
    first delta, the arguments in pieces); usage comes from whichever chunk carries it (usually the last).
    """
    chunks = until_stream_end(chunks)
    out: dict[str, Any] = {"object": "chat.completion"}
    choices: dict[int, dict[str, Any]] = {}
    for chunk in chunks:
        if not isinstance(chunk, dict):
            raise FormatError(f"stream chunk is not an object: {chunk!r:.60}")
        for key in ("id", "created", "model", "system_fingerprint"):
            if chunk.get(key) is not None and key not in out:
                out[key] = chunk[key]
        if chunk.get("usage"):
            out["usage"] = chunk["usage"]
        for ch in chunk.get("choices") or []:
            idx = ch.get("index", 0)
            acc = choices.setdefault(idx, {"role": "assistant", "content": [], "tool_calls": {}, "finish": None,
                                           "function_call": None, "refusal": []})
            delta = ch.get("delta") or ch.get("message") or {}
            if delta.get("role"):
                acc["role"] = delta["role"]
            if delta.get("content"):
                acc["content"].append(delta["content"])
            if delta.get("refusal"):
                acc["refusal"].append(delta["refusal"])
            for tc in delta.get("tool_calls") or []:
                slot = acc["tool_calls"].setdefault(tc.get("index", len(acc["tool_calls"])),
                                                    {"id": None, "type": "function", "name": [], "arguments": []})
                if tc.get("id"):
                    slot["id"] = tc["id"]
                if tc.get("type"):
                    slot["type"] = tc["type"]
                fn = tc.get("function") or {}
                if fn.get("name"):
                    slot["name"].append(fn["name"])
                if fn.get("arguments"):
                    slot["arguments"].append(args_string(fn["arguments"]))
            fc = delta.get("function_call")
            if isinstance(fc, dict):
                acc["function_call"] = acc["function_call"] or {"name": [], "arguments": []}
                if fc.get("name"):
                    acc["function_call"]["name"].append(fc["name"])
                if fc.get("arguments"):
                    acc["function_call"]["arguments"].append(fc["arguments"])
            if ch.get("finish_reason"):
                acc["finish"] = ch["finish_reason"]
    if not chunks:
        raise FormatError("the streamed response has no chunks")
    merged = []
    for idx in sorted(choices):
        acc = choices[idx]
        msg: dict[str, Any] = {"role": acc["role"], "content": "".join(acc["content"]) or None}
        if acc["refusal"]:
            msg["refusal"] = "".join(acc["refusal"])
        if acc["tool_calls"]:
            msg["tool_calls"] = [
                {"id": s["id"] or f"call_{i}", "type": s["type"],
                 "function": {"name": "".join(s["name"]), "arguments": "".join(s["arguments"])}}
                for i, s in sorted(acc["tool_calls"].items())
            ]
        if acc["function_call"]:
            msg["function_call"] = {"name": "".join(acc["function_call"]["name"]),
                                    "arguments": "".join(acc["function_call"]["arguments"])}
        merged.append({"index": idx, "message": msg, "finish_reason": acc["finish"]})
    out["choices"] = merged
    return out


def is_chunk_list(value: Any) -> bool:
    if not isinstance(value, list):
        return False
    value = until_stream_end(value)
    return bool(value) and all(
        isinstance(c, dict) and (c.get("object") == "chat.completion.chunk"
                                 or any("delta" in (ch or {}) for ch in c.get("choices") or []))
        for c in value[:3]
    )


def normalise_response(value: Any) -> tuple[dict[str, Any] | None, str | None]:
    """(chat.completion, error message) from whatever a log stored as the response.

    Accepts a completion object, an error object, a list of stream chunks, SSE text, a JSON string of any of
    these, or a Batch-API style ``{"body": ...}`` wrapper.
    """
    if value is None:
        return None, None
    if isinstance(value, str):
        text = value.lstrip()
        if text.startswith("data:"):
            return merge_stream(parse_sse(text)), None
        try:
            return normalise_response(json.loads(text))
        except ValueError:
            raise FormatError("the response is a string that is neither JSON nor a server-sent-event stream")
    if isinstance(value, list):
        if is_chunk_list(value):
            return merge_stream(value), None
        raise FormatError("the response is a list but not a list of chat.completion.chunk objects")
    if not isinstance(value, dict):
        raise FormatError(f"the response is a {type(value).__name__}, expected an object")
    if isinstance(value.get("chunks"), list):
        return merge_stream(value["chunks"]), None
    if value.get("object") == "chat.completion.chunk":
        return merge_stream([value]), None
    if isinstance(value.get("body"), dict) and "choices" not in value:
        return normalise_response(value["body"])
    if value.get("error") and not value.get("choices"):
        err = value["error"]
        message = err.get("message") if isinstance(err, dict) else err
        return None, str(message or err)
    if not isinstance(value.get("choices"), list):
        raise FormatError("the response has no 'choices' list (expected an OpenAI chat.completion)")
    return value, None


# --- metadata ---

def first_key(source: dict[str, Any] | None, keys: tuple[str, ...]) -> Any:
    if not isinstance(source, dict):
        return None
    for key in keys:
        value = source.get(key)
        if value not in (None, ""):
            return value
    return None


def as_outcome(value: Any) -> float | None:
    if isinstance(value, bool):
        return 1.0 if value else 0.0
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def as_int(value: Any) -> int | None:
    try:
        return None if value is None else int(value)
    except (TypeError, ValueError, OverflowError):  # OverflowError: an infinite float (1e400 in a log)
        return None


def as_float(value: Any) -> float | None:
    try:
        return None if value is None else float(value)
    except (TypeError, ValueError):
        return None


def fill_from_metadata(rec: Any, *sources: dict[str, Any] | None, agent: str | None = None) -> Any:
    """Set agent/session/outcome from the first source that obviously names them; ``agent`` fills the gap."""
    for src in sources:
        if rec.agent is None:
            value = first_key(src, AGENT_KEYS)
            rec.agent = str(value) if value is not None and not isinstance(value, (dict, list)) else None
        if rec.session is None:
            value = first_key(src, SESSION_KEYS)
            rec.session = str(value) if value is not None and not isinstance(value, (dict, list)) else None
        if rec.outcome is None:
            rec.outcome = as_outcome(first_key(src, OUTCOME_KEYS))
    if rec.agent is None:
        rec.agent = agent
    return rec
