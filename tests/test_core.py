"""Config, workspace, manifests and `status`: the pieces every stage leans on."""

import json
import os
import subprocess
import sys

import pytest

from slmigrate.config import load_config
from slmigrate.errors import SlmigrateError
from slmigrate.record import CallRecord, new_id, parse_timestamp
from slmigrate.status import status
from slmigrate.workspace import Workspace, fingerprint_of


def _call(text: str, session: str = "s1", agent: str = "support") -> CallRecord:
    return CallRecord(
        request={"model": "gpt-4o", "messages": [{"role": "user", "content": text}]},
        response={"model": "gpt-4o", "choices": [{"index": 0, "finish_reason": "stop",
                                                  "message": {"role": "assistant", "content": "ok"}}],
                  "usage": {"prompt_tokens": 10, "completion_tokens": 2}},
        session=session, agent=agent, timestamp="2025-01-01T00:00:00Z",
    )


def test_config_defaults_file_and_overrides(tmp_path):
    path = tmp_path / "slmigrate.toml"
    path.write_text('[curate]\npii = "synthetic"\n[cluster]\nmin_size = 7\n')
    cfg = load_config(path, overrides={"cluster": {"min_size": 9, "granularity": None}})
    assert cfg.curate.pii == "synthetic"
    assert cfg.cluster.min_size == 9  # the flag wins over the file
    assert cfg.cluster.granularity == "coarse"  # None overrides are ignored


def test_config_rejects_unknown_keys_and_bad_values(tmp_path):
    path = tmp_path / "slmigrate.toml"
    path.write_text("[curate]\npiii = 'off'\n")
    with pytest.raises(SlmigrateError, match="curate.piii"):
        load_config(path)
    path.write_text("[curate]\npii = 'sometimes'\n")
    with pytest.raises(SlmigrateError, match="curate.pii"):
        load_config(path)
    path.write_text("[curate\n")
    with pytest.raises(SlmigrateError, match="not valid TOML"):
        load_config(path)
    with pytest.raises(SlmigrateError, match="does not exist"):
        load_config(tmp_path / "missing.toml")


def test_prices_longest_prefix_wins():
    prices = load_config(None).prices
    assert prices.price("gpt-4o-mini-2024-07-18") == prices.per_million["gpt-4o-mini"]
    assert prices.price("gpt-4o-2024-08-06") == prices.per_million["gpt-4o"]
    assert prices.cost("gpt-4.1", 1_000_000, 0) == pytest.approx(2.0)


def test_ids_sort_by_time_and_timestamps_normalise():
    a, b = new_id(1_000), new_id(2_000)
    assert len(a) == 26 and a < b
    assert parse_timestamp(1700000000) == parse_timestamp(1700000000000) == "2023-11-14T22:13:20.000Z"
    assert parse_timestamp("2025-08-01T16:20:44.335657") == "2025-08-01T16:20:44.335Z"


def test_workspace_open_requires_store_when_not_creating(tmp_path):
    with pytest.raises(SlmigrateError, match="slmigrate init"):
        Workspace.open(tmp_path / "nothing", create=False)
    (tmp_path / "file").write_text("x")
    with pytest.raises(SlmigrateError, match="is a file"):
        Workspace.open(tmp_path / "file")


def test_status_counts_and_staleness(workspace):
    ws = workspace
    ws.store.insert_calls([_call("a"), _call("b", session="s2"), _call("c", agent="router")])
    info = status(ws)
    assert info["calls"] == 3 and info["sessions"] == 2
    assert info["prompt_tokens"] == 30 and info["completion_tokens"] == 6
    assert {r["key"]: r["calls"] for r in info["by_agent"]} == {"support": 2, "router": 1}
    assert info["stages"]["curate"]["exists"] is False

    ws.write_manifest("curate", fingerprint="f1", extra={"store_fingerprint": ws.store.fingerprint()})
    assert status(ws)["stages"]["curate"]["stale"] is False
    ws.store.insert_calls([_call("d")])
    stale = status(ws)["stages"]["curate"]
    assert stale["stale"] is True and "new calls" in stale["why"]
    assert ws.is_fresh("curate", "f1") and not ws.is_fresh("curate", "f2")
    assert fingerprint_of({"a": 1}, [2]) == fingerprint_of({"a": 1}, [2]) != fingerprint_of({"a": 2}, [2])


