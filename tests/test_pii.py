"""PII scrubbing: recognisers, JSON handling, consistent replacement, allow-lists; real presidio in slow tests."""

from __future__ import annotations

import json
import re
import socket

import pytest

from slmigrate.curate.pii import CallScrubber, scrub_calls, texts_of
from slmigrate.curate.pii.engine import (STRUCT, Found, TextAnalyzer, _from_results, _keep, is_json_container,
                                         json_view, text_ranges)
from slmigrate.curate.pii.recognizers import (ACCOUNT_PATTERNS, ADDRESS_PATTERNS, SECRET_PATTERNS, entity_for_key,
                                       regex_findings)
from slmigrate.record import CallRecord

PATTERNS = SECRET_PATTERNS + ACCOUNT_PATTERNS + ADDRESS_PATTERNS

SECRETS = {
    "OPENAI_API_KEY": "sk-proj-Ab3dEf6hIj9kLm2nOp5qRs8tUv1wXy4z",
    "AWS_ACCESS_KEY": "AKIAIOSFODNN7EXAMPLE",
    "GITHUB_TOKEN": "ghp_16C7e42F292c6912E7710c838347Ae178B4a",
    "SLACK_TOKEN": "xoxb-123456789012-1234567890123-AbCdEfGhIjKlMnOpQrStUvWx",
    "JWT": "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U",
    "ANTHROPIC_API_KEY": "sk-ant-api03-Zx8qW2eR4tY6uI8oP0aS2dF4gH6jK8lZ0xC2vB4nM6",
    "GCP_KEY": "AIzaSyD3x4mPl3KeY-0123456789abcdefghijk",
    "STRIPE_KEY": "sk_live_51Hq2Xb9Lm3Nv7Rt5Yp0Ws4Dz",
    "API_TOKEN": "hf_AbCdEfGhIjKlMnOpQrStUvWxYz01234567",
}
# Secrets whose regex takes only part of the match (the part after "AccountKey=", "sig=", "Basic ").
PARTIAL_SECRETS = [
    ("AZURE_KEY", "DefaultEndpointsProtocol=https;AccountName=acme;AccountKey={v};EndpointSuffix=core.windows.net",
     "Zm9vYmFyYmF6cXV4Zm9vYmFyYmF6cXV4Zm9vYmFyYmF6cXV4MTIzNDU2Nzg5MA=="),
    ("AZURE_KEY", "https://acme.blob.core.windows.net/c/f.txt?sv=2022-11-02&sr=b&sig={v}",
     "q8w3ZyKk1e2QAbCdEfGh%2BIjKlMnOpQr%3D"),
    ("AZURE_KEY", "client secret {v} for the app", "Xy19Q~AbCdEfGhIjKlMnOpQrStUvWxYz0123456"),
    ("SLACK_TOKEN", "POST https://hooks.slack.com/services/{v}", "T0123ABCD/B0456EFGH/AbCdEfGhIjKlMnOpQrStUvWx"),
    ("BEARER_TOKEN", "Authorization: Basic {v}", "c3ZjLWRlcGxveTpodW50ZXIy"),
    ("URL_PASSWORD", "mongodb+srv://deploy:{v}@cluster0.mongodb.net/app", "p@ss:w0rd!"),
]
PEM = ("-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA7bq9fN2Lx0\nq8w3ZyKk1e2Q==\n"
       "-----END RSA PRIVATE KEY-----")


def _regex_find(text: str) -> list[tuple[str, str]]:
    return [(e, text[a:b]) for e, a, b, _ in regex_findings(text, PATTERNS)]


@pytest.mark.parametrize("entity,secret", sorted(SECRETS.items()))
def test_each_secret_recogniser(entity, secret):
    found = _regex_find(f"use the key {secret} for the deploy")
    assert (entity, secret) in found


@pytest.mark.parametrize("entity,template,secret", PARTIAL_SECRETS)
def test_secret_recognisers_take_the_secret_part(entity, template, secret):
    assert (entity, secret) in _regex_find(template.format(v=secret))


@pytest.mark.parametrize("kind", ["RSA PRIVATE KEY", "EC PRIVATE KEY", "OPENSSH PRIVATE KEY", "PRIVATE KEY",
                                  "ENCRYPTED PRIVATE KEY", "PGP PRIVATE KEY BLOCK"])
