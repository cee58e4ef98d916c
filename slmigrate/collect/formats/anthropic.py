"""``anthropic``: Anthropic Messages API request/response pairs, converted to the OpenAI form.

``{request: {model, system?, messages, tools?, tool_choice?, max_tokens, ...}, response: {id, type: "message",
content: [...], stop_reason, usage: {input_tokens, output_tokens}}, id?, timestamp?, metadata?}``.

``text`` blocks become message content, ``tool_use`` blocks OpenAI ``tool_calls`` (arguments serialised to a
JSON string), ``tool_result`` blocks ``tool`` messages, images ``image_url`` parts with a data URL; ``thinking``
blocks are dropped (the OpenAI form has no place for them). A streamed response (the list of events, or the
raw SSE text) is merged first: text deltas concatenate, ``input_json_delta`` pieces form the tool input.
"""

from __future__ import annotations

import json
from typing import Any

from slmigrate.collect.formats import ConvertContext, FormatError, register
from slmigrate.collect.formats._common import (
    as_float, as_int, as_outcome, completion, content_string, fill_from_metadata, normalise_tools, parse_sse, share,
    until_stream_end,
)
from slmigrate.record import CallRecord, parse_timestamp

_STOP = {"end_turn": "stop", "stop_sequence": "stop", "max_tokens": "length", "tool_use": "tool_calls",
         "pause_turn": "stop", "refusal": "content_filter"}
_BLOCK_TYPES = {"text", "tool_use", "tool_result", "image", "thinking", "redacted_thinking", "document"}


def _has_blocks(messages: Any) -> bool:
    return isinstance(messages, list) and any(
        isinstance(m, dict) and isinstance(m.get("content"), list)
        and any(isinstance(b, dict) and b.get("type") in ("tool_use", "tool_result") for b in m["content"])
        for m in messages
    )


def _is_anthropic(o: dict[str, Any]) -> bool:
    req, resp = o.get("request"), o.get("response")
    if not isinstance(req, dict) or not isinstance(req.get("messages"), list):
        return False
    if isinstance(resp, dict) and resp.get("type") == "message" and isinstance(resp.get("content"), list):
        return True
    if isinstance(resp, list) and resp and isinstance(resp[0], dict) and resp[0].get("type") == "message_start":
        return True
    if isinstance(resp, str) and "message_start" in resp[:200]:
        return True
    return "system" in req or _has_blocks(req["messages"]) or (
        isinstance(resp, dict) and resp.get("type") == "error")


def _text(blocks: list[Any]) -> str:
    return "".join(b.get("text", "") for b in blocks if isinstance(b, dict) and b.get("type") == "text")


def _image_part(block: dict[str, Any]) -> dict[str, Any]:
    src = block.get("source") or {}
    if src.get("type") == "base64":
        url = f"data:{src.get('media_type', 'image/png')};base64,{src.get('data', '')}"
    else:
        url = src.get("url", "")
    return {"type": "image_url", "image_url": {"url": url}}


def _convert_message(msg: dict[str, Any]) -> list[dict[str, Any]]:
    role, content = msg.get("role"), msg.get("content")
    if role not in ("user", "assistant"):
        raise FormatError(f"unexpected message role {role!r} (Anthropic messages are user or assistant)")
    if isinstance(content, str):
        return [{"role": role, "content": content}]
    if not isinstance(content, list):
        raise FormatError(f"a {role} message has content of type {type(content).__name__}")
    out: list[dict[str, Any]] = []
    if role == "assistant":
        return [_assistant(content)]
    parts: list[dict[str, Any]] = []
    for block in content:
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "tool_result":
            value = block.get("content")
            text = _text(value) if isinstance(value, list) else content_string(value)
            out.append({"role": "tool", "tool_call_id": block.get("tool_use_id", ""), "content": text})
        elif kind == "text":
            parts.append({"type": "text", "text": block.get("text", "")})
        elif kind == "image":
            parts.append(_image_part(block))
        elif kind not in _BLOCK_TYPES:
            raise FormatError(f"unknown content block type {kind!r}")
    if parts:
        only_text = all(p["type"] == "text" for p in parts)
        out.append({"role": "user", "content": "".join(p["text"] for p in parts) if only_text else parts})
    return out


def _assistant(blocks: list[Any]) -> dict[str, Any]:
    calls = [
        {"id": b.get("id", f"call_{i}"), "type": "function",
         "function": {"name": b.get("name", ""), "arguments": json.dumps(b.get("input") or {}, ensure_ascii=False)}}
        for i, b in enumerate(blocks) if isinstance(b, dict) and b.get("type") == "tool_use"
    ]
    msg: dict[str, Any] = {"role": "assistant", "content": _text(blocks) or None}
    if calls:
        msg["tool_calls"] = calls
    return msg


def _tool_choice(value: Any) -> Any:
    if not isinstance(value, dict):
        return value
    kind = value.get("type")
    if kind == "tool":
        return {"type": "function", "function": {"name": value.get("name", "")}}
    return {"auto": "auto", "any": "required", "none": "none"}.get(kind, kind)


