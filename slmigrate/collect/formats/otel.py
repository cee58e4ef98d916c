"""``otel``: OpenTelemetry GenAI spans in OTLP JSON (what the collector's file exporter writes).

A record is an ``ExportTraceServiceRequest`` (``{"resourceSpans": [{resource, scopeSpans: [{spans}]}]}``) or a
bare span. Every span that carries model input/output becomes one call; other spans (tools, agent steps) are
not calls and are passed over. Both generations of the semantic conventions are read:

- current: ``gen_ai.input.messages`` / ``gen_ai.output.messages`` (JSON, messages made of typed ``parts``:
  text, tool_call, tool_call_response), ``gen_ai.system_instructions``, ``gen_ai.tool.definitions``;
- older: ``gen_ai.prompt`` / ``gen_ai.completion`` as JSON (on the span or on ``gen_ai.content.*`` events) or
  flattened (``gen_ai.prompt.0.role``, ``gen_ai.completion.0.tool_calls.0.arguments``, ...).

Session = trace id, input id = span id, agent = ``gen_ai.agent.name`` else the resource's ``service.name``.
"""

from __future__ import annotations

import json
from typing import Any

from slmigrate.collect.formats import ConvertContext, FormatError, register
from slmigrate.collect.formats._common import (
    args_string, as_int, completion, content_string, normalise_tools, share, upgrade_messages,
)
from slmigrate.record import CallRecord, parse_timestamp

_CONTENT_KEYS = ("gen_ai.input.messages", "gen_ai.output.messages", "gen_ai.prompt", "gen_ai.completion")
_BULKY = ("gen_ai.input.messages", "gen_ai.output.messages", "gen_ai.system_instructions", "gen_ai.tool.definitions",
          "gen_ai.prompt", "gen_ai.completion")


def any_value(v: Any) -> Any:
    """An OTLP JSON ``AnyValue`` as a plain Python value."""
    if not isinstance(v, dict):
        return v
    for key in ("stringValue", "boolValue", "doubleValue"):
        if key in v:
            return v[key]
    if "intValue" in v:
        return as_int(v["intValue"])
    if "arrayValue" in v:
        return [any_value(x) for x in (v["arrayValue"] or {}).get("values") or []]
    if "kvlistValue" in v:
        return attributes((v["kvlistValue"] or {}).get("values") or [])
    if "bytesValue" in v:
        return v["bytesValue"]
    return None


def attributes(value: Any) -> dict[str, Any]:
    if isinstance(value, dict):
        return value
    out = {}
    for item in value or []:
        if isinstance(item, dict) and "key" in item:
            out[item["key"]] = any_value(item.get("value"))
    return out


def _spans(obj: dict[str, Any]):
    """(span, resource attributes) for every span in an OTLP document, or the object itself when it is a span."""
    if isinstance(obj.get("resourceSpans"), list):
        for rs in obj["resourceSpans"]:
            resource = attributes((rs.get("resource") or {}).get("attributes"))
            for ss in rs.get("scopeSpans") or rs.get("instrumentationLibrarySpans") or []:
                for span in ss.get("spans") or []:
                    yield span, resource
    elif "spanId" in obj or "span_id" in obj:
        yield obj, attributes((obj.get("resource") or {}).get("attributes"))


def _json(value: Any, what: str) -> Any:
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError as exc:
            raise FormatError(f"{what} is not valid JSON") from exc
    return value


def _from_parts(msg: dict[str, Any]) -> list[dict[str, Any]]:
    """A semconv message (role + typed parts) as OpenAI messages (tool responses become separate messages)."""
    role = msg.get("role") or "user"
    parts = msg.get("parts")
    if not isinstance(parts, list):  # already OpenAI-shaped
        return [{k: v for k, v in msg.items() if k != "finish_reason"}]
    texts, calls, out = [], [], []
    for i, part in enumerate(parts):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            texts.append(content_string(part.get("content")))
        elif kind == "tool_call":
            calls.append({"id": part.get("id") or f"call_{i}", "type": "function",
                          "function": {"name": part.get("name", ""), "arguments": args_string(part.get("arguments"))}})
        elif kind == "tool_call_response":
            out.append({"role": "tool", "tool_call_id": part.get("id") or "",
                        "content": content_string(part.get("response", part.get("result")))})
    if role == "tool" and out:
        return out
    message: dict[str, Any] = {"role": role, "content": "".join(texts) if texts else None}
    if calls:
        message["tool_calls"] = calls
    return [message, *out] if (texts or calls) else out or [message]