def test_pem_blocks_of_every_kind_whole_also_json_escaped_or_cut_off(kind):
    pem = f"-----BEGIN {kind}-----\nMIIEowIBAAKCAQEA7bq9fN2Lx0\nq8w3ZyKk1e2Q==\n-----END {kind}-----"
    assert ("PRIVATE_KEY", pem) in _regex_find(f"key: {pem} ok")
    escaped = json.dumps(pem)[1:-1]  # a JSON text nobody decoded: the line breaks are the two characters \n
    assert ("PRIVATE_KEY", escaped) in _regex_find(f'{{"key": "{escaped}"}}')
    cut = pem.rsplit("\n", 1)[0]  # a log that kept the key but not its END line
    assert ("PRIVATE_KEY", cut) in _regex_find(f"{cut}\n")
    assert ("PRIVATE_KEY", json.dumps(cut)[1:-1]) in _regex_find(json.dumps({"k": cut}))


def test_openai_pattern_leaves_anthropic_keys_to_their_own():
    found = _regex_find(f"keys {SECRETS['ANTHROPIC_API_KEY']} and {SECRETS['OPENAI_API_KEY']}")
    assert ("ANTHROPIC_API_KEY", SECRETS["ANTHROPIC_API_KEY"]) in found
    assert not any(e == "OPENAI_API_KEY" and v.startswith("sk-ant-") for e, v in found)


@pytest.mark.parametrize("key", ["client_secret", "aws_secret_access_key", "SecretAccessKey", "SessionToken",
                                 "db_password", "private_key_id", "AccountKey", "connection_string", "csrf_token"])
def test_key_rules_name_secrets_by_their_key(key):
    assert entity_for_key(key) == "SECRET"


@pytest.mark.parametrize("key", ["max_tokens", "completion_tokens", "token_type", "public_key", "sort_key"])
def test_key_rules_leave_look_alike_keys(key):
    assert entity_for_key(key) != "SECRET"


def test_private_key_bearer_and_url_password():
    found = _regex_find(f"key:\n{PEM}\nthen curl -H 'Authorization: Bearer abcdef0123456789ABCDEF.xyz' "
                        "postgres://admin:hunter2@db.internal:5432/app and password=S3cr3tPass!")
    assert ("PRIVATE_KEY", PEM) in found
    assert ("BEARER_TOKEN", "abcdef0123456789ABCDEF.xyz") in found  # the token only; "Bearer" stays
    assert ("URL_PASSWORD", "hunter2") in found
    assert ("SECRET", "S3cr3tPass!") in found


def test_account_ids_and_addresses():
    text = ("user james_lee_6136 paid with credit_card_1234567 and gift_card_7654321, order #W4073673, "
            "reservation number is XEWRD9; ship to 362 Spruce Street Suite 647")
    found = _regex_find(text)
    assert ("USER_ID", "james_lee_6136") in found
    assert ("PAYMENT_ID", "credit_card_1234567") in found
    assert ("PAYMENT_ID", "gift_card_7654321") in found
    assert ("ORDER_ID", "#W4073673") in found
    assert ("RESERVATION_ID", "XEWRD9") in found
    assert ("STREET_ADDRESS", "362 Spruce Street Suite 647") in found
    # tool names and ordinary words are not ids
    assert not [f for f in _regex_find("call get_user_details then find_user_id_by_name_zip") if f[0] == "USER_ID"]
    assert not [f for f in _regex_find("PLEASE HOLD ON, TRANSFERRED") if f[0] == "RESERVATION_ID"]


def test_key_rules():
    assert entity_for_key("first_name") == "PERSON"
    assert entity_for_key("Email") == "EMAIL_ADDRESS"
    assert entity_for_key("user_id") == "USER_ID"
    assert entity_for_key("dob") == "DATE_OF_BIRTH"
    assert entity_for_key("api_key") == "SECRET"
    assert entity_for_key("flight_number") is None
    assert entity_for_key("name") is None  # product and plan names too: not a person by key alone


def test_json_view_keys_values_and_structure():
    obj = {"user_id": "james_lee_6136", "name": {"first_name": "James"}, "origin": "JFK",
           "payment_methods": {"gift_card_1712795": {"amount": 88}}, "note": "call me"}
    view, ranges, keyed = json_view(obj)
    values = [view[a:b] for a, b in ranges]
    assert "james_lee_6136" in values and "gift_card_1712795" in values and "JFK" in values
    assert "user_id" not in values  # keys are never values
    assert Found("USER_ID", "james_lee_6136", 0.95, "key") in keyed
    assert Found("PERSON", "James", 0.95, "key") in keyed
    assert any(f.entity == STRUCT and f.value == "JFK" for f in keyed)
    assert is_json_container('{"a": 1}') == {"a": 1}
    assert is_json_container('"just a string"') is None and is_json_container("not json {") is None


