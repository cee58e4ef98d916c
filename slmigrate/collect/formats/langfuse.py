"""``langfuse``: observations exported from Langfuse (UI export or the public API), one per record.

``{id, traceId, type: "GENERATION", name?, startTime, endTime?, completionStartTime?, model?, modelParameters?,
input, output, usage?/usageDetails?, metadata?, level?, statusMessage?}``. Only ``GENERATION`` observations are
LLM calls; spans and events are passed over. ``input`` may be a messages list, an object holding ``messages``
(and ``tools``) or a prompt string; ``output`` an assistant message, a completion or a string. A page of the API's
``{"data": [...]}`` is read too.
"""

from __future__ import annotations

from typing import Any

from slmigrate.collect.formats import ConvertContext, FormatError, register
from slmigrate.collect.formats._common import (
    as_float, as_int, completion, fill_from_metadata, normalise_response, normalise_tools, share, upgrade_request,
    upgrade_response,
)
from slmigrate.record import CallRecord, parse_timestamp


def _is_observation(o: dict[str, Any]) -> bool:
    return ("traceId" in o or "trace_id" in o) and "type" in o and ("input" in o or "output" in o)


def _seconds(value: Any) -> float | None:
    ts = parse_timestamp(value)
    if not ts:
        return None
    from datetime import datetime

    try:
        return datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def _request(value: Any, params: dict[str, Any], model: str | None) -> dict[str, Any]:
    if isinstance(value, str):
        request: dict[str, Any] = {"messages": [{"role": "user", "content": value}]}
    elif isinstance(value, list):
        request = {"messages": value}
    elif isinstance(value, dict) and isinstance(value.get("messages"), list):
        request = dict(value)
        if request.get("tools"):
            request["tools"] = normalise_tools(request["tools"], "input.tools")
    else:
        raise FormatError("input is not a prompt, a messages list or an object with 'messages'")
    if model and "model" not in request:
        request = {"model": model, **request}
    for key, val in (params or {}).items():
        request.setdefault(key, val)
    return request


def _response(value: Any, model: str | None, usage: dict[str, Any] | None) -> dict[str, Any] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return completion({"role": "assistant", "content": value}, model=model, usage=usage)
    if isinstance(value, dict) and "choices" in value:
        return normalise_response(value)[0]
    if isinstance(value, dict) and ("content" in value or "tool_calls" in value or "role" in value):
        msg = {"role": "assistant", **value}
        return completion(msg, model=model, usage=usage)
    if isinstance(value, list) and value and isinstance(value[-1], dict) and "role" in value[-1]:
        return completion(value[-1], model=model, usage=usage)
    raise FormatError("output is not a message, a completion or text")


class LangfuseFormat:
    name = "langfuse"
    description = "Langfuse exported observations (GENERATION type)"

    def detect(self, first_objects: list[Any]) -> float:
        def ok(o: dict[str, Any]) -> bool:
            if isinstance(o.get("data"), list):
                return any(isinstance(x, dict) and _is_observation(x) for x in o["data"][:5])
            return _is_observation(o)

        return 0.95 * share(first_objects, ok)

    def convert(self, obj: Any, ctx: ConvertContext) -> list[CallRecord]:
        if not isinstance(obj, dict):
            raise FormatError(f"expected an observation object, got {type(obj).__name__}")
        if isinstance(obj.get("data"), list) and "type" not in obj:
            return [r for item in obj["data"] for r in self.convert(item, ctx)]
        if obj.get("type") != "GENERATION":
            return []
        model = obj.get("model")
        usage_in = obj.get("usageDetails") or obj.get("usage") or {}
        prompt = as_int(usage_in.get("input", usage_in.get("promptTokens", obj.get("promptTokens"))))
        compl = as_int(usage_in.get("output", usage_in.get("completionTokens", obj.get("completionTokens"))))
        usage = None
        if prompt is not None or compl is not None:
            usage = {"prompt_tokens": prompt or 0, "completion_tokens": compl or 0,
                     "total_tokens": (prompt or 0) + (compl or 0)}
        request = upgrade_request(_request(obj.get("input"), obj.get("modelParameters") or {}, model))
        response = upgrade_response(_response(obj.get("output"), model, usage), len(request["messages"]))
        start, end, first = (_seconds(obj.get(k)) for k in ("startTime", "endTime", "completionStartTime"))
        failed = obj.get("level") == "ERROR"
        meta = dict(obj["metadata"]) if isinstance(obj.get("metadata"), dict) else {}
        meta.update({k: obj[k] for k in ("name", "traceId", "parentObservationId", "promptName", "version")
                     if obj.get(k) is not None})
        rec = CallRecord(
            request=request, response=response, input_id=obj.get("id"),
            timestamp=parse_timestamp(obj.get("startTime")),
            latency_ms=(end - start) * 1000 if start is not None and end is not None else
            (as_float(obj.get("latency")) * 1000 if as_float(obj.get("latency")) is not None else None),
            ttft_ms=(first - start) * 1000 if start is not None and first is not None else None,
            session=obj.get("sessionId") or obj.get("traceId") or obj.get("trace_id"),
            model=model, prompt_tokens=prompt, completion_tokens=compl,
            status="error" if failed else "ok", error=obj.get("statusMessage") if failed else None,
            source="import:langfuse", metadata=meta,
        )
        return [fill_from_metadata(rec, meta, agent=ctx.agent)]


register(LangfuseFormat())
