"""`collect import` end to end: broken lines, gzip, lists, re-import, unreadable inputs, round trips, the CLI."""

import gzip
import io
import json
import shutil

import pytest

from slmigrate.calls import export_calls, list_calls, show_call
from slmigrate.cli import main
from slmigrate.collect.importer import _iter_array, import_calls
from slmigrate.errors import SlmigrateError
from slmigrate.workspace import Workspace

from conftest import FIXTURES, shared_file

F = FIXTURES / "formats"


def _payloads(ws):
    return {c.content_hash: (c.request, c.response) for c in ws.store.iter_calls()}


def test_broken_lines_are_listed_and_the_rest_imported(workspace):
    result = import_calls(workspace, [F / "broken.jsonl"])
    assert (result.imported, result.skipped, result.exit_code) == (3, 3, 2)
    assert [(e["line"], e["file"].endswith("broken.jsonl")) for e in result.errors] == [(2, True), (4, True),
                                                                                       (7, True)]
    assert "not valid JSON" in result.errors[0]["reason"] and "messages" in result.errors[1]["reason"]
    assert sorted(c.input_id for c in workspace.store.iter_calls()) == ["ok-1", "ok-2", "ok-3"]


def test_gzip_and_reimport_adds_nothing(workspace, tmp_path):
    gz = tmp_path / "calls.log"  # gzip is recognised by content, not by name
    gz.write_bytes(gzip.compress((F / "openai.jsonl").read_bytes()))
    first = import_calls(workspace, [gz])
    assert (first.imported, first.duplicates, first.exit_code) == (3, 0, 0)
    again = import_calls(workspace, [gz, F / "openai.jsonl"])
    assert (again.imported, again.duplicates) == (0, 6)
    assert workspace.store.count_calls() == 3
    manifest = workspace.manifest("collect")
    assert manifest["counts"]["calls_in_store"] == 3 and manifest["counts"]["duplicates"] == 6


def test_timestampless_records_dedupe_and_keep_file_order(workspace):
    import_calls(workspace, [F / "conversation.json"])
    ids = [c.input_id for c in workspace.store.iter_calls()]
    assert ids == ["3:0#2", "3:0#4", "3:0#6", "4:1#2"]  # ids follow the file when the log has no times
    assert import_calls(workspace, [F / "conversation.json"]).imported == 0


def test_json_list_gzipped_and_single_object(workspace, tmp_path):
    listed = tmp_path / "list.json.gz"
    listed.write_bytes(gzip.compress(json.dumps([json.loads(line) for line in
                                                 (F / "anthropic.jsonl").read_text().splitlines()],
                                                indent=2).encode()))
    doc = tmp_path / "one.json"
    doc.write_text(json.dumps(json.loads((F / "otel.jsonl").read_text().splitlines()[0]), indent=2))
    result = import_calls(workspace, [listed, doc])
    assert result.to_dict()["format"] == {str(listed): "anthropic", str(doc): "otel"}
    assert (result.imported, result.skipped) == (4, 0)


def test_streaming_list_parser_across_buffer_edges():
    items = [{"n": i, "text": "x" * (i * 7 % 50), "nested": {"a": [1, 2, {"b": "]"}]}} for i in range(40)]
    text = "[\n" + ",\n".join(json.dumps(o) for o in items) + "\n]\n"
    got = list(_iter_array(io.StringIO(text), chunk=16))  # tiny chunks: every item spans several reads
    assert [v for _, v in got] == items
    assert [line for line, _ in got][:3] == [2, 3, 4]
    broken = list(_iter_array(io.StringIO('[{"a": 1}, {"a": 2'), chunk=8))
    assert broken[0][1] == {"a": 1} and "not valid JSON" in broken[1][1].reason


@pytest.mark.parametrize("make, message", [
    (lambda p: None, "does not exist"),
    (lambda p: p.write_text("hello, this is a plain text file\nwith lines\n"), "is not JSON"),
    (lambda p: p.write_text(""), "is empty"),
    (lambda p: shutil.copy(F / "tools.json", p), "cannot tell the log format"),
    (lambda p: p.write_bytes(b"\x1f\x8b\x08\x00garbage-not-really-gzip"), "cannot read"),
])
def test_unreadable_input_leaves_the_store_untouched(workspace, tmp_path, make, message):
    bad = tmp_path / "bad.jsonl"
    make(bad)
    with pytest.raises(SlmigrateError, match=message):
        import_calls(workspace, [F / "openai.jsonl", bad])  # the good file comes first and still is not written
    assert workspace.store.count_calls() == 0 and workspace.manifest("collect") is None


def test_bad_options_fail_before_reading(workspace, tmp_path):
    with pytest.raises(SlmigrateError, match="unknown log format"):
        import_calls(workspace, [F / "openai.jsonl"], format="csv")
    with pytest.raises(SlmigrateError, match="tools file"):
        import_calls(workspace, [F / "conversation.json"], tools_file=tmp_path / "none.json")
    assert workspace.store.count_calls() == 0


