"""curate: filters, dedup, session splits, versions and skip, export, CLI; real tau2 data in slow tests."""

from __future__ import annotations

import gzip
import hashlib
import json
import re

import pytest
from conftest import shared_file
from test_pii import SECRETS, FakeAnalyzer

from slmigrate.curate import dataset as curated
from slmigrate.cli import main
from slmigrate.config import CurateConfig
from slmigrate.curate.run import curate, drop_reason, export, near_key, split_of
from slmigrate.record import CallRecord

TOOLS = [{"type": "function", "function": {"name": "get_order", "parameters": {
    "type": "object", "properties": {"order_id": {"type": "string"}}}}}]


def _call(user: str, answer: str | None = "Sure.", *, session: str = "s1", tool: str | None = None,
          args: str = '{"order_id": "A1"}', finish: str = "stop", status: str = "ok", outcome: float | None = None,
          ts: str = "2025-01-01T00:00:00Z") -> CallRecord:
    message: dict = {"role": "assistant", "content": answer}
    if tool:
        message = {"role": "assistant", "content": None,
                   "tool_calls": [{"id": "t1", "type": "function", "function": {"name": tool, "arguments": args}}]}
        finish = "tool_calls" if finish == "stop" else finish
    return CallRecord(
        request={"messages": [{"role": "system", "content": "You help with orders."},
                              {"role": "user", "content": user}], "tools": TOOLS},
        response=None if status != "ok" else {"choices": [{"message": message, "finish_reason": finish}]},
        session=session, status=status, error=None if status == "ok" else "HTTP 500", outcome=outcome,
        timestamp=ts,
    )


def _store(ws, calls):
    ws.store.insert_calls(calls)


@pytest.fixture
def fake_pii(monkeypatch):
    """Scrub with regexes + key rules + a fixed name list instead of spaCy (the real one is in the slow tests)."""
    import slmigrate.curate.pii as pii

    monkeypatch.setattr(pii, "TextAnalyzer", FakeAnalyzer)


def test_drop_reasons():
    cfg = CurateConfig(min_outcome=0.5)
    assert drop_reason(_call("hi"), cfg) is None
    assert drop_reason(_call("hi", status="error"), cfg) == "failed"
    assert drop_reason(_call("hi", answer="  "), cfg) == "empty_answer"
    assert drop_reason(_call("hi", finish="length"), cfg) == "truncated"
    assert drop_reason(_call("hi", tool="get_order", args='{"order_id": '), cfg) == "invalid_tool_arguments"
    assert drop_reason(_call("hi", tool="delete_everything"), cfg) == "unknown_tool"
    assert drop_reason(_call("hi", tool="get_order"), cfg) is None
    assert drop_reason(_call("hi", outcome=0.0), cfg) == "below_min_outcome"
    assert drop_reason(_call("hi", outcome=1.0), cfg) is None
    assert drop_reason(_call("hi", outcome=None), cfg) is None  # unknown outcome: kept
    meta = _call("hi")
    meta.metadata = {"reward": 0.0}
    assert drop_reason(meta, cfg) == "below_min_outcome"


def test_near_key_ignores_whitespace_ids_numbers():
    a = _call("Where is order  #W1234567 of 3 items?\n")
    b = _call("Where is order #W7654321 of 12 items?")
    c = _call("Cancel order #W1234567")
    assert near_key(a) == near_key(b) != near_key(c)
    # Parts are normalised once and remembered: asking again, or with the same parts, gives the same key; a
    # different tool list or message order does not.
    assert near_key(a) == near_key(_call("Where is order  #W1234567 of 3 items?\n"))
    no_tools = _call("Where is order #W1234567 of 3 items?")
    no_tools.request["tools"] = None
    swapped = _call("Where is order #W1234567 of 3 items?")
    swapped.request["messages"].reverse()
    assert len({near_key(a), near_key(no_tools), near_key(swapped)}) == 3


def test_split_is_stable_and_roughly_proportional():
    shares = (0.8, 0.1, 0.1)
    splits = [split_of(f"session-{i}", shares) for i in range(2000)]
    assert splits == [split_of(f"session-{i}", shares) for i in range(2000)]
    assert 0.75 < splits.count("train") / 2000 < 0.85
    assert splits.count("validation") > 100 and splits.count("test") > 100
    assert split_of("x", (1.0, 0.0, 0.0)) == "train"