def test_text_ranges_skip_line_labels():
    text = "Airplane Mode: OFF\nName: John Smith"
    values = [text[a:b] for a, b in text_ranges(text)]
    assert all("Airplane Mode" not in v for v in values)
    assert any("John Smith" in v for v in values)


def test_keep_rules():
    assert not _keep(Found("PERSON", "JFK", 0.85))
    assert not _keep(Found("PERSON", "W3189752", 0.85))
    assert not _keep(Found("PHONE_NUMBER", "2024-05-24", 0.4))
    assert _keep(Found("PERSON", "Mia Li", 0.85))


class _Result:
    def __init__(self, entity_type, start, end, score=0.85):
        self.entity_type, self.start, self.end, self.score = entity_type, start, end, score


def test_fragments_inside_longer_spans_are_dropped():
    text = "pay with credit_card_4959530 at 931 Maple Drive"
    results = [_Result("PAYMENT_ID", 9, 28, 0.95), _Result("PHONE_NUMBER", 21, 28, 0.4),
               _Result("STREET_ADDRESS", 32, 47, 0.7), _Result("PERSON", 36, 47)]
    values = {(f.entity, f.value) for f in _from_results(text, [(0, len(text))], results)}
    assert values == {("PAYMENT_ID", "credit_card_4959530"), ("STREET_ADDRESS", "931 Maple Drive")}


@pytest.mark.parametrize("text,address", [
    ("send it to 4821 Birchwood Lane Apt 12 please", "4821 Birchwood Lane Apt 12"),
    ("deliver to 31 87 Old Mill Road, Leeds", "31 87 Old Mill Road"),  # postcode or second number first
    ("his address: 2207 Lindenallee 14, Bonn", "2207 Lindenallee 14"),
    ("we moved to 518 Kowalska 9\nKraków", "518 Kowalska 9"),  # name-then-number, after a building number
    ("she lives at Tammikatu 7, Tampere", "Tammikatu 7"),
    ("the office is on Brauerstrasse 22", "Brauerstrasse 22"),
    ("2150 rue des lilas 14\napt. 3", "2150 rue des lilas 14"),  # lower-case foreign prefix
    ("PO Box 4471, Springfield", "PO Box 4471"),
    ("USNS Harlow\nFPO AE 09512", "FPO AE 09512"),
    ("Dayton\n, OH\n 45402", "OH\n 45402"),  # "<City>, <ST> <ZIP>" tail, split over lines
])
def test_address_shapes(text, address):
    from slmigrate.curate.pii.recognizers import address_patterns

    found = [text[a:b] for e, a, b, _ in regex_findings(text, address_patterns()) if e == "STREET_ADDRESS"]
    assert any(address in f for f in found), found  # the whole address is inside one found span


def test_address_country_postcode_tail_and_non_addresses():
    from slmigrate.curate.pii.recognizers import address_patterns

    def found(text):
        return [text[a:b] for e, a, b, _ in regex_findings(text, address_patterns()) if e == "STREET_ADDRESS"]

    assert "40112" in found("12 Main Street\nBologna\nItaly 40112")
    for text in ("During 2019, sales grew", "I bought 100 Widgets 20 times", "Flight 1234 departs at 10",
                 "Spring 2024 collection", "order 5512 Items 3 and 4 shipped", "Italy 2-1 Spain"):
        assert found(text) == [], text


@pytest.mark.parametrize("text,name", [
    ("hello, my name is tamsin and I need help", "tamsin"),
    ("My name is Oskar Lindqvist.", "Oskar Lindqvist"),
    ("What is your last name? Okonkwo", "Okonkwo"),
    ("everyone calls me Benny", "Benny"),
    ("Dear Mrs. Halvorsen, thank you", "Halvorsen"),
    ("Dr Anna K. Berg will see you", "Anna K. Berg"),
])
def test_name_cues(text, name):
    from slmigrate.curate.pii.recognizers import NAME_CUES

    assert [text[a:b] for _, a, b, _ in regex_findings(text, NAME_CUES)] == [name]


