"""``openai-ft``: OpenAI fine-tuning JSONL, ``{"messages": [..., assistant answer], "tools": [...]}``.

Each record is one call: the request is every message before the final assistant message (plus the tools, or
the legacy ``functions``), the response a completion holding that final message.
"""

from __future__ import annotations

from typing import Any

from slmigrate.collect.formats import ConvertContext, FormatError, register
from slmigrate.collect.formats._common import completion, normalise_tools, share, upgrade_messages
from slmigrate.record import CallRecord

_FT_KEYS = {"messages", "tools", "functions", "parallel_tool_calls"}


class OpenAIFineTuneFormat:
    name = "openai-ft"
    description = "OpenAI fine-tuning JSONL: messages ending with the assistant answer, plus tools"

    def detect(self, first_objects: list[Any]) -> float:
        def ok(o: dict[str, Any]) -> bool:
            msgs = o.get("messages")
            return (isinstance(msgs, list) and bool(msgs) and isinstance(msgs[-1], dict)
                    and msgs[-1].get("role") == "assistant" and set(o) <= _FT_KEYS)

        # Only the fine-tuning keys: anything else (ids, rewards, task names) suggests a trajectory log.
        return 0.85 * share(first_objects, ok)

    def convert(self, obj: Any, ctx: ConvertContext) -> list[CallRecord]:
        if not isinstance(obj, dict) or not isinstance(obj.get("messages"), list):
            raise FormatError("expected an object with a 'messages' list")
        messages = upgrade_messages(obj["messages"])
        if not messages or not isinstance(messages[-1], dict) or messages[-1].get("role") != "assistant":
            raise FormatError("the last message is not the assistant's answer")
        if len(messages) < 2:
            raise FormatError("there is no prompt before the assistant's answer")
        request: dict[str, Any] = {"messages": messages[:-1]}
        tools = obj.get("tools") if obj.get("tools") is not None else obj.get("functions")
        if tools is None:
            tools = ctx.tools
        if tools:
            request["tools"] = normalise_tools(tools)
        if "parallel_tool_calls" in obj:
            request["parallel_tool_calls"] = obj["parallel_tool_calls"]
        answer = {k: v for k, v in messages[-1].items() if k != "weight"}
        rec = CallRecord(request=request, response=completion(answer), source="import:openai-ft", agent=ctx.agent)
        return [rec]


register(OpenAIFineTuneFormat(), aliases=("openai_ft",))
