"""``toolbench``: ToolBench answer files (ChatGPT tool-use search trees in the legacy function-call form).

One JSON object per file: ``{"win": bool, "answer_generation": {"function": [...], "train_messages": [[...], ...],
"query": str, "finish_type": str, "valid_data": bool}, "tree": ...}``. Each ``train_messages`` entry is one
logged call - the conversation up to and including the model's answer - so each becomes one call, with the
legacy ``functions``/``function_call``/``function`` messages converted to tools/tool_calls/tool messages.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from slmigrate.collect.formats import ConvertContext, FormatError, register
from slmigrate.collect.formats._common import completion, normalise_tools, share, upgrade_messages
from slmigrate.record import CallRecord


class ToolBenchFormat:
    name = "toolbench"
    description = "ToolBench answer files (legacy functions/function_call traces)"

    def detect(self, first_objects: list[Any]) -> float:
        return 0.9 * share(first_objects, lambda o: isinstance(o.get("answer_generation"), dict))

    def convert(self, obj: Any, ctx: ConvertContext) -> list[CallRecord]:
        gen = obj.get("answer_generation") if isinstance(obj, dict) else None
        if not isinstance(gen, dict):
            raise FormatError("no 'answer_generation' object (expected a ToolBench answer file)")
        convs = gen.get("train_messages")
        if not isinstance(convs, list) or not convs:
            raise FormatError("no answer_generation.train_messages: this answer has no usable calls "
                              f"(valid_data={gen.get('valid_data')})")
        tools = normalise_tools(gen["function"], "answer_generation.function") if gen.get("function") else ctx.tools
        path = Path(ctx.file)
        session = f"{path.parent.name}/{path.stem}" if ctx.file else None
        meta = {k: gen[k] for k in ("query", "finish_type", "valid_data", "query_count") if k in gen}
        outcome = None if obj.get("win") is None else (1.0 if obj["win"] else 0.0)
        records = []
        for k, conv in enumerate(convs):
            if not isinstance(conv, list) or len(conv) < 2 or not isinstance(conv[-1], dict) \
                    or conv[-1].get("role") != "assistant":
                raise FormatError(f"train_messages[{k}] does not end with an assistant message")
            messages = upgrade_messages(conv)
            request: dict[str, Any] = {"messages": messages[:-1]}
            if tools:
                request["tools"] = tools
            records.append(CallRecord(
                request=request, response=completion(messages[-1]), session=session,
                input_id=f"{session}#{k}" if session else None, outcome=outcome, agent=ctx.agent,
                source="import:toolbench", metadata={**meta, "step": k},
            ))
        return records


register(ToolBenchFormat())