def test_name_cues_stop_at_function_words():
    from slmigrate.curate.pii.recognizers import NAME_CUES

    text = "my name is nadia and I lost my card"
    assert [text[a:b] for _, a, b, _ in regex_findings(text, NAME_CUES)] == ["nadia"]
    assert regex_findings("the file name is: and then", NAME_CUES) == []
    # a name of a thing, not of the speaker; tool names are no names either
    assert regex_findings("the product name is Water Bottle", NAME_CUES) == []
    assert regex_findings("my name is get_user_details", NAME_CUES) == []


def test_cue_names_kept_without_capitals_but_plain_lower_case_names_not():
    assert _keep(Found("PERSON", "nadia", 0.7, "cue"))
    assert not _keep(Found("PERSON", "nadia", 0.85))
    assert not _keep(Found("PERSON", "4711", 0.7, "cue"))


def test_list_mates_of_names_are_names():
    text = "Guests: Ilse, Tobin, Marguerite and Quill arrived; Apples, Pears and Plums were served."
    people = [(m.start(), m.end()) for m in re.finditer(r"Tobin|Marguerite", text)]
    results = [_Result("PERSON", a, b) for a, b in people]
    values = {f.value for f in _from_results(text, [(0, len(text))], results) if f.entity == "PERSON"}
    assert values == {"Ilse", "Tobin", "Marguerite", "Quill"}  # fruit lists have no named item: untouched


def test_parts_of_a_full_name_used_alone_are_replaced():
    analyzer = FakeAnalyzer()
    call = CallRecord(request={"messages": [
        {"role": "user", "content": "I am James Lee."},
        {"role": "assistant", "content": "Thanks Lee, and Ferdinand Okafor called; Okafor will ring back."}]})
    analyzer.cache["Thanks Lee, and Ferdinand Okafor called; Okafor will ring back."] = [
        Found("PERSON", "Ferdinand Okafor", 0.85)]
    found = CallScrubber(analyzer).findings(call)
    assert found.get("Okafor") == "PERSON"  # used alone later in the call
    assert "Ferdinand" not in found  # never alone: no separate finding


# --- scrubbing with a fake analyzer: regex recognisers + key rules + a fixed name list, no spaCy ---
NAMES = ("Mia Li", "James Lee", "Mia", "James", "Lee", "Zoë Kraus")


class FakeAnalyzer(TextAnalyzer):
    def analyze_many(self, texts, progress=None):
        for text in texts:
            if not text or text in self.cache:
                continue
            obj = is_json_container(text)
            if obj is None:
                view, ranges, keyed = text, text_ranges(text), []
            else:
                view, ranges, keyed = json_view(obj)
            results = [_Result(*r) for r in regex_findings(view, PATTERNS)]
            for m in re.finditer(r"[\w.]+@[\w.]+\.\w+", view):
                results.append(_Result("EMAIL_ADDRESS", m.start(), m.end(), 1.0))
            for name in NAMES:
                for m in re.finditer(rf"\b{name}\b", view):
                    results.append(_Result("PERSON", m.start(), m.end()))
            self.cache[text] = [f for f in keyed + _from_results(view, ranges, results)
                                if (f.entity in self.entities or f.entity == STRUCT) and _keep(f)]


def _tau_call(extra_system: str = "") -> CallRecord:
    tool_result = json.dumps({
        "user_id": "mia_li_3668", "name": {"first_name": "Mia", "last_name": "Li"},
        "address": {"address1": "975 Sunset Drive", "city": "Austin"}, "email": "mia.li3818@example.com",
        "payment_methods": {"credit_card_4421486": {"source": "credit_card", "id": "credit_card_4421486"}},
        "membership": "gold", "reservations": ["NO6JO3"],
    })
    return CallRecord(
        request={
            "messages": [
                {"role": "system", "content": "You are an airline agent. " + extra_system},
                {"role": "user", "content": "Hi, I'm Mia Li (mia_li_3668). Please book with my card."},
                {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function", "function": {
                    "name": "get_user_details", "arguments": json.dumps({"user_id": "mia_li_3668"})}}]},
                {"role": "tool", "tool_call_id": "c1", "content": tool_result},
            ],
            "tools": [{"type": "function", "function": {
                "name": "get_user_details", "description": "Get the details of a user.",
                "parameters": {"type": "object", "properties": {
                    "user_id": {"type": "string"}, "cabin": {"type": "string", "enum": ["economy", "business"]}}}}}],
        },
        response={"choices": [{"finish_reason": "tool_calls", "message": {
            "role": "assistant", "content": "Thanks Mia Li, using credit_card_4421486.",
            "tool_calls": [{"id": "c2", "type": "function", "function": {
                "name": "book_reservation",
                "arguments": json.dumps({"user_id": "mia_li_3668", "payment_id": "credit_card_4421486",
                                         "cabin": "economy", "email": "mia.li3818@example.com"})}}]}}]},
        session="s1",
    ).finalise()


