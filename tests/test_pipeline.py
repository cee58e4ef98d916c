"""`slmigrate run` / `audit`: skipping unchanged stages, --from/--to, resuming after an interruption.

The fast tests swap the stage implementations for fakes that write manifests the way real stages do (the runner
only sees manifests), so the runner's decisions are tested without models. The slow tests drive the real
import, curate, cluster and select stages on the examples log and the tau2 calls.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import time
from pathlib import Path

import pytest

from slmigrate import pipeline
from slmigrate.config import Config, load_config
from slmigrate.errors import SlmigrateError
from slmigrate.pipeline import STAGE_ORDER, Stage, audit, run
from slmigrate.workspace import fingerprint_of

ROOT = Path(__file__).resolve().parent.parent


class FakeStages:
    """A registry of stages that record each execution and write a manifest like a real stage module."""

    def __init__(self, interrupt_in: str | None = None, fail_in: str | None = None):
        self.executed: list[str] = []
        self.up_to_date: set[str] = set()  # stages that find their own inputs unchanged and write nothing
        self.interrupt_in = interrupt_in
        self.fail_in = fail_in
        real = pipeline.STAGES
        self.registry = {
            name: Stage(name, "slmigrate.workspace", real[name].section, real[name].reads, self._executor(name),
                        runner_writes_manifest=real[name].runner_writes_manifest, extra=real[name].extra)
            for name in STAGE_ORDER
        }

    def _executor(self, name):
        def execute(ctx):
            self.executed.append(name)
            if name == self.interrupt_in:
                raise KeyboardInterrupt  # as if the user pressed Ctrl-C half way through the stage
            if name == self.fail_in:
                raise SlmigrateError(f"{name} needs something it did not get")
            if not (self.registry[name].runner_writes_manifest) and name not in self.up_to_date:
                ctx.ws.write_manifest(name, fingerprint=fingerprint_of(name, len(self.executed)),
                                      counts={"items": len(self.executed)})
            return {"items": len(self.executed)}
        return execute


def _statuses(summary):
    return {s.stage: s.status for s in summary.stages}


def test_second_run_does_nothing_and_says_so(workspace):
    fake = FakeStages()
    first = run(workspace, config=Config(), registry=fake.registry)
    assert first.ok and [s.status for s in first.stages] == ["ran"] * len(STAGE_ORDER)
    assert fake.executed == list(STAGE_ORDER)
    assert first.stages[1].reason == "never ran"

    fake.executed.clear()
    second = run(workspace, config=Config(), registry=fake.registry)
    assert fake.executed == []
    assert second.did_nothing
    assert all(s.reason == "inputs and config unchanged" for s in second.stages)
    assert second.headline.startswith("nothing to do")
    # Skipped stages still show the counts of their last run.
    assert second.stages[1].counts == {"items": 2}


def test_changed_config_reruns_that_stage_and_what_follows(workspace):
    fake = FakeStages()
    run(workspace, config=Config(), registry=fake.registry)
    fake.executed.clear()
    config = Config()
    config.cluster.min_size = 9
    summary = run(workspace, config=config, registry=fake.registry)
    assert fake.executed == ["cluster", "probe", "select", "finetune", "evaluate", "report"]
    reasons = {s.stage: s.reason for s in summary.stages}
    assert reasons["cluster"] == "[cluster] config changed"
    assert reasons["select"] == "cluster changed"
    assert _statuses(summary)["curate"] == "skipped"


def test_from_and_to(workspace):
    fake = FakeStages()
    summary = run(workspace, config=Config(), to_stage="cluster", registry=fake.registry)
    assert fake.executed == ["import", "curate", "cluster"]
    assert [s.stage for s in summary.stages] == ["import", "curate", "cluster"]
    fake.executed.clear()
    # --from runs the named stage even though nothing changed, and what depends on it follows.
    summary = run(workspace, config=Config(), from_stage="curate", to_stage="select", registry=fake.registry)
    assert fake.executed == ["curate", "cluster", "probe", "select"]
    assert summary.stages[0].reason == "asked for with --from"
    with pytest.raises(SlmigrateError, match="--from 'train' is not a stage"):
        run(workspace, config=Config(), from_stage="train", registry=fake.registry)
    with pytest.raises(SlmigrateError, match="comes after"):
        run(workspace, config=Config(), from_stage="evaluate", to_stage="curate", registry=fake.registry)


def test_a_stage_missing_an_extra_fails_naming_it(workspace):
    """A stage whose optional libraries are not installed fails with the extra to install; what needs its
    output is blocked, and any other ImportError stays a bug with its traceback."""
    fake = FakeStages()

    def no_torch(ctx):
        raise ModuleNotFoundError("No module named 'torch'", name="torch")

    fake.registry["finetune"].execute = no_torch
    summary = run(workspace, config=Config(), registry=fake.registry)
    status = {s.stage: (s.status, s.reason) for s in summary.stages}
    assert status["finetune"][0] == "failed" and "pip install 'slmigrate[train]'" in status["finetune"][1]
    assert status["evaluate"][0] == "blocked" and not summary.ok

    def broken(ctx):
        raise ModuleNotFoundError("No module named 'slmigrate.nope'", name="slmigrate.nope")

    fake.registry["finetune"].execute = broken
    with pytest.raises(ModuleNotFoundError):
        run(workspace, config=Config(), registry=fake.registry)


def test_interrupted_stage_reruns_and_finished_ones_do_not(workspace):
    fake = FakeStages(interrupt_in="finetune")
    with pytest.raises(KeyboardInterrupt):
        run(workspace, config=Config(), registry=fake.registry)
    assert fake.executed == ["import", "curate", "cluster", "probe", "select", "finetune"]
    assert workspace.manifest("finetune") is None

    fake.interrupt_in = None
    fake.executed.clear()
    summary = run(workspace, config=Config(), registry=fake.registry)
    assert fake.executed == ["finetune", "evaluate", "report"]
    reasons = {s.stage: (s.status, s.reason) for s in summary.stages}
    assert reasons["finetune"] == ("ran", "did not finish last time")
    assert reasons["select"] == ("skipped", "inputs and config unchanged")


def test_interrupted_rerun_with_old_output_still_reruns(workspace):
    # A stage that finished once, then was interrupted on a later run, keeps its old manifest: it must still
    # be redone, or the runner would trust output made from the old inputs.
    fake = FakeStages()
    run(workspace, config=Config(), registry=fake.registry)
    config = Config()
    config.finetune.max_steps = 5
    fake.interrupt_in = "finetune"
    with pytest.raises(KeyboardInterrupt):
        run(workspace, config=config, registry=fake.registry)
    fake.interrupt_in = None
    fake.executed.clear()
    summary = run(workspace, config=config, registry=fake.registry)
    assert fake.executed == ["finetune", "evaluate", "report"]
    assert {s.stage: s.reason for s in summary.stages}["finetune"] == "did not finish last time"


def test_stage_run_by_hand_in_between_is_noticed(workspace):
    fake = FakeStages()
    run(workspace, config=Config(), registry=fake.registry)
    workspace.write_manifest("cluster", fingerprint="by-hand", counts={})  # e.g. `slmigrate cluster --min-size 3`
    fake.executed.clear()
    summary = run(workspace, config=Config(), registry=fake.registry)
    assert fake.executed == ["cluster", "probe", "select", "finetune", "evaluate", "report"]
    assert {s.stage: s.reason for s in summary.stages}["cluster"] == "ran outside `slmigrate run` since"


def test_failed_stage_stops_what_needs_it_and_reports(workspace):
    fake = FakeStages(fail_in="select")
    summary = run(workspace, config=Config(), registry=fake.registry)
    assert not summary.ok and "select failed" in summary.error
    st = _statuses(summary)
    assert st["select"] == "failed" and st["finetune"] == "blocked" and st["evaluate"] == "blocked"
    assert st["report"] == "ran"  # the report still shows what exists
    fake.fail_in = None
    fake.executed.clear()
    summary = run(workspace, config=Config(), registry=fake.registry)
    assert summary.ok and fake.executed == ["select", "finetune", "evaluate", "report"]
    assert {s.stage: s.reason for s in summary.stages}["select"] == "failed last time"


def test_unavailable_stage_blocks_the_rest(workspace):
    fake = FakeStages()
    fake.registry["finetune"].module = "slmigrate.no_such_stage_module"
    summary = run(workspace, config=Config(), registry=fake.registry)
    st = _statuses(summary)
    assert st["finetune"] == "unavailable" and st["evaluate"] == "blocked" and st["report"] == "ran"


def test_import_reruns_when_an_input_file_changes(workspace, tmp_path):
    log = tmp_path / "calls.jsonl"
    log.write_text("{}\n")
    config = Config()
    config.run.inputs = [str(log)]
    fake = FakeStages()
    run(workspace, config=config, registry=fake.registry, to_stage="curate")
    fake.executed.clear()
    time.sleep(0.01)
    log.write_text("{}\n{}\n")
    summary = run(workspace, config=config, registry=fake.registry, to_stage="curate")
    assert fake.executed == ["import", "curate"]
    assert [s.reason for s in summary.stages] == ["its inputs changed", "import changed"]
    config.run.inputs = [str(tmp_path / "missing.jsonl")]
    with pytest.raises(SlmigrateError, match="missing.jsonl"):
        run(workspace, config=config, registry=fake.registry, to_stage="curate")


def test_stage_that_finds_nothing_new_counts_as_skipped(workspace, tmp_path):
    # e.g. a re-import that added no calls: curate is called, sees the same store and config, writes nothing.
    log = tmp_path / "calls.jsonl"
    log.write_text("{}\n")
    config = Config()
    config.run.inputs = [str(log)]
    fake = FakeStages()
    run(workspace, config=config, registry=fake.registry)
    log.write_text("{}\n\n")
    fake.executed.clear()
    fake.up_to_date = {"curate"}
    summary = run(workspace, config=config, registry=fake.registry)
    assert fake.executed == ["import", "curate", "report"]
    st = {s.stage: (s.status, s.reason) for s in summary.stages}
    assert st["curate"] == ("skipped", "import changed, but it found nothing new to do")
    assert st["cluster"] == ("skipped", "inputs and config unchanged")


def test_config_inputs_resolve_against_the_config_file(workspace, tmp_path):
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "a.jsonl").write_text("{}\n")
    cfg = tmp_path / "slmigrate.toml"
    cfg.write_text('[run]\ninputs = ["logs/a.jsonl"]\n\n[cluster]\nmin_size = 4\n')
    fake = FakeStages()
    summary = run(workspace, config_path=cfg, registry=fake.registry, to_stage="import")
    assert summary.ok and fake.executed == ["import"]


def test_cli_run_twice_says_nothing_to_do(workspace, monkeypatch, capsys):
    from slmigrate.cli import main

    fake = FakeStages()
    monkeypatch.setattr(pipeline, "STAGES", fake.registry)
    monkeypatch.chdir(workspace.root.parent)
    assert main(["run", "--workspace", str(workspace.root), "--json"]) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["ok"] and not first["did_nothing"]
    assert main(["run", "--workspace", str(workspace.root)]) == 0
    out = capsys.readouterr().out
    assert "nothing to do" in out and "skipped" in out


# --- real stages --------------------------------------------------------------------------------------------

REAL = ("slmigrate.collect", "slmigrate.curate", "slmigrate.cluster", "slmigrate.selection")


def _need_real_stages(*modules: str) -> None:
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"stage modules not in this checkout yet: {', '.join(missing)}")


@pytest.mark.slow
def test_real_run_twice_on_the_examples_log(tmp_path):
    _need_real_stages(*REAL)
    sys.path.insert(0, str(ROOT / "examples"))
    import agent_log

    log = tmp_path / "calls.jsonl"
    agent_log.write(log, calls=240, seed=3)
    cfg = tmp_path / "slmigrate.toml"
    cfg.write_text('[run]\ninputs = ["calls.jsonl"]\n\n[select]\ncpu_only = true\n')
    from slmigrate.workspace import Workspace

    ws = Workspace.open(tmp_path / "ws")
    first = run(ws, config_path=cfg, to_stage="select")
    assert first.ok, first.error
    assert [s.status for s in first.stages] == ["ran"] * 5
    assert ws.store.count_calls() == 240
    second = run(ws, config_path=cfg, to_stage="select")
    assert second.did_nothing and second.duration_s < 5
    assert load_config(cfg).run.inputs == ["calls.jsonl"]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_audit_of_tau2_names_the_tasks_and_measures_each(tmp_path):
    """The audit on a real agent's log. How long it takes is measured outside the suite (docs/run.md, "Time on a
    laptop": 2.5 min on two quiet cores with the probe on); a wall-clock bound here only measured CI's load."""
    from conftest import shared_file

    from slmigrate.workspace import Workspace

    _need_real_stages(*REAL)
    log = shared_file("tau2-bench/tau2_gpt41_calls.openai.jsonl.gz")
    summary = audit([log], tmp_path / "audit")
    assert summary.ok, summary.error
    html = Path(summary.report).read_text()
    labels = [c["label"] for c in Workspace.open(tmp_path / "audit", create=False).clusters()]
    assert len(labels) >= 3
    for label in labels:
        assert label in html or label.replace("&", "&amp;") in html
    # The domains of tau2 show up in the task names it found.
    assert sum(d in html.lower() for d in ("airline", "retail", "telecom")) >= 2
    # Every task carries the probe's figure with its interval.
    per_task = summary.answer["per_task"]
    assert len(per_task) == len(labels)
    assert all(t["low"] <= t["measured"] <= t["high"] and t["n"] > 0 for t in per_task)


