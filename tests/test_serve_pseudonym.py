"""The router's pseudonymisation (slmigrate/serve/pseudonym.py): the small model is asked in curate's fake space,
the agent gets its own values back.

The mapping tests use ``Restore`` directly (no presidio); the scrubbing tests run curate's real scrubber (presidio
and the offline spaCy model, loaded once for the module).
"""

from __future__ import annotations

import json

import pytest

from slmigrate.serve.pseudonym import Pseudonymiser, Restore

BACK = Restore({"Mark Jones": "James Lee", "Mark": "James", "mjones42@example.com": "james.lee@acme.io",
                "WO-356792": "AO-216530", "Zoë Brandt": 'Ann "Annie" O\\Neil'})


def test_plain_text_round_trip_longest_first_and_twice():
    text = "Mark Jones (mjones42@example.com) asked about WO-356792; Mark asked twice about WO-356792."
    assert BACK.text(text) == ("James Lee (james.lee@acme.io) asked about AO-216530; James asked twice about "
                               "AO-216530.")


def test_a_fake_inside_a_longer_word_or_an_invented_one_stays():
    # "Markus" is not "Mark"; "Sarah Cole" and WO-999999 stand for nothing the request held.
    text = "Markus and Sarah Cole, order WO-999999, WO-3567920"
    assert BACK.text(text) == text


def test_json_answers_keep_their_formatting_and_get_escaped_originals():
    answer = '{"customer_name": "Zoë Brandt",\n "email":"mjones42@example.com", "note": "Mark Jones"}'
    out = BACK.text(answer)
    assert json.loads(out) == {"customer_name": 'Ann "Annie" O\\Neil', "email": "james.lee@acme.io",
                               "note": "James Lee"}
    assert out.startswith('{"customer_name": ') and ',\n "email":"' in out  # the model's own layout
    # The model wrote the fake with \u escapes: still recognised, still valid JSON after.
    escaped = json.dumps({"customer_name": "Zoë Brandt"})
    assert "\\u00eb" in escaped and json.loads(BACK.text(escaped)) == {"customer_name": 'Ann "Annie" O\\Neil'}


def test_tool_call_arguments_are_mapped_back_as_json():
    message = {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function",
         "function": {"name": "lookup", "arguments": '{"order_id": "WO-356792", "name": "Zoë Brandt"}'}}]}
    out = BACK.message(message)
    assert json.loads(out["tool_calls"][0]["function"]["arguments"]) == {"order_id": "AO-216530",
                                                                       "name": 'Ann "Annie" O\\Neil'}
    assert out["tool_calls"][0]["function"]["name"] == "lookup" and message["tool_calls"][0]["function"][
        "arguments"].startswith('{"order_id": "WO-')  # a new message; the engine's stays as generated
    assert BACK.message({"role": "assistant", "content": [{"type": "text", "text": "Hi Mark"}]})["content"] == [
        {"type": "text", "text": "Hi James"}]


def test_no_mapping_is_the_identity():
    message = {"role": "assistant", "content": "Mark Jones"}
    assert not Restore() and Restore().message(message) is message


@pytest.fixture(scope="module")
def synthetic():
    p = Pseudonymiser("synthetic", seed=0)
    p.warm()
    return p


def _request(user: str) -> dict:
    return {"model": "gpt-4o", "messages": [
        {"role": "system", "content": "Extract customer_name, email and order_id as JSON."},
        {"role": "user", "content": user}]}


def test_the_request_is_scrubbed_as_curate_scrubs_and_the_answer_comes_back(synthetic):
    raw = _request("Hi, this is Brenda Whitfield, brenda.whitfield@gmail.com. Brenda again: where is my parcel?")
    clean, back = synthetic.pseudonymise(raw)
    text = clean["messages"][1]["content"]
    assert "Brenda" not in text and "brenda.whitfield@gmail.com" not in text and "@example.com" in text
    assert raw["messages"][1]["content"].startswith("Hi, this is Brenda Whitfield")  # the caller's copy untouched
    fake_name = next(f for f, o in back.originals.items() if o == "Brenda Whitfield")
    fake_mail = next(f for f, o in back.originals.items() if o == "brenda.whitfield@gmail.com")
    assert text.count(fake_name) == 1 and fake_name in text and fake_mail in text
    # The same scrubber curate runs: the same request gives the same fakes (seeded), another seed others.
    assert synthetic.pseudonymise(raw)[0] == clean
    assert Pseudonymiser("synthetic", seed=1, analyzer=synthetic.analyzer).pseudonymise(raw)[0] != clean
    answer = json.dumps({"customer_name": fake_name, "email": fake_mail, "order_id": None})
    assert json.loads(back.text(answer)) == {"customer_name": "Brenda Whitfield",
                                             "email": "brenda.whitfield@gmail.com", "order_id": None}


