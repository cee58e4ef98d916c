"""Nothing leaked: secrets and personal data planted all over a small log (user turns, tool arguments, tool
results, answers, system prompt, metadata) go through the real CLI - collect import, curate with its defaults,
curate export, cluster, report - and not one planted value may be found in any file the workspace's curated/,
clusters/, exports/ or reports/ hold, raw or JSON-escaped (once or twice: tool arguments are JSON inside JSON).

Real presidio and spaCy: slow (~1 min on a loaded 2-core box).
"""

from __future__ import annotations

import base64
import json
import random
import string
from pathlib import Path

import pytest

from slmigrate.cli import main

pytestmark = pytest.mark.slow

PEOPLE = [("Olivia", "Bennett"), ("Rafael", "Moreno"), ("Hannah", "Schmidt"), ("Tomasz", "Nowak"),
          ("Aisha", "Khan"), ("Lucas", "Fontaine"), ("Ingrid", "Halvorsen")]
STREETS = ["Maple Avenue", "Cedar Lane", "Birch Road", "Willow Street", "Harbor Boulevard", "Elm Drive",
           "Juniper Court"]
SSNS = ["512-34-8876", "623-18-4410", "401-77-2356", "538-62-9014", "219-45-7781", "347-80-1265", "456-23-9087"]
PEM_KINDS = ["RSA PRIVATE KEY", "EC PRIVATE KEY", "OPENSSH PRIVATE KEY", "PRIVATE KEY"]
HOSTILE = '<script>alert("x")</script><img src=x onerror=alert(1)>'


def _token(rng: random.Random, n: int, alphabet: str = string.ascii_letters + string.digits) -> str:
    return "".join(rng.choice(alphabet) for _ in range(n))


def _pem(rng: random.Random, kind: str) -> str:
    body = base64.b64encode(rng.randbytes(150)).decode()
    lines = [body[i:i + 64] for i in range(0, len(body), 64)]
    return f"-----BEGIN {kind}-----\n" + "\n".join(lines) + f"\n-----END {kind}-----"


def _jwt(rng: random.Random, sub: str) -> str:
    def part(obj: dict) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).decode().rstrip("=")

    return f"{part({'alg': 'HS256', 'typ': 'JWT'})}.{part({'sub': sub, 'n': rng.random()})}.{_token(rng, 43)}"


def _persona(i: int, rng: random.Random, fake) -> dict[str, str]:
    first, last = PEOPLE[i]
    return {
        "first": first, "last": last, "full": f"{first} {last}",
        "user_id": f"{first.lower()}_{last.lower()}_{4000 + 137 * i}",
        "email": f"{first.lower()}.{last.lower()}{i}@example.com",
        "work_email": f"{first[0].lower()}{last.lower()}@{last.lower()}-consulting.de",
        "phone_text": f"(415) 555-{1000 + 111 * i}",
        "phone_json": f"+1 212-555-{2000 + 37 * i}",
        "contact": f"+44 20 7946 {3000 + 59 * i}",
        "address_text": f"{120 + 17 * i} {STREETS[i]}",
        "address_json": f"{900 + 23 * i} {STREETS[(i + 3) % len(STREETS)]}",
        "dob": f"19{70 + i}-0{1 + i % 9}-1{i}",
        "ssn": SSNS[i],
        "card": fake.credit_card_number(card_type="visa16"),
        "iban": fake.iban(),
        "jwt": _jwt(rng, f"{first.lower()}_{last.lower()}_{4000 + 137 * i}"),
        "pem_args": _pem(rng, PEM_KINDS[i % len(PEM_KINDS)]),
        "pem_result": _pem(rng, PEM_KINDS[(i + 1) % len(PEM_KINDS)]),
        "aws_key": "AKIA" + _token(rng, 16, string.ascii_uppercase + string.digits),
        "aws_secret": _token(rng, 40, string.ascii_letters + string.digits + "/+"),
        "github": "ghp_" + _token(rng, 36),
        "openai": "sk-proj-" + _token(rng, 40),
        "url_password": f"Pw{_token(rng, 10)}-{i}",
    }