def test_curate_filters_dedup_splits_and_skip(workspace):
    calls = [
        _call("Where is order 1?", session="a", ts="2025-01-01T00:00:01Z"),
        _call("Where is order 1?", session="a", ts="2025-01-01T00:00:02Z"),   # exact duplicate (later)
        _call("Where is order 22?", session="b", ts="2025-01-01T00:00:03Z"),  # near duplicate
        _call("Refund me", session="b", answer="", ts="2025-01-01T00:00:04Z"),
        _call("Refund me", session="c", finish="length", ts="2025-01-01T00:00:05Z"),
        _call("Look it up", session="c", tool="get_order", ts="2025-01-01T00:00:06Z"),
        _call("Look it up!", session="c", tool="drop_table", ts="2025-01-01T00:00:07Z"),
        _call("Boom", session="d", status="error", ts="2025-01-01T00:00:08Z"),
        _call("Bad args", session="d", tool="get_order", args="{oops", ts="2025-01-01T00:00:09Z"),
    ]
    _store(workspace, calls)
    report = curate(workspace, CurateConfig(pii="off"))
    assert report.calls_in == 9 and report.calls_out == 2
    assert report.dropped == {"failed": 1, "empty_answer": 1, "truncated": 1, "invalid_tool_arguments": 1,
                                 "unknown_tool": 1, "below_min_outcome": 0, "duplicate": 1, "near_duplicate": 1}
    assert report.version == "v0001" and not report.skipped
    kept = curated.load_curated(workspace)
    assert [c.messages[-1]["content"] for c in kept] == ["Where is order 1?", "Look it up"]
    for c in kept:
        assert c.split == split_of(c.session, (0.8, 0.1, 0.1))
    manifest = workspace.manifest("curate")
    assert manifest["store_fingerprint"] == workspace.store.fingerprint()
    # unchanged -> skipped, no new version
    again = curate(workspace, CurateConfig(pii="off"))
    assert again.skipped and again.version == "v0001" and "no new calls" in again.skip_reason
    assert curated.current_version(workspace) == "v0001"
    # a changed config runs again
    assert curate(workspace, CurateConfig(pii="off", near_duplicates=False)).calls_out == 3


def test_adding_data_never_moves_an_old_call(workspace):
    first = [_call(f"question {'x' * i}", session=f"s{i}", answer=f"a{i}", ts=f"2025-01-01T00:{i:02d}:00Z")
             for i in range(40)]
    _store(workspace, first)
    # The configured shares alone (a task that grows past test_calls_per_task gets a larger test share once;
    # see the next test)
    fixed = CurateConfig(pii="off", near_duplicates=False, test_calls_per_task=0)
    curate(workspace, fixed)
    before = {c.id: c.split for c in curated.load_curated(workspace)}
    more = [_call(f"later {'y' * i}", session=f"t{i}", answer=f"b{i}", ts=f"2025-02-01T00:{i:02d}:00Z")
            for i in range(40)]
    _store(workspace, more)
    report = curate(workspace, fixed)
    assert report.version == "v0002" and report.calls_out == 80
    after = {c.id: c.split for c in curated.load_curated(workspace)}
    assert all(after[i] == s for i, s in before.items())
    assert set(before.values()) >= {"train"} and len(set(after.values())) >= 2


def test_test_split_is_sized_per_task_and_growth_never_moves_a_training_call_to_test(workspace):
    """A task of 100 calls expects 50 test calls (the cap, 0.5); at 200 calls its share shrinks to
    (50 + 2 sqrt(50)) / 200 = 0.32: calls only ever leave the test split, none joins it from train."""
    cfg = CurateConfig(pii="off", near_duplicates=False)
    first = [_call(f"question {i} {'x' * (i % 7)}", session=f"s{i}", answer=f"a{i}",
                   ts=f"2025-01-01T{i // 60:02d}:{i % 60:02d}:00Z") for i in range(100)]
    _store(workspace, first)
    report = curate(workspace, cfg)
    assert report.split_groups["test_share"] == {"configured": 0.1, "max_used": 0.5}
    assert 35 <= report.splits["test"] <= 65
    before = {c.id: c.split for c in curated.load_curated(workspace)}
    more = [_call(f"later {i} {'y' * (i % 7)}", session=f"t{i}", answer=f"b{i}",
                  ts=f"2025-02-01T{i // 60:02d}:{i % 60:02d}:00Z") for i in range(100)]
    _store(workspace, more)
    report = curate(workspace, cfg)
    assert report.split_groups["test_share"]["max_used"] == pytest.approx(0.3207, abs=1e-3)
    assert report.splits["test"] >= 50
    after = {c.id: c.split for c in curated.load_curated(workspace)}
    assert all(after[i] != "test" for i, s in before.items() if s != "test")
    assert all(after[i] == "train" for i, s in before.items() if s == "train")