def _all_text(call: CallRecord) -> str:
    return json.dumps(call.request) + json.dumps(call.response)


PII_VALUES = ("Mia", "mia_li_3668", "mia.li3818@example.com", "credit_card_4421486", "975 Sunset Drive", "NO6JO3")


def test_placeholder_consistent_across_messages_and_tool_args():
    [clean], replaced, _ = scrub_calls([_tau_call()], mode="placeholder", analyzer=FakeAnalyzer())
    text = _all_text(clean)
    for value in PII_VALUES:
        assert value not in text
    msgs = clean.request["messages"]
    assert "<USER_ID_1>" in msgs[1]["content"]
    assert json.loads(msgs[2]["tool_calls"][0]["function"]["arguments"]) == {"user_id": "<USER_ID_1>"}
    result = json.loads(msgs[3]["content"])  # still JSON, same keys
    assert set(result) == {"user_id", "name", "address", "email", "payment_methods", "membership", "reservations"}
    assert result["user_id"] == "<USER_ID_1>" and result["membership"] == "gold"
    assert result["address"]["city"] == "Austin"  # LOCATION is not scrubbed by default
    payment_placeholder = result["payment_methods"]["<PAYMENT_ID_1>"]["id"]  # ids used as keys go too
    assert payment_placeholder == "<PAYMENT_ID_1>"
    answer = clean.response["choices"][0]["message"]
    args = json.loads(answer["tool_calls"][0]["function"]["arguments"])
    assert args["payment_id"] == "<PAYMENT_ID_1>" and args["user_id"] == "<USER_ID_1>"
    assert args["email"] == result["email"]
    assert args["cabin"] == "economy"  # enum values are structure
    assert "<PERSON_1>" in answer["content"] and "<PERSON_1>" in msgs[1]["content"]
    assert replaced[0]["<USER_ID_1>"] == "USER_ID"
    # the original call is untouched
    assert "mia_li_3668" in _all_text(_tau_call())


def test_synthetic_consistent_seeded_and_natural():
    call = _tau_call()
    [a], _, _ = scrub_calls([call], mode="synthetic", analyzer=FakeAnalyzer(), seed=7)
    [b], _, _ = scrub_calls([call], mode="synthetic", analyzer=FakeAnalyzer(), seed=7)
    [c], _, _ = scrub_calls([call], mode="synthetic", analyzer=FakeAnalyzer(), seed=8)
    assert _all_text(a) == _all_text(b)  # seeded
    assert _all_text(a) != _all_text(c)
    text = _all_text(a)
    for value in PII_VALUES:
        assert value not in text
    assert "<" not in a.request["messages"][1]["content"]
    result = json.loads(a.request["messages"][3]["content"])
    args = json.loads(a.response["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"])
    assert args["user_id"] == result["user_id"] and re.fullmatch(r"[a-z]+_[a-z]+_\d{4}", args["user_id"])
    assert args["payment_id"].startswith("credit_card_") and args["payment_id"] in result["payment_methods"]
    assert args["email"] == result["email"] and args["email"].endswith("@example.com")
    # "Mia Li" and the separate first/last name fields become one consistent fake person
    full = a.request["messages"][1]["content"].split("I'm ")[1].split(" (")[0]
    assert full == f"{result['name']['first_name']} {result['name']['last_name']}"


def test_off_mode_and_secrets_in_system_prompt():
    planted = " ".join(SECRETS.values()) + " db=postgres://svc:Pa55word99@db:5432/x"
    call = _tau_call(planted)
    [same], replaced, _ = scrub_calls([call], mode="off", analyzer=FakeAnalyzer())
    assert same is call and replaced == [{}]
    [clean], _, _ = scrub_calls([call], analyzer=FakeAnalyzer())
    text = _all_text(clean)
    for secret in [*SECRETS.values(), "Pa55word99"]:
        assert secret not in text
    assert "postgres://svc:<URL_PASSWORD_1>@db" in text


def test_allow_list_and_structure_veto():
    call = _tau_call()
    scrubber = CallScrubber(FakeAnalyzer(), allow={"Mia"})
    found = scrubber.findings(call)
    assert "Mia" not in found and "get_user_details" not in found and "economy" not in found
    assert found["mia_li_3668"] == "USER_ID"


