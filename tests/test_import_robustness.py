"""`collect import` never stops on a record: every unusual one is skipped with file:line and reason or imported
normalised, through the real CLI and through both import paths (in-process, worker processes)."""

import gzip
import io
import json
import os
import sqlite3
import sys

import pytest

from slmigrate.collect import importer as collect
from slmigrate.collect import formats
from slmigrate.collect.importer import MAX_DEPTH, MAX_LINE_BYTES, _iter_array, _raw_lines, import_calls
from slmigrate.errors import SlmigrateError
from slmigrate.workspace import Workspace

from conftest import ROOT, run_process


def _call(name, **extra):
    return {"id": name, "timestamp": "2025-03-01T10:00:00Z",
            "request": {"model": "gpt-4o", "messages": [{"role": "user", "content": f"question {name}"}]},
            "response": {"id": f"r-{name}", "object": "chat.completion", "model": "gpt-4o",
                         "choices": [{"index": 0, "message": {"role": "assistant", "content": "an answer"},
                                      "finish_reason": "stop"}],
                         "usage": {"prompt_tokens": 12, "completion_tokens": 3}}, **extra}


def _nested(levels):
    return "[" * levels + "]" * levels


def _with(name, field, value_json):
    """A call whose ``field`` (under response) is raw JSON text, so values json.dumps cannot write get in."""
    call = _call(name)
    call["response"][field] = "@@"
    return json.dumps(call).replace('"@@"', value_json)


# line -> (what the line holds, expected skip reason or None when it is imported)
GOOD = ["good-1", "good-2", "good-3", "good-4"]
SKIPPED = {2: "nested deeper than 200 levels", 4: "nested deeper than 200 levels", 6: "MAX_LINE_BYTES",
           12: "not valid JSON", 13: "expected a JSON object per call, got list", 14: "got int"}
NORMALISED = {7: ("surrogate", "lone UTF-16 surrogates replaced by U+FFFD"),
              8: ("huge-count", "prompt_tokens"), 9: ("model-object", "model was a dict"),
              10: ("model-bigint", "model was a"), 11: ("no-time-surrogate", "lone UTF-16 surrogates"),
              15: ("infinite-count", "prompt_tokens inf is not a count")}