def test_calls_sharing_an_entity_land_on_one_side(workspace):
    """Sessions that name the same order id or e-mail are one group; a token in many sessions links nothing."""
    from slmigrate.curate.run import SplitPlanner

    calls = []
    for i in range(300):
        order = f"AO-{100000 + i // 3}"  # every 3 sessions share an order id
        mail = f"pat{i // 5}@example.com"  # every 5 sessions share an e-mail: chains of groups
        calls.append(_call(f"where is {order}? mail {mail}; model gpt-4o-2024-08-06", session=f"s{i}",
                           answer=f"a{i}", ts=f"2025-01-01T{i // 60:02d}:{i % 60:02d}:00Z"))
    planner = SplitPlanner(CurateConfig(link_max_share=0.2))
    for c in calls:
        planner.add(c)
    split, report = planner.assign()
    for i in range(0, 300, 3):
        assert split[f"s{i}"] == split[f"s{i + 1}"] == split[f"s{i + 2}"]
    for i in range(0, 300, 5):
        assert len({split[f"s{i + k}"] for k in range(5)}) == 1
    # "gpt-4o-2024-08-06" is in every session: no entity, ignored (else one group of 300)
    assert report["tokens_ignored"] == 1 and report["largest_group_sessions"] == 15
    assert report["linked_sessions"] == 300 and report["groups"] == 20
    # The group cap: with groups capped at 10 sessions, the e-mail links that would join 15 are left out
    capped = SplitPlanner(CurateConfig(link_max_share=0.01))
    for c in calls:
        capped.add(c)
    _, small = capped.assign()
    assert small["largest_group_sessions"] <= 10 and small["links_skipped"] > 0


def test_curate_scrubs_with_report_and_examples(workspace, fake_pii):
    calls = [_call("I'm Mia Li, key " + SECRETS["OPENAI_API_KEY"], session="a", ts="2025-01-01T00:00:01Z"),
             _call("Order of James Lee please", session="b", answer="Hello James Lee!", ts="2025-01-01T00:00:02Z")]
    _store(workspace, calls)
    report = curate(workspace, CurateConfig(pii="placeholder"))
    assert report.entities["PERSON"] >= 2 and report.entities["OPENAI_API_KEY"] == 1
    kept = curated.load_curated(workspace)
    text = json.dumps([c.request for c in kept]) + json.dumps([c.response for c in kept])
    assert "Mia Li" not in text and "James Lee" not in text and SECRETS["OPENAI_API_KEY"] not in text
    assert kept[1].answer["content"] == "Hello <PERSON_1>!"
    examples = json.dumps(report.examples)
    assert "<PERSON_1>" in examples and "James" not in examples  # the report never carries what it removed
    assert curated.load_report(workspace)["calls_out"] == 2


def test_curate_calls_keeps_and_scrubs_what_curate_keeps(workspace, fake_pii):
    """``curate_calls`` (refine's way in) on a batch gives the calls, drops and scrubbing ``curate`` gives the
    same calls in the store: one code path, no second curate."""
    from slmigrate.curate import curate_calls

    calls = [_call("I'm Mia Li, key " + SECRETS["OPENAI_API_KEY"], session="a", ts="2025-01-01T00:00:01Z"),
             _call("I'm Mia Li, key " + SECRETS["OPENAI_API_KEY"], session="a", ts="2025-01-01T00:00:02Z"),
             _call("Order of James Lee please", session="b", answer="Hello James Lee!", ts="2025-01-01T00:00:03Z"),
             _call("Order of  James Lee please", session="b", answer="Hi James Lee!", ts="2025-01-01T00:00:04Z"),
             _call("Refund me", session="c", finish="length", ts="2025-01-01T00:00:05Z"),
             _call("Look it up!", session="c", tool="drop_table", ts="2025-01-01T00:00:06Z")]
    config = CurateConfig(pii="placeholder", split=(1.0, 0.0, 0.0))
    _store(workspace, [CallRecord(**c.__dict__) for c in calls])
    report = curate(workspace, config)
    kept, dropped = curate_calls([CallRecord(**c.__dict__).finalise() for c in calls], config)
    assert {k: v for k, v in report.dropped.items() if v} == dict(dropped) == {
        "duplicate": 1, "near_duplicate": 1, "truncated": 1, "unknown_tool": 1}
    stored = curated.load_curated(workspace)
    assert [(c.request, c.answer) for c in kept] == [(c.request, c.answer) for c in stored]
    assert "James Lee" not in json.dumps([c.request for c in kept]) and kept[1].answer["content"] == \
        "Hello <PERSON_1>!"


