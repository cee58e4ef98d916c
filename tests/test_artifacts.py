"""The artifact layer: each workspace file is named in one module, and read back in exactly the writer's shape."""

from __future__ import annotations

import ast
import json
import re
import shutil
from pathlib import Path

import pytest

from slmigrate import artifacts
from slmigrate.errors import SlmigrateError
from slmigrate.workspace import Workspace

PACKAGE = Path(__file__).resolve().parent.parent / "slmigrate"

# file name -> the one module that may spell it (docstrings and comments aside)
OWNERS = {
    "clusters.json": "slmigrate/artifacts.py",
    "selection.json": "slmigrate/artifacts.py",
    "latest.json": "slmigrate/artifacts.py",
    "results.json": "slmigrate/artifacts.py",
    "probe.json": "slmigrate/artifacts.py",
    "model.npz": "slmigrate/cluster/model.py",
    "deadletter.jsonl": "slmigrate/collect/deadletter.py",
    "report.json": "slmigrate/curate/dataset.py",
    "guard.json": "slmigrate/serve/guard.py",
}


def _string_literals(tree: ast.AST) -> list[str]:
    """Every string constant in the module (f-string parts included) except docstrings."""
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                docstrings.add(id(first.value))
    return [n.value for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docstrings]


def _modules_naming(name: str) -> set[str]:
    pattern = re.compile(r"(?<![\w.-])" + re.escape(name) + r"(?![\w.])")
    found = set()
    for file in PACKAGE.rglob("*.py"):
        literals = _string_literals(ast.parse(file.read_text(encoding="utf-8")))
        if any(pattern.search(s) for s in literals):
            found.add(file.relative_to(PACKAGE.parent).as_posix())
    return found


@pytest.mark.parametrize("name", sorted(OWNERS))
def test_each_artifact_file_is_named_in_one_module(name):
    assert _modules_naming(name) == {OWNERS[name]}


def test_the_scan_sees_literals_but_not_docstrings(tmp_path):
    tree = ast.parse('"""clusters.json in a docstring."""\nX = f"{1}/clusters.json"\n'
                     'def f():\n    """probe.json"""\n    return "latest.json"\n')
    literals = _string_literals(tree)
    assert "/clusters.json" in literals and "latest.json" in literals
    assert not any("docstring" in s or s == "probe.json" for s in literals)


def _cluster(cid: str, **extra) -> dict:
    return {"id": cid, "label": cid, "output_kind": "label", "size": 10, "replaceability": 0.7,
            "likely_replaceable": True, **extra}


def test_readers_before_the_stages_ran(workspace):
    with pytest.raises(SlmigrateError, match=r"no clusters in .*clusters\.json is missing.*slmigrate cluster"):
        workspace.clusters()
    with pytest.raises(SlmigrateError, match="no model selection .*slmigrate select"):
        workspace.selection()
    assert workspace.evaluation() is None and workspace.probe() is None
    assert artifacts.clusters_file(workspace, required=False) is None


def test_a_damaged_file_is_an_error_that_says_what_to_rerun(workspace):
    artifacts.path(workspace, artifacts.CLUSTERS).write_text('{"clusters": [')
    with pytest.raises(SlmigrateError, match="cannot read .*clusters.json.*slmigrate cluster"):
        workspace.clusters()


def test_round_trip_in_the_writers_shape(workspace):
    artifacts.write_clusters(workspace, {"schema_version": 1, "calls": 20, "clusters": [_cluster("c01"),
                                                                                        _cluster("c02")]})
    assert [c["id"] for c in workspace.clusters()] == ["c01", "c02"]
    artifacts.write_selection(workspace, {"clusters": [{"cluster": "c01", "choice": "smollm2-135m-instruct"}]})
    assert workspace.selection()["clusters"][0]["choice"] == "smollm2-135m-instruct"
    body = {"run": "r1", "clusters": [{"cluster": "c01", "adapter": "adapters/c01/m"}]}
    run_dir = workspace.path("evals", "r1")
    artifacts.write_evaluation_run(run_dir, body)
    artifacts.write_evaluation(workspace, body)
    assert workspace.evaluation() == body
    assert json.loads((run_dir / artifacts.EVAL_RUN_RESULTS).read_text()) == body
    assert artifacts.evaluation_run_file("r1") == "evals/r1/results.json"
    artifacts.write_probe(workspace, {"clusters": [], "overall": {}})
    assert workspace.probe() == {"clusters": [], "overall": {}}
    # written whole or not at all: no temporary file is left beside them
    assert not list(workspace.root.rglob(".*.tmp"))


def test_finetune_evaluate_and_select_see_the_same_tasks(workspace):
    from slmigrate.evaluate.run import load_clusters as evaluate_clusters
    from slmigrate.finetune import _cluster_ids
    from slmigrate.selection.run import load_clusters as select_clusters

    artifacts.write_clusters(workspace, {"clusters": [_cluster("c01"), _cluster("task-triage", source="task_tag")]})
    assert _cluster_ids(workspace) == ["c01", "task-triage"]
    assert sorted(evaluate_clusters(workspace)) == ["c01", "task-triage"]
    assert [c["id"] for c in select_clusters(workspace)] == ["c01", "task-triage"]


def test_a_copied_workspace_finds_its_cluster_map(tmp_path):
    """The map path is stored relative; one stored absolute by an older writer is followed into the copy."""
    ws = Workspace.open(tmp_path / "a")
    (ws.path("clusters") / "map.png").write_bytes(b"png")
    artifacts.write_clusters(ws, {"map": ws.relative(ws.path("clusters", "map.png")), "clusters": []})
    assert artifacts.clusters_file(ws)["map"] == "clusters/map.png"
    shutil.copytree(ws.root, tmp_path / "b")
    copy = Workspace(tmp_path / "b")
    assert copy.resolve(artifacts.clusters_file(copy)["map"]) == copy.path("clusters", "map.png")
    old = {"map": str(tmp_path / "gone" / "clusters" / "map.png"), "clusters": []}
    artifacts.write_clusters(copy, old)
    assert copy.resolve(artifacts.clusters_file(copy)["map"]) == copy.path("clusters", "map.png")