def _unflatten(attrs: dict[str, Any], prefix: str) -> list[dict[str, Any]]:
    """``prefix.0.role``-style attributes (OpenLLMetry) as a list of messages."""
    items: dict[int, dict[str, Any]] = {}
    for key, value in attrs.items():
        if not key.startswith(prefix + "."):
            continue
        rest = key[len(prefix) + 1:].split(".")
        if not rest[0].isdigit():
            continue
        msg = items.setdefault(int(rest[0]), {})
        if len(rest) == 2:
            msg[rest[1]] = value
        elif len(rest) == 4 and rest[1] == "tool_calls" and rest[2].isdigit():
            calls = msg.setdefault("_calls", {})
            calls.setdefault(int(rest[2]), {})[rest[3]] = value
    out = []
    for _, msg in sorted(items.items()):
        calls = msg.pop("_calls", None)
        if calls:
            msg["tool_calls"] = [{"id": c.get("id") or f"call_{j}", "type": "function",
                                  "function": {"name": c.get("name", ""), "arguments": args_string(c.get("arguments"))}}
                                 for j, c in sorted(calls.items())]
        out.append(msg)
    return out


def _old_style(value: Any, what: str) -> list[dict[str, Any]]:
    value = _json(value, what) if isinstance(value, str) and value.strip()[:1] in "[{" else value
    if isinstance(value, str):
        return [{"role": "assistant" if what.endswith("completion") else "user", "content": value}]
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        raise FormatError(f"{what} is neither a message list nor text")
    return [m for m in value if isinstance(m, dict)]


