"""``chat_format.message_text`` is the one place message content becomes text; each caller's rule is pinned here.

The cluster view's text feeds view fingerprints and embedding caches, so its outputs below were recorded before
the callers were unified and must never change. The other callers' outputs are the old ones too, except where
the old code was wrong (noted per case): a ``None`` text part crashed five callers, a dict content became a
Python repr (or crashed curate and the metrics), a falsy content such as ``0`` vanished in the metrics and the
judge, bare string parts were dropped by the metrics, the judge and curate.
"""

from __future__ import annotations

import pytest

from slmigrate import chat_format
from slmigrate.curate import run as curate
from slmigrate.evaluate import judge
from slmigrate.evaluate import metrics
from slmigrate import usage
from slmigrate.chat_format import message_text
from slmigrate.cluster import views
from slmigrate.config import CurateConfig
from slmigrate.record import CallRecord

IMAGE = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
AUDIO = {"type": "input_audio", "input_audio": {"data": "ü", "format": "wav"}}
TOOL_CALL = {"id": "c1", "type": "function", "function": {"name": "get_order", "arguments": '{"id": 1}'}}

# case: (message, model text (drop), cluster view text, token-count text, judge line)
CASES = {
    "string": ({"role": "user", "content": "Hi  there\n"},
               "Hi  there\n", "Hi  there\n", "user\nHi  there\n", "user: Hi  there\n"),
    "none": ({"role": "assistant", "content": None}, "", "", "assistant", "assistant: "),
    "no content key": ({"role": "assistant"}, "", "", "assistant", "assistant: "),
    "text and image parts": (
        {"role": "user", "content": [{"type": "text", "text": "Look at"}, IMAGE, {"type": "text", "text": "this é"}]},
        "Look atthis é", "Look at [image_url] this é",
        'user\nLook at{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}this é',
        "user: Look atthis é"),
    "image only": ({"role": "user", "content": [IMAGE]}, "", "[image_url]",
                   'user\n{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}', "user: "),
    # Token counts used to escape non-ASCII in parts only (ensure_ascii), unlike everywhere else.
    "audio part": ({"role": "user", "content": [AUDIO]}, "", "[input_audio]",
                   'user\n{"type": "input_audio", "input_audio": {"data": "ü", "format": "wav"}}', "user: "),
    # The view has always named an empty text part; token counts now count it as sent (was: nothing).
    "empty text part": ({"role": "user", "content": [{"type": "text", "text": ""}, {"type": "text", "text": "x"}]},
                        "x", "[text] x", 'user\n{"type": "text", "text": ""}x', "user: x"),
    # Was a TypeError in chat_format, the metrics, the judge and token counts.
    "None text part": ({"role": "user", "content": [{"type": "text", "text": None}, {"type": "text", "text": "x"}]},
                       "x", "[text] x", 'user\n{"type": "text", "text": null}x', "user: x"),
    # Were dropped by the metrics, the judge and curate, and quoted as JSON by token counts.
    "bare string parts": ({"role": "user", "content": ["a", "b"]}, "ab", "a b", "user\nab", "user: ab"),
    "input_text part": ({"role": "user", "content": [{"type": "input_text", "input_text": "resp"}]},
                        "resp", "resp", "user\nresp", "user: resp"),
    "tool call": ({"role": "assistant", "content": None, "tool_calls": [TOOL_CALL]},
                  "", "", 'assistant\nget_order\n{"id": 1}', "assistant:  [tool calls: get_order]"),
    "text and tool call": ({"role": "assistant", "content": "Checking.", "tool_calls": [TOOL_CALL]},
                           "Checking.", "Checking.", 'assistant\nChecking.\nget_order\n{"id": 1}',
                           "assistant: Checking. [tool calls: get_order]"),
    # A refusal is not content: every caller ignores it (curate then drops the call as an empty answer).
    "refusal field": ({"role": "assistant", "content": None, "refusal": "I can't help with that."},
                      "", "", "assistant", "assistant: "),
    "refusal part": ({"role": "assistant", "content": [{"type": "refusal", "refusal": "No."}]},
                     "", "[refusal]", 'assistant\n{"type": "refusal", "refusal": "No."}', "assistant: "),
    # Was a Python repr in chat_format and the judge, a crash in curate and the metrics.
    "dict content": ({"role": "user", "content": {"a": 1, "b": "ü"}}, '{"a": 1, "b": "ü"}', '{"a": 1, "b": "ü"}',
                     'user\n{"a": 1, "b": "ü"}', 'user: {"a": 1, "b": "ü"}'),
    # Was "" in the metrics and the judge.
    "zero content": ({"role": "user", "content": 0}, "0", "0", "user\n0", "user: 0"),
    "tool result": ({"role": "tool", "tool_call_id": "c1", "name": "get_order", "content": '{"ok": true}'},
                    '{"ok": true}', '{"ok": true}', 'tool\n{"ok": true}\nget_order', 'tool: {"ok": true}'),
}


@pytest.mark.parametrize("case", list(CASES))
def test_each_callers_text(case):
    message, model_text, view, counted, judge_line = CASES[case]
    assert message_text(message) == model_text
    assert views.view_text(message) == view
    assert usage.counted_text(message) == counted
    assert judge.task_text({"messages": [message]}) == judge_line


def test_no_message_is_empty_text():
    assert message_text(None) == "" and chat_format.serialise_answer(None) == ""


@pytest.mark.parametrize("case", list(CASES))
def test_answers_use_the_model_text(case):
    """Training answers, metrics and curate's empty-answer check all read the same text of an answer."""
    message, model_text, *_ = CASES[case]
    tool_lines = [line for line in chat_format.serialise_answer(message).split("\n") if line.startswith("<tool")]
    assert chat_format.serialise_answer(message) == "\n".join([model_text.strip()] * bool(model_text.strip())
                                                               + tool_lines)
    assert metrics.label_exact([message], [{"content": model_text}], None) == [1.0]
    call = CallRecord(request={"messages": [{"role": "user", "content": "hi"}]},
                      response={"choices": [{"message": message, "finish_reason": "stop"}]})
    empty = not model_text.strip() and not message.get("tool_calls")
    assert (curate.drop_reason(call, CurateConfig()) == "empty_answer") is empty


def test_view_of_a_call_with_an_image_turn():
    """The whole task view (what is fingerprinted and embedded) of a call whose user turn carries an image."""
    call = CallRecord(request={"messages": [
        {"role": "system", "content": [{"type": "text", "text": "You sort 12 photos."}]},
        {"role": "user", "content": [{"type": "text", "text": "Which one?"}, IMAGE]}]},
        response={"choices": [{"message": {"role": "assistant", "content": "cat"}, "finish_reason": "stop"}]})
    view = views.task_view(call)
    assert view.turn == "user: Which one? [image_url]"
    assert view.system_chunks == ("You sort 0 photos.",)
    assert (view.kind, view.answer) == ("label", "short label answer")