def test_placeholder_mode_and_a_request_without_personal_data(synthetic):
    placeholder = Pseudonymiser("placeholder", analyzer=synthetic.analyzer)
    clean, back = placeholder.pseudonymise(_request("Write to brenda.whitfield@gmail.com please."))
    assert "<EMAIL_ADDRESS_1>" in clean["messages"][1]["content"]
    assert back.text("Sent to <EMAIL_ADDRESS_1>.") == "Sent to brenda.whitfield@gmail.com."
    plain = _request("Which tent is lightest?")
    clean, back = placeholder.pseudonymise(plain)
    assert clean == plain and not back


def test_the_workspace_decides_the_mode(tmp_path):
    from slmigrate.workspace import Workspace

    ws = Workspace(tmp_path / "ws")
    assert Pseudonymiser.for_workspace(ws) is None  # never curated: nothing to match
    config = {"pii": "off", "seed": 0}
    ws.write_manifest("curate", fingerprint="x", config=config)
    assert Pseudonymiser.for_workspace(ws) is None
    ws.write_manifest("curate", fingerprint="y", config={**config, "pii": "synthetic", "seed": 7,
                                                          "allow": ["Acme"], "score_threshold": 0.6})
    found = Pseudonymiser.for_workspace(ws)
    assert found is not None and (found.mode, found.seed, found.allow, found.analyzer.score_threshold) == (
        "synthetic", 7, frozenset({"Acme"}), 0.6)


def test_the_router_asks_the_slm_in_fake_space_and_keeps_the_llm_and_the_log_raw(synthetic, tmp_path):
    """Through the real app and openai client (scripted SLM, stub upstream): the engine gets the scrubbed request,
    its tool call quoting the fake e-mail reaches the client with the real one, and the LLM fallback and the
    router's call log keep the raw request (logs are scrubbed at curate time, not when written)."""
    import re

    import openai
    from stub_llm import ServerThread, StubLLM, stored_calls
    from test_serve import LOOKUP_TOOL, ScriptedEngine, _ask, assign

    from slmigrate.collect.writer import RecordWriter
    from slmigrate.serve import RouterSettings, build_app
    from slmigrate.serve.engine import SlmAnswer
    from slmigrate.store import Store
    from slmigrate.workspace import Workspace

    class EchoEngine(ScriptedEngine):
        """Answers a lookup with the e-mail it was shown; an empty (invalid) answer for intents."""

        def __init__(self, path):
            super().__init__(path)
            self.seen: list[dict] = []

        def answer(self, cluster, request):
            self.seen.append(request)
            shown = re.search(r"[\w.]+@[\w.]+\.\w+", request["messages"][-1]["content"]).group(0)
            reply = ({"role": "assistant", "content": None, "tool_calls": [{"id": "x", "type": "function", "function": {
                "name": "lookup_order", "arguments": json.dumps({"order_id": shown})}}]}
                if cluster == "lookup" else {"role": "assistant", "content": ""})
            return SlmAnswer(message=reply, text="", prompt_tokens=1, completion_tokens=1, latency_ms=1.0,
                             finish_reason="stop")

    db = tmp_path / "ws" / "slmigrate.sqlite"
    ws = Workspace.open(tmp_path / "ws")
    engine = EchoEngine(tmp_path)
    writer = RecordWriter(lambda: Store(db))
    raw_mail = "brenda.whitfield@gmail.com"
    text = f"Hi, Brenda Whitfield here ({raw_mail}). Where is my order?"
    with StubLLM() as stub:
        app, router = build_app(ws, RouterSettings(upstream=stub.url, guard_sample=0), writer=writer, engine=engine,
                                assign=assign, pseudonymiser=synthetic)
        try:
            with ServerThread(app) as server:
                client = openai.OpenAI(base_url=server.base + "/v1", api_key="sk-test", max_retries=0)
                out = client.chat.completions.create(model="gpt-4o", messages=_ask("tool", text), tools=[LOOKUP_TOOL])
                fallback = client.chat.completions.create(model="gpt-4o", messages=_ask("label", text))
        finally:
            records = stored_calls(writer, db, expect=2)
            writer.close()
    asked = [r["messages"][-1]["content"] for r in engine.seen]
    assert len(asked) == 2 and all(raw_mail not in a and "Brenda" not in a and "@example.com" in a for a in asked)
    assert out.model == "slmigrate/lookup"
    assert json.loads(out.choices[0].message.tool_calls[0].function.arguments) == {"order_id": raw_mail}
    # The invalid intent answer fell back: the LLM was asked the raw request.
    assert fallback.choices[0].message.content == f"Echo: {text}"
    assert stub.requests[-1]["body"]["messages"][-1]["content"] == text
    slm = next(r for r in records if r.metadata["route"]["answered_by"] == "slm")
    assert slm.request["messages"][-1]["content"] == text and raw_mail in json.dumps(slm.response)
    assert all("@example.com" not in json.dumps([r.request, r.response]) for r in records)
