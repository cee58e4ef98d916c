"""The files stages hand each other through the workspace: each named here once, with its typed reader and writer.

| file (under the workspace) | written by (stage) | read through |
|---|---|---|
| ``clusters/clusters.json`` | ``cluster`` (``bfcl.prepare``: a one-task stand-in) | ``clusters_file``, ``clusters`` |
| ``selection.json`` | ``select`` | ``selection`` |
| ``evals/latest.json``, ``evals/<run>/results.json`` | ``evaluate`` | ``evaluation`` |
| ``probe/probe.json`` | ``probe`` | ``probe`` |

Only the stage named writes a file, through the ``write_*`` function here; everyone else reads through the
functions here (or ``Workspace.clusters()`` / ``.selection()`` / ``.evaluation()`` / ``.probe()``), which accept
exactly what the writer writes. ``cluster/model.py`` owns ``clusters/model.npz``, ``curated.py`` the
``curated/`` versions, ``deadletter.py`` ``deadletter.jsonl`` and ``serve/guard.py`` the router's live guard record
``serve/guard.json``. Paths stored inside an artifact are relative
to the workspace (``Workspace.relative`` / ``Workspace.resolve``), so a copied workspace still finds its files.

The bodies are typed dicts rather than dataclasses: they are JSON documents that ``--json``, the report and the
router pass on whole, and a field added by the writer must reach them without a reader change.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Required, TypedDict

from slmigrate.errors import SlmigrateError

if TYPE_CHECKING:
    from slmigrate.workspace import Workspace

CLUSTERS = ("clusters", "clusters.json")
SELECTION = ("selection.json",)
EVALUATION = ("evals", "latest.json")
EVAL_RUN_RESULTS = "results.json"  # inside evals/<run>/
PROBE = ("probe", "probe.json")


class ClusterInfo(TypedDict, total=False):
    """One task in ``clusters.json`` (field by field in docs/cluster.md). Only ``id`` is always there: a
    workspace prepared by ``bfcl.prepare`` carries just ``id``, ``label``, ``output_kind`` and ``size``."""

    id: Required[str]
    group: str | None
    source: str  # "clustered" or "task_tag"
    label: str
    keywords: list[str]
    size: int
    share: float
    output_kind: str  # tool_call | json | label | text
    output_kinds: dict[str, int]
    tools_called: dict[str, int]
    models: dict[str, int]
    prompt_tokens: dict[str, float]  # total, p50, p95
    completion_tokens: dict[str, float]
    cost_usd: float
    cost_share: float
    replaceability: float
    likely_replaceable: bool
    reasons: list[str]
    representative: dict[str, str]
    radius: float  # absent for task-tag clusters


class ClustersFile(TypedDict, total=False):
    """``clusters/clusters.json``: the cluster stage's result (schema_version 1)."""

    schema_version: int
    method: dict[str, Any]
    curated_version: str
    calls: int
    clustered_calls: int
    cost_usd: float
    duration_s: float
    map: str  # relative to the workspace (absolute in workspaces clustered before paths were stored relative)
    unclustered: dict[str, Any]
    overall: dict[str, Any]  # replaceable_clusters, call_share, cost_share, cost_usd
    clusters: Required[list[ClusterInfo]]


class SelectionFile(TypedDict, total=False):
    """``selection.json`` (docs/select.md): per cluster the ranked candidates and the ``choice``."""

    version: int
    created: str
    hardware: dict[str, Any]
    license_policy: str
    config: dict[str, Any]
    weights: dict[str, Any]
    size_penalty: dict[str, float]
    probe: Any
    clusters: Required[list[dict[str, Any]]]  # cluster, label, kind, candidates, choice, choice_reason, ...


class EvaluationFile(TypedDict, total=False):
    """``evals/latest.json``, a copy of the newest ``evals/<run>/results.json`` (docs/evaluate.md)."""

    run: str
    created: str
    curated_version: str
    variants: list[str]
    limit: int | None
    config: dict[str, Any]
    prices: dict[str, Any]
    judge: dict[str, Any] | None
    clusters: Required[list[dict[str, Any]]]  # cluster, adapter (workspace-relative), variants, decision, ...
    skipped: list[dict[str, Any]]
    plan: dict[str, Any]
    duration_s: float


class ProbeFile(TypedDict, total=False):
    """``probe/probe.json`` (docs/probe.md): measured replaceability per task."""

    method: dict[str, Any]
    calls: int
    cost_usd: float
    clusters: Required[list[dict[str, Any]]]
    overall: dict[str, Any]
    duration_s: float