# --- docs/configuration.md is generated from the config models ----------------------------------------------

CONFIG_DOC = ROOT / "docs" / "configuration.md"
BEGIN, END = "<!-- generated: begin -->", "<!-- generated: end -->"


def config_reference() -> str:
    """Every section and key of slmigrate.toml, from the pydantic models' field descriptions."""
    from pydantic_core import PydanticUndefined

    lines = []
    for section, field in Config.model_fields.items():
        model = field.annotation
        doc = (model.__doc__ or "").strip().splitlines()[0] if model.__doc__ else ""
        lines += [f"### `[{section}]`", ""] + ([doc, ""] if doc else [])
        lines += ["| key | type | default | meaning |", "|---|---|---|---|"]
        for key, f in model.model_fields.items():
            if f.default_factory is not None:
                default = f.default_factory()
            else:
                default = None if f.default is PydanticUndefined else f.default
            kind = str(f.annotation).replace("typing.", "").replace("<class '", "").replace("'>", "")
            kind = kind.replace(" | ", " or ")
            shown = json.dumps(default, default=str)
            if len(shown) > 60:
                shown = shown[:57] + "..."
            lines.append(f"| `{key}` | `{kind}` | `{shown}` | {(f.description or '').replace('|', '/')} |")
        lines.append("")
    return "\n".join(lines)


def _doc_with_reference(text: str) -> str:
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{config_reference()}\n{END}{tail}"


def _documented_keys(text: str) -> set[tuple[str, str]]:
    import re

    found, section = set(), None
    for line in text.splitlines():
        if m := re.match(r"### `\[(\w+)\]`", line):
            section = m.group(1)
        elif section and (m := re.match(r"\| `(\w+)` \|", line)):
            found.add((section, m.group(1)))
    return found


def test_configuration_doc_lists_every_key():
    expected = {(s, k) for s, f in Config.model_fields.items() for k in f.annotation.model_fields}
    documented = _documented_keys(CONFIG_DOC.read_text())
    assert expected - documented == set(), (
        "docs/configuration.md misses keys of slmigrate/config.py; regenerate its table with "
        "`.venv/bin/python tests/test_pipeline.py`")
    assert documented - expected == set(), "docs/configuration.md lists keys that no longer exist; regenerate it"


if __name__ == "__main__":
    CONFIG_DOC.write_text(_doc_with_reference(CONFIG_DOC.read_text()))
    print(f"wrote {CONFIG_DOC}")