TOOLS = [{"type": "function", "function": {"name": name, "description": desc, "parameters": {
    "type": "object", "properties": {k: {"type": "string"} for k in props}}}}
    for name, desc, props in [
        ("get_user_details", "Get a customer's profile.", ["user_id", "email"]),
        ("store_credentials", "Store deployment credentials for the customer.",
         ["private_key", "aws_access_key_id", "aws_secret_access_key", "db_url", "openai_key"]),
        ("send_receipt", "E-mail a receipt.", ["email", "iban"]),
    ]]


def _call(session: str, n: int, messages: list[dict], answer: dict, metadata: dict) -> dict:
    return {"id": f"{session}-{n}", "session": session, "timestamp": f"2025-03-0{1 + n}T10:00:00Z",
            "model": "gpt-4.1", "agent": "support" + (HOSTILE if n == 0 else ""),
            "request": {"model": "gpt-4.1", "messages": messages, "tools": TOOLS},
            "response": {"choices": [{"index": 0, "message": answer,
                                      "finish_reason": "tool_calls" if answer.get("tool_calls") else "stop"}],
                         "usage": {"prompt_tokens": 300 + n, "completion_tokens": 40}},
            "metadata": metadata}


def _tool_call(cid: str, name: str, args: dict) -> dict:
    return {"role": "assistant", "content": None, "tool_calls": [
        {"id": cid, "type": "function", "function": {"name": name, "arguments": json.dumps(args)}}]}


def build_log(path: Path, sessions: int = 7) -> list[str]:
    """Write the log; returns every planted value."""
    from faker import Faker

    fake = Faker("en_GB")
    fake.seed_instance(17)
    rng = random.Random(17)
    planted: list[str] = []
    lines = []
    for i in range(sessions):
        p = _persona(i, rng, fake)
        session = f"sess-{i}"
        db_url = f"postgres://svc_{i}:{p['url_password']}@db.internal:5432/app"
        system = {"role": "system", "content": "You are a support agent for Acme Cloud. Deploy key for this "
                  f"tenant: {p['github']}. Never reveal it."}
        user = {"role": "user", "content": (
            f"Hi, my name is {p['full']}. My user id is {p['user_id']} and my e-mail is {p['email']}; you can "
            f"call me at {p['phone_text']}. My SSN is {p['ssn']}, card number {p['card']}, IBAN {p['iban']}. "
            f"Ship the hardware key to {p['address_text']}. {HOSTILE}")}
        first = _tool_call(f"c{i}a", "get_user_details", {"user_id": p["user_id"], "email": p["email"]})
        profile = {"role": "tool", "tool_call_id": f"c{i}a", "content": json.dumps({
            "user_id": p["user_id"], "name": {"first_name": p["first"], "last_name": p["last"]},
            "dob": p["dob"], "phone": p["phone_json"], "contact": p["contact"],
            "address": {"address1": p["address_json"], "city": "Austin"}, "email": p["email"],
            "session_token": p["jwt"], "membership": "gold"})}
        second = _tool_call(f"c{i}b", "store_credentials", {
            "private_key": p["pem_args"], "aws_access_key_id": p["aws_key"],
            "aws_secret_access_key": p["aws_secret"], "db_url": db_url, "openai_key": p["openai"]})
        # a GCP service-account file read back by the tool: its private key is a PEM inside JSON
        stored = {"role": "tool", "tool_call_id": f"c{i}b", "content": json.dumps({
            "status": "stored", "service_account": {"type": "service_account", "client_email":
                                                    f"deploy@{p['last'].lower()}-prod.iam.gserviceaccount.com",
                                                    "private_key": p["pem_result"] + "\n"}})}
        done = {"role": "assistant", "content": (
            f"All set, {p['first']} {p['last']}. The receipt went to {p['email']} and a copy to "
            f"{p['work_email']}; your birthday {p['dob']} is on file.")}
        metadata = {"task_id": f"task-{i}", "domain": "cloud", "reward": 1.0,
                    "info": {"instruction": f"You are {p['user_id']}. Your name is {p['full']}, e-mail "
                                            f"{p['work_email']}.",
                             "customer": {"first_name": p["first"], "last_name": p["last"], "dob": p["dob"],
                                          "ssn": p["ssn"]}}}
        history = [system, user]
        lines.append(_call(session, 0, list(history), first, metadata))
        history += [first, profile]
        lines.append(_call(session, 1, list(history), second, metadata))
        history += [second, stored]
        lines.append(_call(session, 2, list(history), done, metadata))
        for key in ("full", "user_id", "email", "work_email", "phone_text", "phone_json", "contact", "address_text",
                    "address_json", "dob", "ssn", "card", "iban", "jwt", "pem_args", "pem_result", "aws_key",
                    "aws_secret", "github", "openai", "url_password"):
            planted.append(p[key])
        # a PEM's base64 lines are the key too, wherever they end up
        planted += [line for key in ("pem_args", "pem_result") for line in p[key].splitlines()[1:-1]
                    if len(line) >= 16]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return planted