def test_tool_names_in_an_instruction_template_are_no_persons():
    # The MetaGPT-style template "You are a python code to Mermaid Sequence Diagram translator" lost "Mermaid"
    # to spaCy's PERSON, and the cluster stage then named the task "You are a python code to … Sequence ...".
    text = "You are a python code to Mermaid Sequence Diagram translator in function detail. Ask Ferdinand Okafor."
    analyzer = FakeAnalyzer()
    analyzer.cache[text] = [Found("PERSON", "Mermaid", 0.85), Found("PERSON", "Ferdinand Okafor", 0.85)]
    call = CallRecord(request={"messages": [{"role": "user", "content": text}]})
    clean, _ = CallScrubber(analyzer).scrub(call)
    content = clean.request["messages"][0]["content"]
    assert "to Mermaid Sequence Diagram translator" in content and "Ferdinand Okafor" not in content


def test_texts_of_covers_all_roles_and_args():
    texts = texts_of(_tau_call())
    assert any("Mia Li (mia_li_3668)" in t for t in texts)
    assert '{"user_id": "mia_li_3668"}' in texts
    assert any(t.startswith("Thanks Mia Li") for t in texts)
    assert any("book_reservation" not in t and "payment_id" in t for t in texts)


# --- real presidio + spaCy (slow: the model takes ~15 s to load) ---
@pytest.fixture(scope="module")
def real_analyzer():
    return TextAnalyzer()


@pytest.mark.slow
def test_real_analyzer_offline_and_finds_pii(real_analyzer, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    _ = real_analyzer.engine
    text = ("Hi, I'm Richard McCray, e-mail richard.mccray@gmail.com, phone (602) 272-9781, card "
            "4095260993934932, IBAN GB78FDMR12277801695645, from 86.121.97.248, SSN 474-49-7577, "
            "living at 615 Benedum Drive. Token sk-proj-Ab3dEf6hIj9kLm2nOp5qRs8tUv1wXy4z")
    found = {(f.entity, f.value) for f in real_analyzer.analyze(text)}
    for pair in [("PERSON", "Richard McCray"), ("EMAIL_ADDRESS", "richard.mccray@gmail.com"),
                 ("CREDIT_CARD", "4095260993934932"), ("IBAN_CODE", "GB78FDMR12277801695645"),
                 ("IP_ADDRESS", "86.121.97.248"), ("US_SSN", "474-49-7577"),
                 ("STREET_ADDRESS", "615 Benedum Drive"),
                 ("OPENAI_API_KEY", "sk-proj-Ab3dEf6hIj9kLm2nOp5qRs8tUv1wXy4z")]:
        assert pair in found, pair
    assert any(e == "PHONE_NUMBER" and "272-9781" in v for e, v in found)


@pytest.mark.slow
def test_real_scrub_of_a_call(real_analyzer):
    [clean], _, _ = scrub_calls([_tau_call(" ".join(SECRETS.values()))], analyzer=real_analyzer)
    text = _all_text(clean)
    for value in (*PII_VALUES, *SECRETS.values()):
        assert value not in text, value
    for message in clean.request["messages"]:
        for tc in message.get("tool_calls") or []:
            json.loads(tc["function"]["arguments"])
    assert clean.request["messages"][2]["tool_calls"][0]["function"]["name"] == "get_user_details"


@pytest.mark.slow
def test_worker_processes_find_the_same(real_analyzer):
    from slmigrate.curate.pii.engine import analyze_parallel

    texts = [f"Ticket {i}: Mia Li (mia_li_{3000 + i}) wrote from mia{i}@example.com about order #W{4000000 + i}."
             for i in range(140)]
    parallel = TextAnalyzer()
    analyze_parallel(parallel, texts, workers=2, chunk=32)
    real_analyzer.analyze_many(texts)
    assert all(parallel.cache[t] == real_analyzer.cache[t] for t in texts)
    assert ("USER_ID", "mia_li_3005") in {(f.entity, f.value) for f in parallel.cache[texts[5]]}


def test_refine_scrubs_with_the_curate_config_default_of_workers():
    """`[curate] workers` defaults to None (one per CPU core); refine passes it straight to scrub_calls, which
    must resolve it (it once compared None with 1 and crashed)."""
    from slmigrate.config import CurateConfig

    assert CurateConfig().workers is None
    [clean], replaced, _ = scrub_calls([_tau_call()], mode="placeholder", analyzer=FakeAnalyzer(),
                                       workers=CurateConfig().workers)
    assert replaced[0] and "mia.li3818@example.com" not in json.dumps(clean.request)


# --- every field, one replacement per value across a session ---
def _session_call(session: str, n: int, user: str, answer: str, metadata: dict | None = None,
                  tool_result: str | None = None, args: dict | None = None) -> CallRecord:
    messages = [{"role": "system", "content": "You are an airline agent."}, {"role": "user", "content": user}]
    if tool_result is not None:
        messages += [{"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function",
                      "function": {"name": "lookup", "arguments": json.dumps(args or {})}}]},
                     {"role": "tool", "tool_call_id": "c1", "content": tool_result}]
    return CallRecord(request={"messages": messages}, session=session, metadata=metadata or {},
                      response={"choices": [{"finish_reason": "stop", "message": {"role": "assistant",
                                                                                 "content": answer}}]},
                      input_id=f"{session}-{n}").finalise()