# --- the generic part ------------------------------------------------------------------------------------------

def path(ws: Workspace, parts: tuple[str, ...]) -> Path:
    return ws.path(*parts)


def relative_name(parts: tuple[str, ...]) -> str:
    """The file as shown to people: relative to the workspace."""
    return "/".join(parts)


def exists(ws: Workspace, parts: tuple[str, ...]) -> bool:
    return ws.path(*parts).exists()


def text(ws: Workspace, parts: tuple[str, ...]) -> str:
    """The file as written (for fingerprints of a later stage's input)."""
    return ws.path(*parts).read_text(encoding="utf-8")


def _read(ws: Workspace, parts: tuple[str, ...], missing: str | None) -> Any:
    """The file's JSON; None when it is absent and ``missing`` is None, else a SlmigrateError saying ``missing``."""
    file = ws.path(*parts)
    if not file.exists():
        if missing is None:
            return None
        raise SlmigrateError(f"{missing} in {ws.root} ({file} is missing); {_RUN_FIRST[parts]}")
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SlmigrateError(f"cannot read {file}: {exc}; {_RUN_FIRST[parts]} again") from exc


def write_json(file: Path, body: Any) -> None:
    """``body`` as indented JSON, written to a temporary file and renamed into place: a killed run leaves the old
    file or the new one, never half of one."""
    file.parent.mkdir(parents=True, exist_ok=True)
    tmp = file.with_name("." + file.name + ".tmp")
    tmp.write_text(json.dumps(body, indent=2, ensure_ascii=False, default=str) + "\n", encoding="utf-8")
    tmp.replace(file)


_RUN_FIRST = {CLUSTERS: "run `slmigrate cluster` first", SELECTION: "run `slmigrate select` first",
              EVALUATION: "run `slmigrate evaluate` first", PROBE: "run `slmigrate probe` first"}


# --- clusters/clusters.json (cluster) --------------------------------------------------------------------------

def clusters_file(ws: Workspace, *, required: bool = True) -> ClustersFile | None:
    """The cluster stage's whole result; None when the stage has not run and ``required`` is False."""
    body: ClustersFile | None = _read(ws, CLUSTERS, "no clusters" if required else None)
    return body


def clusters(ws: Workspace) -> list[ClusterInfo]:
    """The tasks, largest first (a SlmigrateError before ``slmigrate cluster`` has run)."""
    body = clusters_file(ws)
    assert body is not None  # required=True raises instead
    return body["clusters"]


def write_clusters(ws: Workspace, body: ClustersFile) -> None:
    write_json(ws.path(*CLUSTERS), body)


# --- selection.json (select) -----------------------------------------------------------------------------------

def selection(ws: Workspace, *, required: bool = True) -> SelectionFile | None:
    body: SelectionFile | None = _read(ws, SELECTION, "no model selection" if required else None)
    return body


def write_selection(ws: Workspace, body: SelectionFile) -> None:
    write_json(ws.path(*SELECTION), body)


# --- evals/latest.json and evals/<run>/results.json (evaluate) -------------------------------------------------

def evaluation(ws: Workspace, *, required: bool = True) -> EvaluationFile | None:
    """The newest evaluation."""
    body: EvaluationFile | None = _read(ws, EVALUATION, "no evaluation" if required else None)
    return body


def write_evaluation_run(run_dir: Path, body: EvaluationFile) -> None:
    """``results.json`` of one run, in its (temporary) run folder."""
    write_json(run_dir / EVAL_RUN_RESULTS, body)


def write_evaluation(ws: Workspace, body: EvaluationFile) -> None:
    """``evals/latest.json``: the newest run's results, where every reader looks."""
    write_json(ws.path(*EVALUATION), body)


def evaluation_run_file(run: str) -> str:
    """Where a run's results are, as shown to people (relative to the workspace)."""
    return "/".join((EVALUATION[0], run, EVAL_RUN_RESULTS))


# --- probe/probe.json (probe) ----------------------------------------------------------------------------------

def probe(ws: Workspace) -> ProbeFile | None:
    """The probe's measured replaceability, or None before ``slmigrate probe`` has run."""
    body: ProbeFile | None = _read(ws, PROBE, None)
    return body


def write_probe(ws: Workspace, body: ProbeFile) -> None:
    write_json(ws.path(*PROBE), body)
