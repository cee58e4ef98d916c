"""``openai``: one logged chat-completions call per record, request and response side by side.

Accepted shapes (all one JSON object per call):

- ``{request, response, id?, timestamp?, latency_ms?, model?, usage?, metadata?, agent?, session?, outcome?}``
  - what slmigrate's own export writes, and what most proxies log; NVIDIA Data Flywheel log documents are this
  shape plus ``workload_id``/``client_id`` (epoch-seconds ``timestamp``);
- OpenPipe's export ``{input, output, tags}`` and report ``{reqPayload, respPayload, requestedAt, receivedAt,
  statusCode, errorMessage, tags}``;
- LiteLLM's StandardLoggingPayload ``{id, trace_id, messages, response, model, model_parameters, startTime,
  endTime, completionStartTime, prompt_tokens, completion_tokens, status, error_str, metadata}``;
- generic ``{input, output}`` where input is a request, a messages list or a prompt string and output a
  completion, an assistant message or a string.

The response may also be a streamed one (a list of ``chat.completion.chunk`` objects or the raw SSE text): it is
merged into one completion, tool-call deltas included.
"""

from __future__ import annotations

from typing import Any

from slmigrate.collect.formats import ConvertContext, FormatError, register
from slmigrate.collect.formats._common import (
    as_float, as_int, as_outcome, completion, fill_from_metadata, normalise_response, share, upgrade_request,
    upgrade_response,
)
from slmigrate.record import CallRecord, parse_timestamp


def _is_openai_request(req: Any) -> bool:
    return isinstance(req, dict) and isinstance(req.get("messages"), list) and "system" not in req


def _shape(obj: dict[str, Any]) -> str | None:
    if "request" in obj and "response" in obj:
        return "request"
    if "reqPayload" in obj:
        return "openpipe_report"
    if "messages" in obj and "response" in obj and ("model_parameters" in obj or "call_type" in obj
                                                     or "startTime" in obj):
        return "litellm"
    if "input" in obj and "output" in obj:
        return "input_output"
    return None


def _looks_anthropic(resp: Any) -> bool:
    return isinstance(resp, dict) and resp.get("type") == "message" and isinstance(resp.get("content"), list)