def test_metadata_strings_scrubbed_but_safe_and_configured_keys_kept():
    metadata = {"task_id": "task-7", "domain": "airline", "reward": 1.0, "ticket": "mia_li_3668-T1",
                "info": {"task": {"user_id": "mia_li_3668",
                                  "instruction": "You are mia_li_3668 and your e-mail is mia.li3818@example.com."},
                         "passengers": [{"first_name": "Mia", "last_name": "Li", "dob": "1990-04-05"}]},
                "note": "Escalated by James Lee after a long call."}
    call = _session_call("s1", 0, "I'm Mia Li, user mia_li_3668.", "Done, Mia Li.", metadata)
    [clean], replaced, _ = scrub_calls([call], analyzer=FakeAnalyzer(), keep_metadata=["ticket"])
    meta = clean.metadata
    assert (meta["task_id"], meta["domain"], meta["reward"]) == ("task-7", "airline", 1.0)  # known-safe keys
    assert meta["ticket"] == "mia_li_3668-T1"  # kept because the config names it
    user_id = meta["info"]["task"]["user_id"]
    assert user_id == "<USER_ID_1>" and user_id in clean.request["messages"][1]["content"]
    assert meta["info"]["task"]["instruction"] == "You are <USER_ID_1> and your e-mail is <EMAIL_ADDRESS_1>."
    passenger = meta["info"]["passengers"][0]
    assert passenger["dob"].startswith("<DATE_OF_BIRTH_") and "Mia" not in json.dumps(passenger)
    assert "James Lee" not in meta["note"] and meta["note"].startswith("Escalated by <PERSON_")
    assert list(meta) == list(metadata)  # same keys, same order
    assert call.metadata["info"]["task"]["user_id"] == "mia_li_3668"  # the input is untouched
    assert "DATE_OF_BIRTH" in replaced[0].values()
    # without the config key, the ticket is scrubbed like everything else
    [clean], _, _ = scrub_calls([call], analyzer=FakeAnalyzer())
    assert clean.metadata["ticket"] == "<USER_ID_1>-T1"


def test_json_escaped_values_in_tool_arguments_and_results_are_replaced():
    """A PEM's line breaks are \\n escapes in the arguments' JSON text, a name's ë is \\u00eb in an ASCII-only
    tool result: both were found in the decoded view and then looked for, and missed, in the escaped text."""
    result = json.dumps({"status": "stored", "note": "Zoë Kraus approved the key rotation today."})
    assert "\\u00eb" in result
    call = _session_call("s1", 0, f"Store this key:\n{PEM}", "Stored, Zoë Kraus.", tool_result=result,
                         args={"key": PEM, "owner": "mia.li3818@example.com"})
    [clean], _, _ = scrub_calls([call], analyzer=FakeAnalyzer())
    text = _all_text(clean)
    for form in (PEM, json.dumps(PEM)[1:-1], "MIIEowIBAAKCAQEA7bq9fN2Lx0", "Zoë", "Zo\\u00eb", "Kraus"):
        assert form not in text, form
    messages = clean.request["messages"]
    args = json.loads(messages[2]["tool_calls"][0]["function"]["arguments"])
    assert args == {"key": "<PRIVATE_KEY_1>", "owner": "<EMAIL_ADDRESS_1>"}
    assert messages[1]["content"] == "Store this key:\n<PRIVATE_KEY_1>"  # same key, same placeholder
    assert json.loads(messages[3]["content"]) == {"status": "stored",
                                                  "note": "<PERSON_1> approved the key rotation today."}


