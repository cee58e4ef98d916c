"""Is a small model's answer safe to hand to the agent? The router never returns a broken answer.

Checks, by what the request and the cluster expect:

* tool calls: every called function was offered in ``tools``; its arguments parse as a JSON object and fit the
  function's JSON Schema (``parameters``); when the cluster always calls a tool, a text answer is a failure too;
* JSON clusters: the content parses as JSON (and is an object when the LLM's answers were objects);
* every kind: the answer is not empty.

``validate_answer`` returns the list of problems; an empty list means the answer may be returned.
"""

from __future__ import annotations

import json
from typing import Any


def _schema_problems(arguments: Any, schema: dict[str, Any] | None) -> list[str]:
    if not schema:
        return []
    from jsonschema import Draft202012Validator
    from jsonschema.exceptions import SchemaError

    try:
        validator = Draft202012Validator(schema)
        return [f"argument {'/'.join(map(str, e.absolute_path)) or '(root)'}: {e.message}"
                for e in validator.iter_errors(arguments)][:5]
    except SchemaError:
        # A tool whose own schema is invalid cannot be checked; the upstream LLM had the same schema.
        return []


def validate_answer(message: dict[str, Any], tools: list[dict[str, Any]] | None, output_kind: str | None) -> list[str]:
    problems: list[str] = []
    offered = {((t.get("function") or {}).get("name")): (t.get("function") or {}).get("parameters")
               for t in tools or [] if t.get("type", "function") == "function"}
    calls = message.get("tool_calls") or []
    content = message.get("content")
    if not calls and not (isinstance(content, str) and content.strip()):
        return ["empty answer"]
    for call in calls:
        fn = call.get("function") or {}
        name = fn.get("name")
        if name not in offered:
            problems.append(f"called tool {name!r}, which the request did not offer")
            continue
        try:
            arguments = json.loads(fn.get("arguments") or "{}")
        except json.JSONDecodeError as exc:
            problems.append(f"arguments of {name!r} are not valid JSON: {exc.msg}")
            continue
        if not isinstance(arguments, dict):
            problems.append(f"arguments of {name!r} are not a JSON object")
            continue
        problems.extend(f"{name}: {p}" for p in _schema_problems(arguments, offered[name]))
    if output_kind == "tool_call" and not calls and offered:
        problems.append("the task calls a tool, but the answer is text")
    if output_kind == "json" and not calls:
        try:
            json.loads(content or "")
        except json.JSONDecodeError:
            problems.append("the task answers in JSON, but the answer does not parse")
    return problems