def test_forced_format_reports_records_it_cannot_read(workspace):
    result = import_calls(workspace, [F / "openai.jsonl"], format="anthropic")
    assert result.imported == 0 and result.skipped == 3 and result.exit_code == 2


def test_folder_import_agent_tag_and_progress(workspace, tmp_path):
    folder = tmp_path / "logs"
    (folder / "sub").mkdir(parents=True)
    shutil.copy(F / "openai.jsonl", folder / "a.jsonl")
    shutil.copy(F / "anthropic.jsonl", folder / "sub" / "b.jsonl")
    (folder / "notes.txt").write_text("ignored")
    seen = []
    result = import_calls(workspace, [folder], agent="support-bot", progress=lambda f, d, t: seen.append((f, d, t)))
    assert result.imported == 6 and len(result.files) == 2
    assert seen and seen[-1][1] == seen[-1][2]
    agents = {c.input_id: c.agent for c in workspace.store.iter_calls()}
    assert agents["call-003"] == "tracker"  # the log's own agent wins over --agent
    assert agents["call-001"] == "support-bot" and agents["msg-log-1"] == "support-bot"


def test_export_then_import_round_trips(workspace, tmp_path):
    for name in ("openai.jsonl", "openai_shapes.jsonl", "legacy_functions.jsonl", "anthropic.jsonl",
                 "otel.jsonl", "langfuse.jsonl", "conversation.json", "broken.jsonl"):
        import_calls(workspace, [F / name])
    out = tmp_path / "export.jsonl"
    counts = export_calls(workspace, "openai", out)
    assert counts["written"] == workspace.store.count_calls() == 23
    again = Workspace.open(tmp_path / "ws2")
    result = import_calls(again, [out])
    assert result.files[0].format == "openai" and (result.imported, result.skipped) == (23, 0)
    assert _payloads(again) == _payloads(workspace)  # same hashes, same requests and responses
    before = {c.content_hash: (c.input_id, c.session, c.agent, c.outcome, c.metadata, c.prompt_tokens)
              for c in workspace.store.iter_calls()}
    after = {c.content_hash: (c.input_id, c.session, c.agent, c.outcome, c.metadata, c.prompt_tokens)
             for c in again.store.iter_calls()}
    assert after == before
    assert import_calls(workspace, [out]).imported == 0  # into the original store: all duplicates


def test_export_openai_ft_round_trips_prompts_and_answers(workspace, tmp_path):
    import_calls(workspace, [F / "openai.jsonl"])
    out = tmp_path / "ft.jsonl"
    export_calls(workspace, "openai-ft", out)
    again = Workspace.open(tmp_path / "ws2")
    assert import_calls(again, [out]).files[0].format == "openai-ft"
    key = lambda c: json.dumps([c.messages, c.tools, c.answer], sort_keys=True)  # noqa: E731
    assert sorted(map(key, again.store.iter_calls())) == sorted(map(key, workspace.store.iter_calls()))


def test_list_show_and_clusters(workspace):
    import_calls(workspace, [F / "openai.jsonl"])
    rows = list_calls(workspace)
    assert len(rows) == 3 and all(r["cluster"] is None for r in rows)
    required = {"id", "input_id", "agent", "model", "timestamp", "prompt_tokens", "completion_tokens", "status",
                "cluster"}
    assert required <= set(rows[0])
    workspace.store.set_clusters({rows[0]["id"]: "tool_choice"})
    assert list_calls(workspace, limit=1)[0]["cluster"] == "tool_choice"
    shown = show_call(workspace, "call-001")  # the input's own id works too
    assert shown["request"]["tools"] and shown["input_id"] == "call-001"
    with pytest.raises(SlmigrateError, match="no call"):
        show_call(workspace, "nope")


