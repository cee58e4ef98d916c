"""Every stage reports through the one progress protocol and never draws: only the CLI builds bars.

The stages run for real on a small workspace (the colour task, the tiny model, the hash embedder) while any rich
progress display would raise: with ``progress=None``, then again (``force``) with a recording callback, whose
reports must arrive for every stage. Each returns its typed result, whose ``to_dict()`` is the JSON body.
"""

from __future__ import annotations

import json

import pytest

from slmigrate.config import (ClusterConfig, Config, CurateConfig, EvaluateConfig, FinetuneConfig, ProbeConfig,
                              SelectConfig)
from slmigrate.record import CallRecord
from test_finetune import colour_calls
from tiny_model import tiny_model_dir


class Recorder:
    """A ``Progress`` callback that keeps every report."""

    def __init__(self) -> None:
        self.reports: list[tuple[str, int, int, dict]] = []

    def __call__(self, what: str, done: int, total: int, /, **fields) -> None:
        assert isinstance(what, str) and isinstance(done, int) and isinstance(total, int)
        assert 0 <= done <= total or total == 0, (what, done, total)
        self.reports.append((what, done, total, fields))

    def names(self) -> set[str]:
        return {what for what, *_ in self.reports}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return str(tiny_model_dir(tmp_path_factory.mktemp("tiny")))


def _no_drawing(monkeypatch) -> None:
    import rich.progress

    from slmigrate.progress import Bars

    def boom(*_a, **_k):
        raise AssertionError("library code started a progress display")

    monkeypatch.setattr(Bars, "_start", boom)
    monkeypatch.setattr(rich.progress.Progress, "__init__", boom)


def _stages(ws, tiny, tmp_path):
    """Each stage's call, as ``name -> call(progress, force)``, in pipeline order."""
    from slmigrate.cluster import cluster
    from fakes import HashEmbedder
    from slmigrate.curate.run import curate
    from slmigrate.evaluate.run import evaluate
    from slmigrate.finetune import finetune
    from slmigrate.probe import probe
    from slmigrate.report import report
    from slmigrate.selection.run import select

    config = Config(cluster=ClusterConfig(embedder="hash", map=False), probe=ProbeConfig(fewshot_calls=0),
                    evaluate=EvaluateConfig(model=tiny, embedder="hash", device="cpu", batch_size=4, limit=2,
                                            variants=["base", "finetuned"], max_new_tokens=4))
    ft = FinetuneConfig(model=tiny, device="cpu", max_steps=3, batch_tokens=512, eval_every=100, lr=5e-3, seed=3)
    # select reports while it probes candidates; this stand-in probes none (no weights are local).
    no_probe = lambda ws, cluster, names, n: {}  # noqa: E731
    return {
        "curate": lambda p, f: curate(ws, CurateConfig(pii="off"), progress=p, force=f),
        "cluster": lambda p, f: cluster(ws, config, progress=p, force=f),
        "probe": lambda p, f: probe(ws, config, progress=p, force=f),
        "select": lambda p, f: select(ws, SelectConfig(cpu_only=True, probe=2), progress=p, force=f,
                                      probe_runner=no_probe, weights_of=lambda name: None),
        "finetune": lambda p, f: finetune(ws, ft, progress=p, force=f),
        "evaluate": lambda p, f: evaluate(ws, config.evaluate, progress=p, force=f, embedder=HashEmbedder()),
        "report": lambda p, f: report(ws, config, progress=p, force=f, out=tmp_path / "report.html"),
    }


def test_every_stage_reports_through_the_callback_and_draws_nothing(workspace, tiny, tmp_path, monkeypatch):
    _no_drawing(monkeypatch)
    calls = colour_calls(60)
    workspace.store.insert_calls([
        CallRecord(request=c["request"], response=c["response"], input_id=c["id"], timestamp=c["timestamp"],
                   session=c["metadata"]["session"]).finalise() for c in calls])
    stages = _stages(workspace, tiny, tmp_path)
    heard = {}
    for name, call in stages.items():
        if name not in ("finetune", "evaluate"):  # the model stages' None path is every other test of theirs
            call(None, False)  # no callback: nothing may draw
        heard[name] = Recorder()
        result = call(heard[name], True)
        # The typed result and its JSON body agree, and the body is what --json prints.
        body = result.to_dict()
        json.dumps(body, default=str)
        for field in ("skipped", "clusters", "counts", "sections_present"):
            if hasattr(result, field) and field in body:
                assert getattr(result, field) == body[field], (name, field)
        assert heard[name].reports, f"{name} reported no progress"

    assert heard["curate"].names() == {"load"}
    assert {"reading calls", "assigning task views"} <= heard["cluster"].names()
    assert heard["probe"].reports[-1][:3] == ("tasks", 1, 1)
    assert heard["select"].names() == {"probing candidates"}
    steps = [r for r in heard["finetune"].reports if "loss" in r[3]]
    assert [r[:3] for r in steps] == [("c01 / tiny-llama", n, 3) for n in (1, 2, 3)]
    assert all(set(r[3]) == {"loss", "tps"} for r in steps)
    assert {what.split()[-1] for what in heard["evaluate"].names()} == {"base", "finetuned"}
    assert heard["report"].reports[-1][1] == heard["report"].reports[-1][2]


def test_an_early_stop_ends_the_pass_with_a_note(tmp_path):
    """Fine-tuning's early stop reaches the callback as a last report at total == done, with a note."""
    import torch

    from slmigrate.finetune import loop
    from slmigrate.progress import NOTE
    from test_finetune import _settings, _successor_examples, _successor_table

    heard = Recorder()
    data = _successor_examples()
    torch.manual_seed(0)
    history, _ = loop.train(_successor_table()(), data * 3, data[8:],
                            _settings(total_steps=60, lr=0.5, stop_when_exact=True), tmp_path, progress=heard,
                            label="c1")
    what, done, total, fields = heard.reports[-1]
    assert history.stopped_early and (what, done, total) == ("c1", history.steps[-1], history.steps[-1])
    assert fields == {NOTE: "stopped early: every validation answer exact"}


def test_a_result_reads_its_fields_and_gives_back_the_body_key_for_key():
    """``to_dict()`` is what ``--json`` prints: the stage's body in its own key order, keys without a field too."""
    import dataclasses

    from slmigrate.cluster import ClusterResult
    from slmigrate.curate.run import CurateResult

    body = {"calls_in": 3, "calls_out": 2, "dropped": {"failed": 1}, "store_fingerprint": "abc", "version": "v0002",
            "skipped": True, "skip_reason": "no new calls"}
    result = CurateResult.of(body)
    assert (result.calls_out, result.version, result.skipped, result.sessions) == (2, "v0002", True, {})
    assert result.to_dict() == body and list(result.to_dict()) == list(body)
    result.to_dict()["calls_out"] = 99  # a copy: the result stays as the stage made it
    assert result.calls_out == 2 and result.to_dict()["calls_out"] == 2
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.calls_out = 5  # type: ignore[misc]
    with pytest.raises(KeyError, match="'clusters'"):
        ClusterResult.of({"calls": 1})