def test_cli_init_and_status_json(tmp_path):
    ws = tmp_path / "cli-ws"
    def run(*args):
        return subprocess.run([sys.executable, "-m", "slmigrate", *args], capture_output=True, text=True)
    missing = run("--workspace", str(ws), "status")
    assert missing.returncode == 1 and "Error:" in missing.stderr and "Traceback" not in missing.stderr
    assert run("--workspace", str(ws), "init").returncode == 0
    out = run("status", "--workspace", str(ws), "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["calls"] == 0


def test_odd_values_are_normalised_so_the_record_stores(tmp_path):
    """A client or upstream can send anything: a JSON object as the model, a 10**20 token count, a lone
    surrogate. Each becomes a storable value instead of failing the insert (and with it a whole batch)."""
    from slmigrate.store import Store

    odd = CallRecord(
        request={"model": {"name": "gpt-4o"}, "messages": [{"role": "user", "content": "bad \ud800 text"}]},
        response={"choices": [{"message": {"role": "assistant", "content": "ok"}}],
                  "usage": {"prompt_tokens": 10**20, "completion_tokens": "7"}},
        latency_ms=float("inf"), agent=12, metadata=["not", "an", "object"], status="weird",
    )
    store = Store(tmp_path / "s.sqlite")
    assert store.insert_calls([odd]) == (1, 0)
    got = next(store.iter_calls())
    assert got.model == '{"name": "gpt-4o"}'
    assert got.prompt_tokens is None and got.completion_tokens == 7
    assert got.latency_ms is None and got.agent == "12" and got.status == "error"
    assert got.metadata == {"value": ["not", "an", "object"], "timestamp_missing": True}
    assert got.request["messages"][0]["content"] == "bad \ufffd text"


def test_a_call_nested_past_the_recursion_limit_is_a_record_error():
    from slmigrate.record import RecordError

    deep: object = "leaf"
    for _ in range(5000):
        deep = [deep]
    with pytest.raises(RecordError, match="nested too deeply"):
        CallRecord(request={"messages": [], "x": deep}).finalise()


def test_config_typo_says_did_you_mean(tmp_path):
    cfg = tmp_path / "slmigrate.toml"
    cfg.write_text("[curate]\npi = 'off'\n[clustr]\nx = 1\n")
    with pytest.raises(SlmigrateError) as info:
        load_config(cfg)
    message = str(info.value)
    assert "unknown key curate.pi (did you mean 'pii'?)" in message
    assert "unknown key clustr (did you mean 'cluster'?)" in message


def test_calls_list_keeps_ids_whole_at_80_columns_and_show_prints_json(workspace, tmp_path):
    workspace.store.insert_calls([_call("first question " * 30), _call("second", session="s2")])
    env = {**os.environ, "COLUMNS": "80"}
    def run(*args):
        return subprocess.run([sys.executable, "-m", "slmigrate", "--workspace", str(workspace.root), *args],
                              capture_output=True, text=True, env=env)
    listed = run("calls", "list")
    assert listed.returncode == 0, listed.stderr
    ids = [c.id for c in workspace.store.iter_calls(decode=False)]
    assert all(i in listed.stdout for i in ids)
    long_one = next(c.id for c in workspace.store.iter_calls() if c.messages[0]["content"].startswith("first"))
    shown = run("calls", "show", long_one)  # a 450-character prompt, wider than the terminal
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["request"]["messages"][0]["content"] == "first question " * 30