def convert_span(span: dict[str, Any], resource: dict[str, Any], ctx: ConvertContext) -> CallRecord | None:
    attrs = dict(attributes(span.get("attributes")))
    for event in span.get("events") or []:
        for key, value in attributes(event.get("attributes")).items():
            if key in ("gen_ai.prompt", "gen_ai.completion"):
                attrs.setdefault(key, value)
    has_flat = any(k.startswith(("gen_ai.prompt.", "gen_ai.completion.")) for k in attrs)
    if not has_flat and not any(k in attrs for k in _CONTENT_KEYS):
        return None  # not an LLM call (a tool or agent span)
    messages: list[dict[str, Any]] = []
    if "gen_ai.input.messages" in attrs:
        for m in _json(attrs["gen_ai.input.messages"], "gen_ai.input.messages") or []:
            messages.extend(_from_parts(m))
        system = attrs.get("gen_ai.system_instructions")
        if system and not any(m.get("role") == "system" for m in messages):
            system = _json(system, "gen_ai.system_instructions") if str(system)[:1] == "[" else system
            text = system if isinstance(system, str) else "".join(
                content_string(p.get("content")) for p in system if isinstance(p, dict))
            messages.insert(0, {"role": "system", "content": text})
    elif "gen_ai.prompt" in attrs:
        messages = _old_style(attrs["gen_ai.prompt"], "gen_ai.prompt")
    else:
        messages = _unflatten(attrs, "gen_ai.prompt")
    outputs: list[dict[str, Any]] = []
    finish = None
    if "gen_ai.output.messages" in attrs:
        raw_out = _json(attrs["gen_ai.output.messages"], "gen_ai.output.messages") or []
        if raw_out and isinstance(raw_out[0], dict):
            finish = raw_out[0].get("finish_reason")
            outputs = _from_parts(raw_out[0])
    elif "gen_ai.completion" in attrs:
        outputs = _old_style(attrs["gen_ai.completion"], "gen_ai.completion")
    else:
        outputs = _unflatten(attrs, "gen_ai.completion")
    if not messages:
        raise FormatError(f"span {span.get('spanId', '?')} has no input messages")
    messages = upgrade_messages(messages)
    model = attrs.get("gen_ai.request.model")
    request: dict[str, Any] = {"messages": messages}
    if model:
        request = {"model": model, **request}
    if attrs.get("gen_ai.tool.definitions"):
        request["tools"] = normalise_tools(_json(attrs["gen_ai.tool.definitions"], "gen_ai.tool.definitions"))
    for key, field in (("gen_ai.request.temperature", "temperature"), ("gen_ai.request.max_tokens", "max_tokens"),
                       ("gen_ai.request.top_p", "top_p")):
        if attrs.get(key) is not None:
            request[field] = attrs[key]
    usage_in = as_int(attrs.get("gen_ai.usage.input_tokens", attrs.get("gen_ai.usage.prompt_tokens")))
    usage_out = as_int(attrs.get("gen_ai.usage.output_tokens", attrs.get("gen_ai.usage.completion_tokens")))
    usage = None
    if usage_in is not None or usage_out is not None:
        usage = {"prompt_tokens": usage_in or 0, "completion_tokens": usage_out or 0,
                 "total_tokens": (usage_in or 0) + (usage_out or 0)}
    status = span.get("status") or {}
    failed = status.get("code") in (2, "STATUS_CODE_ERROR", "ERROR")
    response = None
    if outputs:
        answer = dict(outputs[0])
        answer.setdefault("role", "assistant")
        finish = finish or answer.pop("finish_reason", None)
        if finish is None and isinstance(attrs.get("gen_ai.response.finish_reasons"), list):
            finish = (attrs["gen_ai.response.finish_reasons"] or [None])[0]
        response = completion(answer, model=attrs.get("gen_ai.response.model") or model, usage=usage,
                              id=attrs.get("gen_ai.response.id"), finish_reason=finish)
    elif not failed:
        raise FormatError(f"span {span.get('spanId', '?')} has input messages but no output")
    start, end = as_int(span.get("startTimeUnixNano")), as_int(span.get("endTimeUnixNano"))
    meta = {k: v for k, v in attrs.items() if k not in _BULKY and not k.startswith(("gen_ai.prompt.",
                                                                                    "gen_ai.completion."))}
    meta["span_name"] = span.get("name")
    if resource.get("service.name"):
        meta["service.name"] = resource["service.name"]
    agent = attrs.get("gen_ai.agent.name") or resource.get("service.name") or ctx.agent
    session = attrs.get("gen_ai.conversation.id") or attrs.get("session.id") or span.get("traceId")
    return CallRecord(
        request=request, response=response, input_id=span.get("spanId"),
        timestamp=parse_timestamp(start) if start else None,
        latency_ms=(end - start) / 1e6 if start and end else None,
        agent=agent, session=session, model=attrs.get("gen_ai.response.model") or model,
        prompt_tokens=usage_in, completion_tokens=usage_out,
        status="error" if failed else "ok",
        error=(status.get("message") or attrs.get("error.type") or "span status ERROR") if failed else None,
        source="import:otel", metadata=meta,
    )


def _is_genai_span(span: dict[str, Any]) -> bool:
    attrs = attributes(span.get("attributes"))
    return any(k.startswith("gen_ai.") for k in attrs) or any(
        k.startswith("gen_ai.") for e in span.get("events") or [] for k in attributes(e.get("attributes")))


class OtelFormat:
    name = "otel"
    description = "OpenTelemetry GenAI spans, OTLP JSON (gen_ai.input/output.messages or gen_ai.prompt/completion)"

    def detect(self, first_objects: list[Any]) -> float:
        return 0.95 * share(first_objects, lambda o: any(_is_genai_span(s) for s, _ in _spans(o)))

    def convert(self, obj: Any, ctx: ConvertContext) -> list[CallRecord]:
        if not isinstance(obj, dict):
            raise FormatError(f"expected an OTLP JSON object, got {type(obj).__name__}")
        records = []
        spans = list(_spans(obj))
        for span, resource in spans:
            try:
                rec = convert_span(span, resource, ctx)
            except FormatError as exc:
                if len(spans) == 1:
                    raise
                ctx.skip(str(exc))  # one bad span must not cost the rest of its batch
                continue
            if rec is not None:
                records.append(rec)
        return records


register(OtelFormat(), aliases=("opentelemetry",))