def forms(value: str) -> set[str]:
    """The value as it may sit in an output: raw, JSON-escaped once or twice, ASCII-escaped or not."""
    out = {value}
    for ascii_only in (True, False):
        once = json.dumps(value, ensure_ascii=ascii_only)[1:-1]
        out |= {once, json.dumps(once, ensure_ascii=ascii_only)[1:-1]}
    return out


def test_nothing_planted_survives_curate_export_and_report(tmp_path, capsys):
    log = tmp_path / "calls.jsonl"
    planted = build_log(log)
    assert len(set(planted)) >= 100
    ws = tmp_path / "ws"
    config = tmp_path / "slmigrate.toml"
    config.write_text('[cluster]\nembedder = "hash"\nmin_size = 3\n')
    exports = ws / "exports"

    def run(*args: str) -> None:
        assert main([*args, "--workspace", str(ws)]) == 0, capsys.readouterr()

    run("collect", "import", str(log))
    run("curate", "--config", str(config))
    run("curate", "export", "--format", "openai", "--out", str(exports / "curated.openai.jsonl"))
    run("curate", "export", "--format", "openai-ft", "--out", str(exports / "curated.ft.jsonl"))
    run("cluster", "--config", str(config))
    run("report", "--config", str(config))
    printed = capsys.readouterr().out

    files = [f for folder in ("curated", "clusters", "exports", "reports") for f in (ws / folder).rglob("*")
             if f.is_file()]
    assert any(f.suffix == ".arrow" for f in files) and (ws / "reports" / "report.md").exists()
    blobs = {str(f.relative_to(ws)): f.read_bytes().decode("utf-8", "replace") for f in files}
    blobs["(command output)"] = printed
    leaks = sorted({(value[:40], name) for value in set(planted) for form in forms(value)
                    for name, text in blobs.items() if form in text})
    assert leaks == [], f"{len(leaks)} planted values survived: {leaks[:20]}"

    # The data is still usable: every call exported, tool arguments valid JSON, placeholders consistent within a
    # session, task labels kept in the metadata, structure untouched.
    rows = [json.loads(line) for line in (exports / "curated.openai.jsonl").read_text().splitlines()]
    assert len(rows) == 21
    by_id = {r["input_id"]: r for r in rows}
    last = by_id["sess-3-2"]
    assert last["metadata"]["task_id"] == "task-3" and last["metadata"]["domain"] == "cloud"
    assert last["metadata"]["info"]["customer"]["dob"].startswith("<DATE_OF_BIRTH_")
    messages = last["request"]["messages"]
    args = json.loads(messages[4]["tool_calls"][0]["function"]["arguments"])
    assert args["private_key"].startswith("<PRIVATE_KEY_") and args["db_url"].startswith("postgres://svc_3:<")
    email = json.loads(messages[3]["content"])["email"]
    assert email.startswith("<EMAIL_ADDRESS_") and email in messages[1]["content"]
    assert email in last["response"]["choices"][0]["message"]["content"]
    first_call_args = json.loads(by_id["sess-3-0"]["response"]["choices"][0]["message"]["tool_calls"][0]
                                 ["function"]["arguments"])
    assert first_call_args["email"] == email  # same placeholder in another call of the session
    # logged HTML is inert in both reports
    for name in ("report.md", "report.html"):
        text = (ws / "reports" / name).read_text()
        assert "<script" not in text and "<img src=x" not in text, name
    assert "&lt;script&gt;" in (ws / "reports" / "report.md").read_text()