def _write_unusual_log(path, long_line_bytes):
    deep = _call("deep"), _call("deep-300")
    untimed = _call("no-time-surrogate", request={"messages": [{"role": "user", "content": "@@"}]})
    del untimed["timestamp"]
    lines = [
        json.dumps(_call("good-1")),
        # 1: beyond orjson's 1,024 levels (and the standard library's recursion limit)
        json.dumps(dict(deep[0], metadata={"x": "@@"})).replace('"@@"', _nested(5000)),
        json.dumps(_call("good-2")),
        # 4: parses fine but is deeper than MAX_DEPTH
        json.dumps(dict(deep[1], metadata={"x": "@@"})).replace('"@@"', _nested(MAX_DEPTH + 100)),
        json.dumps(_call("good-3")),
        None,  # 6: the long line, written in pieces below
        json.dumps(_call("surrogate")).replace("question surrogate", "question \\ud800 surrogate"),
        _with("huge-count", "usage", json.dumps({"prompt_tokens": 10**20, "completion_tokens": 3})),
        _with("model-object", "model", json.dumps({"name": "gpt-4o", "version": 2})),
        _with("model-bigint", "model", str(2**70)),
        json.dumps(untimed).replace('"@@"', '"a lone \\udc00 low surrogate"'),
        "{this is not json",
        "[1, 2, 3]",
        "42",
        _with("infinite-count", "usage", '{"prompt_tokens": 1e400, "completion_tokens": 3}'),
        json.dumps(_call("good-4")),
    ]
    with open(path, "w", encoding="utf-8") as fh:
        for line in lines:
            if line is None:
                pad = "x" * (1 << 20)
                fh.write('{"id": "too-long", "pad": "')
                for _ in range(long_line_bytes // len(pad) + 1):
                    fh.write(pad)
                fh.write('"}')
            else:
                fh.write(line)
            fh.write("\n")


@pytest.fixture(scope="module")
def unusual_log(tmp_path_factory):
    path = tmp_path_factory.mktemp("logs") / "unusual.jsonl"
    _write_unusual_log(path, MAX_LINE_BYTES)
    return path


def _check_result(out, path):
    assert (out["imported"], out["duplicates"], out["skipped"]) == (len(GOOD) + len(NORMALISED), 0, len(SKIPPED))
    assert [(e["file"], e["line"]) for e in out["errors"]] == [(str(path), line) for line in SKIPPED]
    for error in out["errors"]:
        assert SKIPPED[error["line"]] in error["reason"], error
    assert "slmigrate.collect.importer.MAX_DEPTH" in out["errors"][0]["reason"]  # the limit and how to fix
    assert "flatten" in out["errors"][0]["reason"] and "64 MB" in out["errors"][2]["reason"]
    assert sorted(note["line"] for note in out["notes"]) == sorted(NORMALISED) == list(range(7, 12)) + [15]
    for note in out["notes"]:
        name, text = NORMALISED[note["line"]]
        assert note["file"] == str(path) and text in note["note"], note


def _check_store(ws):
    calls = {c.input_id: c for c in ws.store.iter_calls()}
    assert set(calls) == set(GOOD) | {name for name, _ in NORMALISED.values()}
    assert "\ufffd" in calls["surrogate"].messages[0]["content"]
    assert calls["no-time-surrogate"].messages[0]["content"] == "a lone \ufffd low surrogate"
    assert calls["huge-count"].prompt_tokens is None and calls["huge-count"].completion_tokens == 3
    assert calls["infinite-count"].prompt_tokens is None
    assert json.loads(calls["model-object"].model) == {"name": "gpt-4o", "version": 2}
    assert isinstance(calls["model-bigint"].model, str) and float(calls["model-bigint"].model) == float(2**70)
    assert calls["good-4"].answer["content"] == "an answer"


def _cli(*args):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return run_process([sys.executable, "-m", "slmigrate", "collect", "import", *map(str, args)], env=env,
                       cwd=ROOT, timeout=300)


def test_real_cli_skips_or_normalises_every_unusual_record(unusual_log, tmp_path):
    ws = tmp_path / "ws"
    run = _cli(unusual_log, "-w", ws, "--json")
    assert run.returncode == 2, run.stderr
    assert "Traceback" not in run.stdout + run.stderr
    _check_result(json.loads(run.stdout), unusual_log)
    _check_store(Workspace.open(ws))

    again = _cli(unusual_log, "-w", ws)  # the table: every skip on stderr with file:line, the rest duplicates
    assert again.returncode == 2 and "Traceback" not in again.stdout + again.stderr
    for line, reason in SKIPPED.items():
        assert f"skipped {unusual_log}:{line}: " in again.stderr
    assert f"normalised {unusual_log}:9: call model-object: model was a dict" in again.stderr
    assert f"0 new calls, {len(GOOD) + len(NORMALISED)} already present, {len(SKIPPED)} skipped" in again.stdout


@pytest.mark.parametrize("workers", [0, 2])
def test_both_import_paths_skip_or_normalise_every_unusual_record(unusual_log, tmp_path, monkeypatch, workers):
    monkeypatch.setattr(collect, "PARALLEL_MIN_BYTES", 0)  # workers=2: every JSON Lines file goes to the pool
    ws = Workspace.open(tmp_path / "ws")
    result = import_calls(ws, [unusual_log], workers=workers, batch_size=3)  # bad records in several batches
    assert result.exit_code == 2
    _check_result(result.to_dict(), unusual_log)
    _check_store(ws)


class _Fragile:
    """A plug-in format with bugs: it raises what no built-in format raises, or returns something odd."""

    name = "fragile-test"
    description = "test plug-in"

    def detect(self, first_objects):
        return 0.0

    def convert(self, obj, ctx):
        if obj.get("boom"):
            return 1 / 0
        if obj.get("none"):
            return None
        if obj.get("deep"):
            rec = formats.get("openai").convert(_call("deep-made"), ctx)[0]
            node = rec.metadata
            for _ in range(5000):  # deeper than any JSON writer goes: the call cannot be hashed or stored
                node["x"] = {}
                node = node["x"]
            return [rec]
        return formats.get("openai").convert(obj, ctx)


@pytest.mark.parametrize("workers", [0, 2])
def test_a_plug_in_format_that_fails_costs_only_its_record(tmp_path, monkeypatch, workers):
    monkeypatch.setitem(formats._REGISTRY, _Fragile.name, _Fragile())
    monkeypatch.setattr(collect, "PARALLEL_MIN_BYTES", 0)
    path = tmp_path / "calls.jsonl"
    path.write_text("\n".join(json.dumps(o) for o in [
        _call("a"), {"boom": 1}, _call("b"), {"none": 1}, {"deep": 1}, _call("c")]) + "\n")
    result = import_calls(Workspace.open(tmp_path / "ws"), [path], format=_Fragile.name, workers=workers)
    assert (result.imported, result.skipped) == (3, 3)
    assert [e["line"] for e in result.errors] == [2, 4, 5]
    assert "ZeroDivisionError" in result.errors[0]["reason"] and "NoneType" in result.errors[1]["reason"]
    assert "nested" in result.errors[2]["reason"]  # RecordError, or the RecursionError of encoding the metadata


def test_a_row_the_store_refuses_costs_only_itself(workspace, tmp_path, monkeypatch):
    # One poisoned row fails its whole batch's transaction; the batch is retried row by row and only that row,
    # with its line, is lost. A failure of the store itself (OperationalError) stops the import with an Error.
    store = workspace.store
    real_insert = store.insert_rows

    def insert_rows(rows):
        if any(row[2] == "poisoned" for row in rows):
            raise sqlite3.IntegrityError("CHECK constraint failed: calls")
        return real_insert(rows)

    monkeypatch.setattr(store, "insert_rows", insert_rows)
    path = tmp_path / "calls.jsonl"
    path.write_text("\n".join(json.dumps(_call(n)) for n in ["a", "b", "poisoned", "c", "d"]) + "\n")
    result = import_calls(workspace, [path], workers=0, batch_size=10)
    assert (result.imported, result.skipped) == (4, 1)
    assert result.errors == [{"file": str(path), "line": 3,
                              "reason": "the store refused the call (IntegrityError: CHECK constraint failed: calls)"}]
    assert sorted(c.input_id for c in store.iter_calls()) == ["a", "b", "c", "d"]

    def store_full(rows):
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(store, "insert_rows", store_full)
    with pytest.raises(SlmigrateError, match="disk is full.*calls before .*calls.jsonl:1 are stored.*run the same"):
        import_calls(workspace, [path], workers=0)


def test_long_lines_are_dropped_without_holding_them(monkeypatch):
    monkeypatch.setattr(collect, "MAX_LINE_BYTES", 10)
    text = b'{"a": 1}\n' + b"x" * 25 + b'\n\n{"b": 2}\n' + b"y" * 11 + b"\n" + b"z" * 12  # no final newline
    for chunk in (4, 7, 1 << 20):  # lines spanning several reads, and all in one
        got = list(_raw_lines(io.BytesIO(text), chunk=chunk))
        assert [n for n, _ in got] == [1, 2, 4, 5, 6]
        assert [raw for _, raw in got if isinstance(raw, bytes)] == [b'{"a": 1}', b'{"b": 2}']
        assert [raw.reason.split(",")[0] for _, raw in got if not isinstance(raw, bytes)] == [
            "the record is 0.0 MB"] * 3


def test_json_list_items_too_deep(tmp_path):
    items = [json.dumps(_call("a")), json.dumps({"deep": json.loads(_nested(MAX_DEPTH + 1))}),
             json.dumps(_call("b"))]
    got = list(_iter_array(io.StringIO("[" + ",\n".join(items) + "]")))
    assert [line for line, _ in got] == [1, 2, 3]
    assert got[0][1]["id"] == "a" and "nested deeper" in got[1][1].reason and got[2][1]["id"] == "b"
    # Deeper than the JSON parser can go: the list's structure is lost there, the items before it are kept.
    broken = list(_iter_array(io.StringIO("[" + items[0] + ", " + _nested(5000) + ", " + items[2] + "]")))
    assert broken[0][1]["id"] == "a" and "nested deeper" in broken[1][1].reason and len(broken) == 2
    path = tmp_path / "list.json.gz"
    path.write_bytes(gzip.compress(("[" + ",\n".join(items) + "]").encode()))
    result = import_calls(Workspace.open(tmp_path / "ws"), [path])
    assert (result.imported, [e["line"] for e in result.errors]) == (2, [2])


@pytest.mark.parametrize("levels", [MAX_DEPTH, MAX_DEPTH + 1])
@pytest.mark.parametrize("kinds", ["[", "{", "[{"])  # lists, objects, alternating ({[]} peels two levels a pass)
def test_depth_limit_is_exact_on_the_fast_and_the_standard_library_parser(levels, kinds, monkeypatch):
    opening = [kinds[i % len(kinds)] for i in range(levels)]
    text = "".join('{"k": ' if k == "{" else "[" for k in opening) + "1" + "".join(
        "}" if k == "{" else "]" for k in reversed(opening))
    for fast in (collect._fast_loads, None):  # orjson, then the standard library (e.g. for a lone surrogate)
        monkeypatch.setattr(collect, "_fast_loads", fast)
        if levels > MAX_DEPTH:
            with pytest.raises(collect._TooDeep):
                collect._loads(text.encode())
        else:
            assert collect._loads(text.encode()) == json.loads(text)