def convert_request(req: dict[str, Any]) -> dict[str, Any]:
    messages: list[dict[str, Any]] = []
    system = req.get("system")
    if system:
        messages.append({"role": "system", "content": system if isinstance(system, str) else _text(system)})
    for i, msg in enumerate(req.get("messages") or []):
        if not isinstance(msg, dict):
            raise FormatError(f"request.messages[{i}] is not an object")
        messages.extend(_convert_message(msg))
    out: dict[str, Any] = {"model": req.get("model"), "messages": messages}
    if req.get("tools"):
        out["tools"] = normalise_tools(req["tools"], "request.tools")
    if req.get("tool_choice") is not None:
        out["tool_choice"] = _tool_choice(req["tool_choice"])
    for src, dst in (("max_tokens", "max_tokens"), ("temperature", "temperature"), ("top_p", "top_p"),
                     ("stop_sequences", "stop"), ("stream", "stream")):
        if req.get(src) is not None:
            out[dst] = req[src]
    return out


def merge_stream(events: list[Any]) -> dict[str, Any]:
    """Streamed Messages API events (message_start, content_block_*, message_delta) as one message object.

    Text deltas concatenate; a tool_use block's ``input_json_delta`` pieces concatenate into its input.
    """
    events = until_stream_end(events)
    if not any(isinstance(ev, dict) and ev.get("type") in ("message_start", "error") for ev in events):
        raise FormatError("the streamed response has no message_start event (not an Anthropic event stream)")
    message: dict[str, Any] = {"type": "message", "role": "assistant", "content": []}
    blocks: dict[int, dict[str, Any]] = {}
    partial: dict[int, list[str]] = {}
    for ev in events:
        if not isinstance(ev, dict):
            raise FormatError(f"stream event is not an object: {ev!r:.60}")
        kind = ev.get("type")
        if kind == "message_start":
            start = ev.get("message") or {}
            message.update({k: v for k, v in start.items() if k != "content"})
        elif kind == "content_block_start":
            blocks[ev.get("index", len(blocks))] = dict(ev.get("content_block") or {})
        elif kind == "content_block_delta":
            idx, delta = ev.get("index", 0), ev.get("delta") or {}
            block = blocks.setdefault(idx, {"type": "text", "text": ""})
            if delta.get("type") == "text_delta":
                block["text"] = block.get("text", "") + delta.get("text", "")
            elif delta.get("type") == "input_json_delta":
                partial.setdefault(idx, []).append(delta.get("partial_json", ""))
        elif kind == "message_delta":
            message.update({k: v for k, v in (ev.get("delta") or {}).items() if v is not None})
            if ev.get("usage"):
                message["usage"] = {**(message.get("usage") or {}), **ev["usage"]}
        elif kind == "error":
            return {"type": "error", "error": ev.get("error")}
    for idx, pieces in partial.items():
        text = "".join(pieces)
        try:
            blocks[idx]["input"] = json.loads(text) if text else {}
        except ValueError as exc:
            raise FormatError(f"streamed tool input of block {idx} is not JSON") from exc
    message["content"] = [blocks[i] for i in sorted(blocks)]
    return message


def convert_response(resp: Any) -> tuple[dict[str, Any] | None, str | None]:
    if resp is None:
        return None, None
    if isinstance(resp, str) and resp.lstrip().startswith(("event:", "data:")):
        resp = merge_stream(parse_sse(resp))
    elif isinstance(resp, list):
        resp = merge_stream(resp)
    if not isinstance(resp, dict):
        raise FormatError(f"the response is a {type(resp).__name__}, expected an Anthropic message object")
    if resp.get("type") == "error" or (resp.get("error") and "content" not in resp):
        err = resp.get("error")
        return None, str(err.get("message") if isinstance(err, dict) else err)
    if not isinstance(resp.get("content"), list):
        raise FormatError("the response has no 'content' block list (expected an Anthropic message)")
    usage_in = resp.get("usage") or {}
    usage = None
    if usage_in:
        prompt = sum(as_int(usage_in.get(k)) or 0 for k in
                     ("input_tokens", "cache_read_input_tokens", "cache_creation_input_tokens"))
        usage = {"prompt_tokens": prompt, "completion_tokens": as_int(usage_in.get("output_tokens")) or 0}
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
    return completion(_assistant(resp["content"]), model=resp.get("model"), id=resp.get("id"), usage=usage,
                      finish_reason=_STOP.get(resp.get("stop_reason"), resp.get("stop_reason") or "stop")), None


class AnthropicFormat:
    name = "anthropic"
    description = "Anthropic Messages API request/response pairs (tool_use -> tool_calls)"

    def detect(self, first_objects: list[Any]) -> float:
        return 0.95 * share(first_objects, _is_anthropic)

    def convert(self, obj: Any, ctx: ConvertContext) -> list[CallRecord]:
        if not isinstance(obj, dict) or not isinstance(obj.get("request"), dict):
            raise FormatError("expected an object with an Anthropic 'request' (and its 'response')")
        request = convert_request(obj["request"])
        response, error = convert_response(obj.get("response"))
        meta = dict(obj["metadata"]) if isinstance(obj.get("metadata"), dict) else {}
        raw_resp = obj.get("response") if isinstance(obj.get("response"), dict) else {}
        input_id = obj.get("id") or raw_resp.get("id")
        rec = CallRecord(
            request=request, response=response, input_id=None if input_id is None else str(input_id),
            timestamp=parse_timestamp(obj.get("timestamp")), latency_ms=as_float(obj.get("latency_ms")),
            agent=obj.get("agent") if isinstance(obj.get("agent"), str) else None,
            session=str(obj["session"]) if obj.get("session") is not None else None,
            status="error" if error else "ok", error=error, source="import:anthropic",
            outcome=as_outcome(obj.get("outcome")), metadata=meta,
        )
        return [fill_from_metadata(rec, meta, agent=ctx.agent)]


register(AnthropicFormat())