def test_curate_and_export_scrub_metadata_keeping_task_labels(workspace, fake_pii, tmp_path):
    """tau-bench's task info rides in the metadata: names, dobs and user ids there are scrubbed like the
    messages; known task labels and the keys [curate] keep_metadata names stay usable."""
    meta = {"task_id": 4, "domain": "airline", "batch": "mia_li_3668-batch",
            "info": {"user_id": "mia_li_3668", "passengers": [{"first_name": "Mia", "dob": "1985-04-04"}]}}
    call = _call("I'm Mia Li (mia_li_3668)", session="a")
    call.metadata = meta
    _store(workspace, [call])
    curate(workspace, CurateConfig(pii="placeholder", keep_metadata=["batch"]))
    out = tmp_path / "all.jsonl"
    export(workspace, out, "openai")
    row = json.loads(out.read_text())
    text = out.read_text().replace("mia_li_3668-batch", "")
    assert "mia_li_3668" not in text and "1985-04-04" not in text and "Mia" not in text
    assert (row["metadata"]["task_id"], row["metadata"]["domain"]) == (4, "airline")
    assert row["metadata"]["batch"] == "mia_li_3668-batch"
    assert row["metadata"]["info"]["user_id"] == "<USER_ID_1>" and "<USER_ID_1>" in json.dumps(row["request"])


def test_export_formats(workspace, tmp_path):
    _store(workspace, [_call("Where is A1?", session="a", tool="get_order", ts="2025-01-01T00:00:01Z"),
                       _call("Thanks", session="b", ts="2025-01-01T00:00:02Z")])
    curate(workspace, CurateConfig(pii="off"))
    info = export(workspace, tmp_path / "all.jsonl", "openai", "all")
    rows = [json.loads(line) for line in (tmp_path / "all.jsonl").read_text().splitlines()]
    assert info["calls"] == 2 and {"id", "input_id", "split", "request", "response"} <= set(rows[0])
    export(workspace, tmp_path / "ft.jsonl", "openai-ft", "all")
    ft = [json.loads(line) for line in (tmp_path / "ft.jsonl").read_text().splitlines()]
    assert set(ft[0]) == {"messages", "tools"}
    assert ft[0]["messages"][-1] == {"role": "assistant", "content": None, "tool_calls": [
        {"id": "t1", "type": "function", "function": {"name": "get_order", "arguments": '{"order_id": "A1"}'}}]}
    assert ft[1]["messages"][-1] == {"role": "assistant", "content": "Sure."}
    split = rows[0]["split"]
    assert export(workspace, tmp_path / "one.jsonl", "openai", split)["calls"] >= 1
    with pytest.raises(Exception, match="unknown export format"):
        export(workspace, tmp_path / "x.jsonl", "csv")
    with pytest.raises(Exception, match="unknown split"):
        export(workspace, tmp_path / "x.jsonl", "openai", "dev")