def test_one_replacement_per_value_across_a_session_even_interleaved():
    a1 = _session_call("a", 0, "I'm Mia Li, mail mia.li3818@example.com", "Hi Mia Li.")
    b1 = _session_call("b", 0, "James Lee here, james.lee@example.org", "Hi James Lee.")
    a2 = _session_call("a", 1, "Also cc ops@acme.example.com please", "Sent to mia.li3818@example.com and "
                                                                         "ops@acme.example.com.")
    [ca1, cb1, ca2], replaced, _ = scrub_calls([a1, b1, a2], analyzer=FakeAnalyzer())
    assert ca1.request["messages"][1]["content"] == "I'm <PERSON_1>, mail <EMAIL_ADDRESS_1>"
    assert cb1.request["messages"][1]["content"] == "<PERSON_1> here, <EMAIL_ADDRESS_1>"  # its own numbering
    # the first e-mail keeps its placeholder in the session's next call; a new one gets the next number
    assert ca2.answer["content"] == "Sent to <EMAIL_ADDRESS_1> and <EMAIL_ADDRESS_2>."
    assert replaced[2] == {"<EMAIL_ADDRESS_1>": "EMAIL_ADDRESS", "<EMAIL_ADDRESS_2>": "EMAIL_ADDRESS"}
    # synthetic mode: one fake per value across the session too
    [sa1, _, sa2], _, _ = scrub_calls([a1, b1, a2], mode="synthetic", analyzer=FakeAnalyzer(), seed=3)
    fake = sa1.request["messages"][1]["content"].split("mail ")[1]
    assert fake.endswith("@example.com") and fake != "mia.li3818@example.com"
    assert sa2.answer["content"].startswith(f"Sent to {fake} and ")


def test_phone_number_under_a_neutral_key_is_not_structure():
    from slmigrate.curate.pii.scrub import _phone_shaped

    result = json.dumps({"status": "ok", "contact": "+1 (415) 555-0142", "item_id": "4768869376"})
    call = _session_call("s1", 0, "Who do I call?", "Call the number on file.", tool_result=result)
    [clean], _, _ = scrub_calls([call], analyzer=FakeAnalyzer())
    content = json.loads(clean.request["messages"][3]["content"])
    assert content == {"status": "ok", "contact": "<PHONE_NUMBER_1>", "item_id": "4768869376"}
    assert _phone_shaped("+44 20 7946 0018") and _phone_shaped("415-555-0142")
    assert not _phone_shaped("4768869376") and not _phone_shaped("HAT136")


@pytest.mark.slow
def test_a_name_under_a_neutral_key_is_not_structure(real_analyzer):
    """Short values under keys that name no PII are structure ("item": "Water Bottle"), but a full name whose
    every word is a listed first or last name is a person wherever it sits."""
    result = json.dumps({"owner": "Zoë Kraus", "assignee": "Martin Keller", "item": "Water Bottle",
                         "product": "Sierra Hammock", "status": "Shipped"})
    call = _session_call("s1", 0, "Who handles my order?", "Your order is shipped.", tool_result=result)
    [clean], _, _ = scrub_calls([call], analyzer=real_analyzer)
    content = json.loads(clean.request["messages"][3]["content"])
    assert content["owner"].startswith("<PERSON_") and content["assignee"].startswith("<PERSON_")
    assert content["item"] == "Water Bottle" and content["status"] == "Shipped"
    assert content["product"] == "Sierra Hammock"  # a first name, but "Hammock" is no name: a product


def test_request_user_name_fields_and_logprobs():
    call = _session_call("s1", 0, "Hi, Mia Li here.", "Hello Mia Li.")
    call.request = {**call.request, "user": "mia.li3818@example.com", "safety_identifier": "james_lee_6136",
                    "metadata": {"customer": "mia_li_3668"}}
    call.request["messages"][1] = {**call.request["messages"][1], "name": "Mia"}
    call.response["choices"][0]["logprobs"] = {"content": [{"token": "Mia", "logprob": -0.1}]}
    [clean], _, _ = scrub_calls([call], analyzer=FakeAnalyzer())
    assert clean.request["user"] == "<EMAIL_ADDRESS_1>" and clean.request["safety_identifier"] == "<USER_ID_1>"
    assert clean.request["metadata"] == {"customer": "<USER_ID_2>"}
    assert clean.request["messages"][1]["name"] == "<PERSON_2>"
    assert clean.response["choices"][0]["logprobs"] is None  # the answer token by token: dropped
    assert "Mia" not in _all_text(clean)