def test_cli_import_list_show_export(tmp_path, capsys):
    ws = str(tmp_path / "ws")
    assert main(["collect", "import", str(F / "broken.jsonl"), "--workspace", ws, "--json"]) == 2
    out = json.loads(capsys.readouterr().out)
    assert (out["imported"], out["duplicates"], out["skipped"]) == (3, 0, 3)
    assert [e["line"] for e in out["errors"]] == [2, 4, 7]
    assert out["format"] == {str(F / "broken.jsonl"): "openai"}
    assert main(["collect", "import", str(F / "openai.jsonl"), "-w", ws]) == 0
    assert "openai (detected)" in capsys.readouterr().out
    assert main(["calls", "list", "-w", ws, "--json", "--limit", "2"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert len(listed) == 2 and "cluster" in listed[0]
    assert main(["calls", "show", listed[0]["id"], "-w", ws, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["id"] == listed[0]["id"]
    assert main(["calls", "export", "-w", ws, "--format", "openai-ft"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 6 and all("messages" in json.loads(line) for line in lines)
    assert main(["collect", "import", str(tmp_path / "missing.jsonl"), "-w", ws]) == 1
    assert "does not exist" in capsys.readouterr().err
    for command in (["collect", "import", "--help"], ["calls", "list", "--help"], ["calls", "export", "--help"]):
        assert main(command) == 0
        assert "Example:" in capsys.readouterr().out


# --- the real logs in ../shared/data ---

@pytest.mark.slow
def test_tau2_log_imports_3223_calls_intact(workspace):
    path = shared_file("tau2-bench/tau2_gpt41_calls.openai.jsonl.gz")
    result = import_calls(workspace, [path])
    assert (result.imported, result.skipped, result.files[0].format) == (3223, 0, "openai")
    with gzip.open(path, "rt") as fh:
        originals = {o["id"]: o for o in map(json.loads, fh)}
    stored = {c.input_id: c for c in workspace.store.iter_calls()}
    assert set(stored) == set(originals)
    with_tools = [c for c in stored.values() if c.answer and c.answer.get("tool_calls")]
    assert len(with_tools) > 500
    for call in list(stored.values())[::50] + with_tools[:50]:
        raw = originals[call.input_id]
        assert call.request == raw["request"] and call.response == raw["response"]  # payloads unchanged
        assert call.prompt_tokens == raw["response"]["usage"]["prompt_tokens"]
        assert call.metadata == raw["metadata"] and call.session == raw["metadata"]["simulation_id"]
        assert call.outcome == raw["metadata"]["reward"] and call.model == raw["model"]
    assert import_calls(workspace, [path]).imported == 0


@pytest.mark.slow
def test_tau_bench_trajectories_as_conversation(workspace):
    path = shared_file("tau-bench/gpt-4o-airline.json")
    tools = shared_file("tau-bench/airline_tools.derived.json")
    result = import_calls(workspace, [path], format="conversation", tools_file=tools)
    assert (result.imported, result.skipped) == (2454, 0)
    calls = list(workspace.store.iter_calls(limit=300))
    assert all(len(c.tools) == 14 for c in calls)
    assert sum(bool(c.answer.get("tool_calls")) for c in calls) > 50
    assert len({c.session for c in workspace.store.iter_calls(decode=False)}) == 200


@pytest.mark.slow
def test_toolbench_legacy_traces(workspace):
    folder = shared_file("toolbench/answer")
    result = import_calls(workspace, [folder])
    assert {f.format for f in result.files} == {"toolbench"}
    assert result.imported > 40 and result.skipped == 2  # two answers have no train_messages
    calls = list(workspace.store.iter_calls())
    assert all("functions" not in c.request and c.tools for c in calls)
    assert all(m.get("role") != "function" and "function_call" not in m for c in calls for m in c.messages)
    finishing = [c for c in calls if any(t["function"]["name"] == "Finish" for t in c.answer.get("tool_calls") or [])]
    assert finishing and all(isinstance(t["function"]["arguments"], str) for c in finishing
                             for t in c.answer["tool_calls"])


def test_worker_processes_import_exactly_what_in_process_import_does(tmp_path, monkeypatch):
    # Big JSON Lines files go through worker processes; with the size floor at 0 a small file does too, so the two
    # paths can be compared row for row: same ids (clock ids for calls without a timestamp included), hashes,
    # payloads, counts and errors by line, over many small batches.
    from slmigrate.collect import importer as collect

    monkeypatch.setattr(collect, "PARALLEL_MIN_BYTES", 0)
    monkeypatch.setattr(collect.time, "time", lambda: 1_750_000_000.0)
    good = [json.loads(line) for line in (F / "openai.jsonl").read_text().splitlines() if line.strip()]
    lines = []
    for i in range(40):
        rec = dict(good[i % len(good)], id=f"call-{i}")
        if i % 7 == 3:
            rec.pop("timestamp", None)
        lines.append(json.dumps(rec))
        if i % 9 == 4:
            lines += ["", "{not json", json.dumps({"request": {"no": "messages"}, "response": None})]
    lines.append(json.dumps(dict(good[0], id="call-0")))  # a duplicate within the file
    path = tmp_path / "calls.jsonl.gz"
    path.write_bytes(gzip.compress("\n".join(lines).encode()))  # no final newline

    def run(workers):
        ws = Workspace.open(tmp_path / f"ws{workers}")
        res = import_calls(ws, [path], workers=workers, batch_size=4)
        rows = [(c.id, c.content_hash, c.timestamp is not None, c.request, c.response, c.metadata)
                for c in ws.store.iter_calls()]
        return (res.imported, res.duplicates, res.skipped, res.errors, res.files[0].records,
                res.files[0].calls), rows

    in_process, forked = run(0), run(2)
    assert in_process[0][:3] == (40, 1, 8) and len(in_process[1]) == 40
    assert forked == in_process