def test_cli_curate_json_skip_and_export(workspace, tmp_path, capsys):
    _store(workspace, [_call("Where is A1?", session="a", ts="2025-01-01T00:00:01Z"),
                       _call("Boom", session="b", status="error", ts="2025-01-01T00:00:02Z")])
    ws = str(workspace.root)
    assert main(["curate", "--workspace", ws, "--pii", "off", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["calls_out"] == 1 and report["dropped"]["failed"] == 1
    assert main(["curate", "--workspace", ws, "--pii", "off"]) == 0
    assert "up to date" in capsys.readouterr().out
    out = tmp_path / "ft.jsonl"
    assert main(["curate", "export", "--workspace", ws, "--format", "openai-ft", "--out", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["calls"] == 1 and out.exists()
    assert main(["curate", "--workspace", ws, "--pii", "bogus"]) == 1
    assert "pii" in capsys.readouterr().err
    assert main(["curate", "--workspace", ws, "--entities", "NOPE", "--force"]) == 1
    assert "unknown entity" in capsys.readouterr().err
    assert main(["curate", "--help"]) == 0 and "Example:" in capsys.readouterr().out
    assert main(["curate", "export", "--help"]) == 0 and "Example:" in capsys.readouterr().out


def test_cli_curate_on_empty_workspace(tmp_path, capsys):
    assert main(["curate", "--workspace", str(tmp_path / "none")]) == 1
    assert "no slmigrate workspace" in capsys.readouterr().err


# --- real data: tau2-bench calls, real presidio ---
TAU2 = "tau2-bench/tau2_gpt41_calls.openai.jsonl.gz"


def _tau2_subset(tmp_path, share: int = 6) -> tuple[str, list[dict]]:
    """Every call of one session in ``share`` (by a hash of the simulation id), all domains, as a gz file."""
    rows = []
    with gzip.open(shared_file(TAU2), "rt") as fh:
        for line in fh:
            d = json.loads(line)
            sim = d["metadata"]["simulation_id"]
            if int(hashlib.sha256(sim.encode()).hexdigest(), 16) % share == 0:
                rows.append(d)
    path = tmp_path / "tau2_subset.jsonl.gz"
    with gzip.open(path, "wt") as fh:
        for d in rows:
            fh.write(json.dumps(d) + "\n")
    return str(path), rows


def _import(ws, path: str) -> None:
    from slmigrate.collect.importer import import_calls

    import_calls(ws, [path])


def _customer_pii(tool_content: str) -> set[str]:
    """Customer e-mails, user ids, names and payment ids in a tau2 tool result."""
    try:
        obj = json.loads(tool_content)
    except ValueError:
        return set()
    out: set[str] = set()

    def walk(node, key=""):
        if isinstance(node, dict):
            for k, v in node.items():
                if k == "payment_methods" and isinstance(v, dict):
                    out.update(v)
                walk(v, k)
        elif isinstance(node, list):
            for x in node:
                walk(x, key)
        elif isinstance(node, str) and key in ("email", "user_id", "first_name", "last_name", "full_name",
                                              "payment_id"):
            out.add(node)

    walk(obj)
    return out


@pytest.mark.slow
def test_tau2_no_customer_pii_or_planted_secret_survives(workspace, tmp_path):
    path, rows = _tau2_subset(tmp_path)
    # Plant secrets in some calls: in a user message and inside a JSON tool result.
    planted = list(SECRETS.values()) + ["hunter2pass"]
    for i, d in enumerate(rows[::25]):
        msgs = d["request"]["messages"]
        texts = [m for m in msgs if m["role"] in ("user", "system") and isinstance(m.get("content"), str)]
        texts[-1]["content"] += f" my token is {planted[i % len(planted)]}"
        for m in msgs:
            if m["role"] == "tool" and m["content"].startswith("{"):
                obj = json.loads(m["content"])
                obj["debug_url"] = "https://admin:hunter2pass@internal.example.com/db"
                m["content"] = json.dumps(obj)
                break
    import gzip as gz

    with gz.open(path, "wt") as fh:
        for d in rows:
            fh.write(json.dumps(d) + "\n")
    _import(workspace, path)
    report = curate(workspace, CurateConfig(pii="placeholder", near_duplicates=False))
    assert report.calls_out > 300
    kept = curated.load_curated(workspace)
    by_input = {d["id"]: d for d in rows}
    leaks = []
    checked = 0
    for call in kept:
        raw = by_input[call.input_id]
        secrets_ = set()
        for m in raw["request"]["messages"]:
            if m["role"] == "tool":
                secrets_ |= _customer_pii(m["content"])
        text = json.dumps(call.request, ensure_ascii=False) + json.dumps(call.response, ensure_ascii=False)
        for value in secrets_:
            checked += 1
            if re.search(rf"(?<![A-Za-z0-9_]){re.escape(value)}(?![A-Za-z0-9_])", text):
                leaks.append((call.input_id, value))
        for value in planted:
            assert value not in text
        for m in call.request["messages"] + [call.answer or {}]:
            for tc in m.get("tool_calls") or []:
                json.loads(tc["function"]["arguments"])
            if m.get("role") == "tool" and (m.get("content") or "").startswith("{"):
                json.loads(m["content"])
    assert checked > 1000
    assert leaks == []
    assert {"PERSON", "EMAIL_ADDRESS", "USER_ID", "PAYMENT_ID"} <= set(report.entities)


@pytest.mark.slow
def test_presidio_research_recall_precision():
    from slmigrate.curate.pii.evaluate import evaluate

    result = evaluate(shared_file("presidio-research/synth_dataset_v2.json"))
    per = result["per_type"]
    # Measured on all 1,500 sentences (docs/curate.md has the table): recall PERSON 0.862, STREET_ADDRESS 0.900,
    # PHONE 0.957, CREDIT_CARD 0.978, the rest 1.0; precision PERSON 0.801 (0.765 before the label/heading
    # post-filter), STREET_ADDRESS 1.000, PHONE 0.957. Recall may not fall below the figures issue 17 set; PERSON
    # precision must keep its gain.
    floors = {"EMAIL_ADDRESS": 1.0, "CREDIT_CARD": 0.97, "IBAN_CODE": 1.0, "IP_ADDRESS": 1.0, "US_SSN": 1.0,
              "PHONE_NUMBER": 0.95, "PERSON": 0.85, "STREET_ADDRESS": 0.90}
    for entity, floor in floors.items():
        assert per[entity]["recall"] >= floor, (entity, per[entity])
    precision_floors = {"PERSON": 0.79, "STREET_ADDRESS": 0.95, "PHONE_NUMBER": 0.95}
    for entity, floor in precision_floors.items():
        assert per[entity]["precision"] >= floor, (entity, per[entity])
    for entity in ("EMAIL_ADDRESS", "CREDIT_CARD", "IBAN_CODE", "IP_ADDRESS", "US_SSN"):
        assert per[entity]["precision"] >= 0.9, (entity, per[entity])


@pytest.mark.slow
def test_entity_aware_split_on_the_examples_log(workspace, tmp_path):
    """The examples log through curate with its defaults (real spaCy PII pass, placeholders), with 40 of its
    customers coming back in a new session (same name, e-mail and order number: the reuse a real shop sees).
    Placeholders are numbered per session (`<PERSON_1>` is someone else in every session), so "no placeholder
    on both sides" means: no customer name, e-mail or order number behind one is in the train and the test
    split. Without entity links, some would be."""
    import importlib.util
    from pathlib import Path

    from slmigrate.curate.run import session_key

    spec = importlib.util.spec_from_file_location(
        "agent_log", Path(__file__).resolve().parents[1] / "examples" / "agent_log.py")
    agent_log = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(agent_log)
    records = agent_log.generate(600, seed=0)
    extracted = [r for r in records if r["metadata"]["task"] == "extract"]
    again = []
    for k, r in enumerate(extracted[:40]):  # the same customer writes again, in a new session, a day later
        twin = json.loads(json.dumps(r))
        twin["id"] = f"again-{k}"
        twin["metadata"]["session"] = f"ticket-again-{k}"
        twin["request"]["messages"][-1]["content"] += " (Writing again about this.)"
        again.append(twin)
    log = tmp_path / "calls.jsonl"
    log.write_text("".join(json.dumps(r) + "\n" for r in records + again))
    _import(workspace, str(log))
    report = curate(workspace, CurateConfig())
    assert report.split_groups["linked_sessions"] >= 80 and report.split_groups["links_skipped"] == 0
    split = {c.id: c.split for c in curated.load_curated(workspace)}
    raw = {c.id: c for c in workspace.store.iter_calls() if c.id in split}
    entities: dict[str, set[str]] = {}  # value -> curated call ids whose raw text holds it
    for r in records + again:
        if r["metadata"]["task"] != "extract":
            continue
        fields = json.loads(r["response"]["choices"][0]["message"]["content"])
        for value in (fields["customer_name"], fields["email"], fields["order_id"]):
            entities.setdefault(value, set())
    texts = {cid: json.dumps([c.request, c.answer]) for cid, c in raw.items()}
    for value in entities:
        entities[value] = {cid for cid, text in texts.items() if value in text}
    both = [v for v, ids in entities.items() if {"train", "test"} <= {split[i] for i in ids}]
    assert both == [], f"{len(both)} entities on both sides of the split, e.g. {both[:3]}"
    # the test has teeth: by session alone, some of the returning customers straddle train and test
    plain = {cid: split_of(session_key(c), (0.8, 0.1, 0.1)) for cid, c in raw.items()}
    assert any(len({plain[i] for i in ids}) > 1 for ids in entities.values())
