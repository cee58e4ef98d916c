"""``conversation``: one whole agent trajectory per record, as the agent kept its ``messages``.

``{"messages" | "traj" | "trajectory": [...], "tools"?: [...], id?/task_id?/trial?, reward?, metadata?}``.
Every assistant turn becomes one call: its request is all messages before the turn plus the tools (the
record's own, else ``--tools FILE``), its response a completion holding the turn. The calls of one record share
a session (the record's ``session``/``id``, else ``task_id:trial``) and its outcome (``reward`` and the like).
"""

from __future__ import annotations

from typing import Any

from slmigrate.collect.formats import ConvertContext, FormatError, register
from slmigrate.collect.formats._common import (
    OUTCOME_KEYS, SESSION_KEYS, as_outcome, completion, fill_from_metadata, first_key, normalise_tools, share,
    upgrade_messages,
)
from slmigrate.record import CallRecord, parse_timestamp

_LIST_KEYS = ("traj", "trajectory", "messages", "conversation")
_FT_KEYS = {"messages", "tools", "functions", "parallel_tool_calls"}


def _messages(obj: dict[str, Any]) -> tuple[str, Any] | None:
    for key in _LIST_KEYS:
        if isinstance(obj.get(key), list):
            return key, obj[key]
    return None


class ConversationFormat:
    name = "conversation"
    description = "agent trajectories (messages/traj list); every assistant turn is one call"

    def detect(self, first_objects: list[Any]) -> float:
        def ok(o: dict[str, Any]) -> bool:
            found = _messages(o)
            if not found or not any(isinstance(m, dict) and m.get("role") == "assistant" for m in found[1]):
                return False
            return found[0] != "messages" or not set(o) <= _FT_KEYS or \
                sum(isinstance(m, dict) and m.get("role") == "assistant" for m in found[1]) > 1

        return 0.8 * share(first_objects, ok)

    def convert(self, obj: Any, ctx: ConvertContext) -> list[CallRecord]:
        if not isinstance(obj, dict):
            raise FormatError(f"expected one trajectory object per record, got {type(obj).__name__}")
        found = _messages(obj)
        if not found:
            raise FormatError(f"no message list (expected one of: {', '.join(_LIST_KEYS)})")
        key, raw = found
        bad = next((i for i, m in enumerate(raw) if not isinstance(m, dict) or "role" not in m), None)
        if bad is not None:
            raise FormatError(f"{key}[{bad}] is not a message with a 'role'")
        messages = upgrade_messages(raw)
        tools_value = obj.get("tools") if obj.get("tools") is not None else obj.get("functions")
        tools = normalise_tools(tools_value) if tools_value else ctx.tools
        meta_in = obj.get("metadata") if isinstance(obj.get("metadata"), dict) else {}
        base = {k: v for k, v in obj.items() if k not in (key, "tools", "functions", "metadata")}
        session = first_key(obj, ("session", "id") + SESSION_KEYS) or first_key(meta_in, SESSION_KEYS)
        if session is None and obj.get("task_id") is not None:
            session = f"{obj['task_id']}:{obj['trial']}" if obj.get("trial") is not None else str(obj["task_id"])
        outcome = as_outcome(first_key(obj, OUTCOME_KEYS))
        if outcome is None and isinstance(obj.get("info"), dict):
            outcome = as_outcome(first_key(obj["info"], OUTCOME_KEYS))
        model = obj.get("model") if isinstance(obj.get("model"), str) else meta_in.get("model")
        records = []
        for i, msg in enumerate(messages):
            if msg.get("role") != "assistant" or i == 0:
                continue
            request: dict[str, Any] = {"messages": messages[:i]}
            if model:
                request["model"] = model
            if tools:
                request["tools"] = tools
            rec = CallRecord(
                request=request,
                response=completion(msg, model=model),
                input_id=f"{session}#{i}" if session is not None else None,
                timestamp=parse_timestamp(msg.get("timestamp") or obj.get("timestamp")),
                session=None if session is None else str(session),
                model=model,
                outcome=outcome,
                source="import:conversation",
                metadata={**base, **meta_in, "turn": i},
            )
            records.append(fill_from_metadata(rec, obj, meta_in, agent=ctx.agent))
        if not records:
            raise FormatError("the trajectory has no assistant turn after the first message")
        return records


register(ConversationFormat(), aliases=("trajectory",))