class OpenAIFormat:
    name = "openai"
    description = "one {request, response} per line (also Data Flywheel, OpenPipe, LiteLLM, {input, output})"

    def detect(self, first_objects: list[Any]) -> float:
        def ok(o: dict[str, Any]) -> bool:
            shape = _shape(o)
            if shape == "request":
                return _is_openai_request(o["request"]) and not _looks_anthropic(o["response"])
            if shape == "input_output":
                # Langfuse observations also have input/output; they carry a type and a traceId.
                return "traceId" not in o and o.get("type") not in ("GENERATION", "SPAN", "EVENT")
            return shape is not None

        return 0.9 * share(first_objects, ok)

    def convert(self, obj: Any, ctx: ConvertContext) -> list[CallRecord]:
        if not isinstance(obj, dict):
            raise FormatError(f"expected a JSON object per call, got {type(obj).__name__}")
        shape = _shape(obj)
        if shape is None:
            raise FormatError("no request/response pair (expected 'request' and 'response', or 'input' and "
                              "'output', or LiteLLM's 'messages' and 'response')")
        meta: dict[str, Any] = dict(obj["metadata"]) if isinstance(obj.get("metadata"), dict) else {}
        error = None
        status = obj.get("status")
        latency = as_float(obj.get("latency_ms"))
        ttft = as_float(obj.get("ttft_ms"))
        timestamp = obj.get("timestamp") or obj.get("created_at") or obj.get("time")
        if shape == "request":
            request, raw_response = obj["request"], obj["response"]
            for key in ("workload_id", "client_id"):  # NVIDIA Data Flywheel
                if obj.get(key) is not None:
                    meta.setdefault(key, obj[key])
        elif shape == "openpipe_report":
            request, raw_response = obj.get("reqPayload"), obj.get("respPayload")
            timestamp = timestamp or obj.get("requestedAt")
            if obj.get("requestedAt") and obj.get("receivedAt"):
                latency = latency or float(obj["receivedAt"]) - float(obj["requestedAt"])
            if as_int(obj.get("statusCode")) and int(obj["statusCode"]) >= 400:
                status, error = "error", obj.get("errorMessage") or f"HTTP {obj['statusCode']}"
            if isinstance(obj.get("tags"), dict):
                meta.update(obj["tags"])
        elif shape == "litellm":
            request = {"model": obj.get("model"), "messages": obj["messages"],
                       **(obj.get("model_parameters") or {})}
            raw_response = obj["response"]
            start, end, first = (as_float(obj.get(k)) for k in ("startTime", "endTime", "completionStartTime"))
            timestamp = timestamp or start
            if start is not None and end is not None:
                latency = latency or (end - start) * 1000
            if start is not None and first is not None and first != end:
                ttft = ttft or (first - start) * 1000
            if obj.get("error_str"):
                error = obj["error_str"]
            if obj.get("trace_id"):
                meta.setdefault("trace_id", obj["trace_id"])
            if obj.get("request_tags"):
                meta.setdefault("tags", obj["request_tags"])
        else:  # input/output
            request, raw_response = obj["input"], obj["output"]
            if isinstance(obj.get("tags"), dict):  # OpenPipe export
                meta.update(obj["tags"])
            if isinstance(request, list):
                request = {"messages": request}
            elif isinstance(request, str):
                request = {"messages": [{"role": "user", "content": request}]}
            if isinstance(raw_response, str):
                raw_response = completion({"role": "assistant", "content": raw_response})
            elif isinstance(raw_response, dict) and "role" in raw_response and "choices" not in raw_response:
                raw_response = completion(raw_response)
        if isinstance(request, str):
            import json

            try:
                request = json.loads(request)
            except ValueError as exc:
                raise FormatError("the request is a string that is not JSON") from exc
        if not isinstance(request, dict) or not isinstance(request.get("messages"), list):
            raise FormatError("the request has no 'messages' list (expected an OpenAI chat.completions request)")
        request = upgrade_request(request)
        response, resp_error = normalise_response(raw_response)
        response = upgrade_response(response, len(request["messages"]))
        error = error or resp_error or obj.get("error")
        if isinstance(error, dict):
            error = error.get("message") or str(error)
        if status in ("failure", "error") or error or (response is None and raw_response is not None):
            status = "error"
        else:
            status = "ok"

        usage = obj.get("usage") if isinstance(obj.get("usage"), dict) else {}
        rec = CallRecord(
            request=request,
            response=response,
            input_id=_input_id(obj, response),
            timestamp=parse_timestamp(timestamp),
            latency_ms=latency,
            ttft_ms=ttft,
            agent=obj.get("agent") if isinstance(obj.get("agent"), str) else None,
            session=str(obj["session"]) if obj.get("session") is not None else None,
            model=obj.get("model") if isinstance(obj.get("model"), str) else None,
            prompt_tokens=as_int(usage.get("prompt_tokens", obj.get("prompt_tokens"))),
            completion_tokens=as_int(usage.get("completion_tokens", obj.get("completion_tokens"))),
            status=status,
            error=None if error is None else str(error),
            source="import:openai",
            outcome=as_outcome(obj.get("outcome")),
            metadata=meta,
        )
        fill_from_metadata(rec, meta, {"agent": meta.get("workload_id"), "session": meta.get("trace_id")},
                           agent=ctx.agent)
        return [rec]


def _input_id(obj: dict[str, Any], response: dict[str, Any] | None) -> str | None:
    # slmigrate's own export writes input_id explicitly (null included) so a round trip keeps the content hash.
    if "input_id" in obj:
        return None if obj["input_id"] is None else str(obj["input_id"])
    for key in ("id", "request_id", "call_id"):
        if obj.get(key) is not None:
            return str(obj[key])
    if response and response.get("id"):
        return str(response["id"])
    return None


register(OpenAIFormat())
