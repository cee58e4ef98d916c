"""`slmigrate run` and `slmigrate audit`: the stages in order, from one config file, skipping what is unchanged.

Each stage is one call into its own module (``collect.import_calls``, ``curate.curate``, ``cluster.cluster``,
``selection.select``, ``finetune.finetune``, ``evaluate.evaluate``, ``report.report``); this module only decides
which of them need to run. A stage is skipped when its config section and the manifests of the stages it reads
are the same as when the runner last saw it finish, and its own manifest is still the one it wrote then.

Resuming after an interruption needs no special machinery: a stage writes its manifest only when it finishes,
and the runner marks a stage as started before calling it, so an interrupted stage is seen as "did not finish"
and runs again while the stages before it are skipped.

The runner's own bookkeeping is the manifest ``run`` (per stage: fingerprint, the parts it was made of, and
the stage manifest's creation time), so ``slmigrate status`` keeps showing only the stages themselves.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from slmigrate.config import Config, load_config
from slmigrate.errors import SlmigrateError
from slmigrate.progress import Progress, Say
from slmigrate.record import now_iso
from slmigrate.workspace import Workspace, fingerprint_of

STAGE_ORDER = ("import", "curate", "cluster", "probe", "select", "finetune", "evaluate", "report")
# `audit`: everything up to the up-front answer (tasks, measured replaceability, candidate models), no training.
AUDIT_STAGES = ("import", "curate", "cluster", "probe", "select", "report")
RUNNER_MANIFEST = "run"



@dataclass
class StageResult:
    stage: str
    status: str  # ran | skipped | failed | unavailable | blocked
    reason: str
    duration_s: float = 0.0
    counts: dict[str, Any] = field(default_factory=dict)


@dataclass
class RunSummary:
    workspace: str
    stages: list[StageResult]
    report: str | None = None
    error: str | None = None
    duration_s: float = 0.0
    answer: dict[str, Any] | None = None  # slmigrate.headline: the share of calls and cost that could move
    # [evaluate] fail_under applied to the evaluation in the workspace: {"fail_under", "failing": [...]}
    gate: dict[str, Any] | None = None

    @property
    def gate_failed(self) -> bool:
        return bool(self.gate and self.gate["failing"])

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def did_nothing(self) -> bool:
        return all(s.status == "skipped" for s in self.stages)

    @property
    def headline(self) -> str:
        ran = [s.stage for s in self.stages if s.status == "ran"]
        if self.error:
            return f"stopped: {self.error}"
        if not ran:
            return "nothing to do: every stage's inputs and config are unchanged since it last ran"
        skipped = [s.stage for s in self.stages if s.status == "skipped"]
        return f"ran {', '.join(ran)}" + (f"; skipped {', '.join(skipped)} (unchanged)" if skipped else "")

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        # `headline` is the answer the run was for; the line about what ran is `summary`.
        out.pop("answer")
        out.update(ok=self.ok, did_nothing=self.did_nothing, summary=self.headline, headline=self.answer)
        return out


@dataclass
class _Context:
    ws: Workspace
    config: Config
    base_dir: Path  # relative paths in the config resolve against the config file's folder
    progress: Say  # one line per stage event ("cluster: running (curate changed)")
    bar: Progress | None = None  # (what, done, total) from inside a stage

    def stage_bar(self, stage: str, name: Callable[[str], str] = str) -> Progress | None:
        """The stage's ``Progress`` callback: its reports, ``what`` (through ``name``) labelled with the stage."""
        if self.bar is None:
            return None
        bar = self.bar

        def report(what: str, done: int, total: int, /, **fields: Any) -> None:
            bar(f"{stage} {name(what)}", done, total, **fields)

        return report


@dataclass
class Stage:
    """One step of the pipeline: where its code lives, what it reads, and how the runner calls it."""

    name: str
    module: str
    section: str | None  # config section that steers it
    reads: tuple[str, ...]  # manifests of earlier stages it consumes
    execute: Callable[[_Context], dict[str, Any]]  # returns the counts to show
    manifest: str | None = None  # the stage's own manifest name (default: its name)
    runner_writes_manifest: bool = False  # the module writes none itself (import, report): the runner does
    extra: Callable[[_Context], Any] | None = None  # more inputs for the fingerprint (files, other sections)

    def unavailable(self) -> str | None:
        try:
            importlib.import_module(self.module)
        except ModuleNotFoundError as exc:
            if exc.name == self.module:
                return f"this installation has no {self.module} module yet"
            raise
        return None


# --- the stages: one adapter each, calling the stage's public function --------------------------------------


def _input_files(ctx: _Context) -> list[Path]:
    files = []
    for raw in ctx.config.run.inputs:
        path = Path(raw).expanduser()
        path = path if path.is_absolute() else ctx.base_dir / path
        if not path.exists():
            raise SlmigrateError(
                f"input log {path} (from [run] inputs) does not exist; fix the path in the config file or "
                "drop it from `inputs`"
            )
        files.append(path)
    return files


def _import_inputs(ctx: _Context) -> list[Any]:
    # Size and modification time, not content: re-reading a 15 MB log to hash it costs as much as importing it,
    # and importing twice is harmless (the store deduplicates by content).
    return [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in _input_files(ctx)] + [
        ctx.config.run.format, ctx.config.run.tools, ctx.config.collect.model_dump(mode="json")]


def _run_import(ctx: _Context) -> dict[str, Any]:
    from slmigrate.collect.importer import import_calls

    files = _input_files(ctx)
    if not files:
        return {"files": 0, "imported": 0, "calls_in_store": ctx.ws.store.count_calls()}
    tools = None
    if ctx.config.run.tools:
        tools = Path(ctx.config.run.tools)
        tools = tools if tools.is_absolute() else ctx.base_dir / tools
    result = import_calls(ctx.ws, files, format=ctx.config.run.format, agent=ctx.config.collect.agent,
                          tools_file=tools, progress=ctx.stage_bar("import", lambda file: Path(file).name))
    counts = _as_dict(result)
    keep = {k: counts[k] for k in ("imported", "duplicates") if k in counts}
    if counts.get("skipped"):
        # Broken records are listed by `slmigrate collect import`; the pipeline goes on with the good ones.
        keep["bad_records"] = counts["skipped"]
    return {"files": len(files), **keep, "calls_in_store": ctx.ws.store.count_calls()}


def _run_curate(ctx: _Context) -> dict[str, Any]:
    from slmigrate.curate.run import curate

    curate(ctx.ws, ctx.config.curate, progress=ctx.stage_bar("curate"))
    return _manifest_counts(ctx.ws, "curate")


def _run_cluster(ctx: _Context) -> dict[str, Any]:
    from slmigrate.cluster import cluster

    body = cluster(ctx.ws, ctx.config, progress=ctx.stage_bar("cluster"))  # reads [cluster] and [prices]
    if body.warning:  # one task holds most of the calls: say so, with what to do
        ctx.progress(f"cluster: warning: {body.warning}")
    return _manifest_counts(ctx.ws, "cluster")


def _run_select(ctx: _Context) -> dict[str, Any]:
    from slmigrate.selection.run import select

    select(ctx.ws, ctx.config.select, progress=ctx.stage_bar("select"))
    return _manifest_counts(ctx.ws, "select")


def _run_probe(ctx: _Context) -> dict[str, Any]:
    from slmigrate.probe import probe

    probe(ctx.ws, ctx.config, progress=ctx.stage_bar("probe"))  # reads [probe] and [evaluate]
    return _manifest_counts(ctx.ws, "probe")


def train_clusters(ws: Workspace, config: Config) -> list[str] | None:
    """The clusters `run` fine-tunes and evaluates: those estimated replaceable, or all (None)."""
    if config.run.train == "all":
        return None
    return [c["id"] for c in ws.clusters() if c.get("likely_replaceable")]


def _run_finetune(ctx: _Context) -> dict[str, Any]:
    from slmigrate.finetune import finetune

    clusters = train_clusters(ctx.ws, ctx.config)
    if clusters == []:
        return {"clusters": 0, "note": "no cluster is estimated replaceable; nothing to fine-tune"}
    result = finetune(ctx.ws, ctx.config.finetune, progress=ctx.stage_bar("finetune"), clusters=clusters)
    counts = dict(result.counts)
    if counts.get("interrupted"):
        raise KeyboardInterrupt  # a cluster's training stopped early: the stage did not finish
    return _manifest_counts(ctx.ws, "finetune") or counts


def _run_evaluate(ctx: _Context) -> dict[str, Any]:
    from slmigrate.evaluate.run import evaluate

    clusters = train_clusters(ctx.ws, ctx.config)
    if clusters == []:
        return {"clusters": 0, "note": "no cluster was fine-tuned; nothing to evaluate"}
    evaluate(ctx.ws, ctx.config.evaluate, progress=ctx.stage_bar("evaluate"), clusters=clusters,
             prices=ctx.config.prices)
    return _manifest_counts(ctx.ws, "evaluate")


def report_path(ws: Workspace, config: Config) -> Path:
    path = Path(config.run.report).expanduser()
    return path if path.is_absolute() else ws.path("reports", str(path))


def _run_report(ctx: _Context) -> dict[str, Any]:
    from slmigrate.report import report

    out = report_path(ctx.ws, ctx.config)
    written = report(ctx.ws, ctx.config, progress=ctx.stage_bar("report"), out=out, markdown=True)
    return {"sections": written.sections_present, "html": str(out)}


def _report_inputs(ctx: _Context) -> Any:
    # The report reads everything, so every earlier manifest is part of its fingerprint; a deleted report
    # file must be written again even when nothing else changed.
    out = report_path(ctx.ws, ctx.config)
    return [out.exists(), ctx.config.prices.model_dump(mode="json"), ctx.ws.store.fingerprint()]


def _curate_inputs(ctx: _Context) -> Any:
    return ctx.ws.store.fingerprint()  # calls that arrived by proxy or a manual import count as new input


STAGES: dict[str, Stage] = {
    s.name: s for s in (
        # Only [run] inputs/format/tools (in _import_inputs) feed import: a new report path must not re-import.
        Stage("import", "slmigrate.collect.importer", None, (), _run_import, extra=_import_inputs,
              runner_writes_manifest=True),
        Stage("curate", "slmigrate.curate.run", "curate", ("import",), _run_curate, extra=_curate_inputs),
        Stage("cluster", "slmigrate.cluster", "cluster", ("curate",), _run_cluster,
              extra=lambda ctx: ctx.config.prices.model_dump(mode="json")),
        Stage("probe", "slmigrate.probe", "probe", ("curate", "cluster"), _run_probe,
              extra=lambda ctx: [ctx.config.evaluate.primary, ctx.config.evaluate.threshold,
                                 ctx.config.evaluate.model]),
        Stage("select", "slmigrate.selection.run", "select", ("cluster",), _run_select),
        Stage("finetune", "slmigrate.finetune", "finetune", ("curate", "cluster", "select"), _run_finetune,
              extra=lambda ctx: ctx.config.run.train),
        Stage("evaluate", "slmigrate.evaluate.run", "evaluate", ("curate", "cluster", "finetune"), _run_evaluate,
              extra=lambda ctx: [ctx.config.prices.model_dump(mode="json"), ctx.config.run.train]),
        Stage("report", "slmigrate.report", "run", ("import", "curate", "cluster", "probe", "select",
                                                       "finetune", "evaluate"), _run_report, extra=_report_inputs,
              runner_writes_manifest=True),
    )
}


# --- the runner -----------------------------------------------------------------------------------------------


def _as_dict(result: Any) -> dict[str, Any]:
    if isinstance(result, dict):
        return result
    if hasattr(result, "to_dict"):
        return result.to_dict()
    if hasattr(result, "model_dump"):
        return result.model_dump()
    if hasattr(result, "__dataclass_fields__"):
        return asdict(result)
    return {}


def _manifest_counts(ws: Workspace, stage: str) -> dict[str, Any]:
    found = ws.manifest(stage)
    return dict(found.get("counts") or {}) if found else {}


def _select_stages(names: Sequence[str], from_stage: str | None, to_stage: str | None) -> list[str]:
    for flag, value in (("--from", from_stage), ("--to", to_stage)):
        if value is not None and value not in names:
            raise SlmigrateError(f"{flag} {value!r} is not a stage here; expected one of {', '.join(names)}")
    start = names.index(from_stage) if from_stage else 0
    stop = names.index(to_stage) + 1 if to_stage else len(names)
    if start >= stop:
        raise SlmigrateError(f"--from {from_stage} comes after --to {to_stage}; the order is {' -> '.join(names)}")
    return list(names[start:stop])


def _parts(stage: Stage, ctx: _Context) -> dict[str, Any]:
    """What the stage's output depends on, by part, so a re-run can say which part changed."""
    section = getattr(ctx.config, stage.section).fingerprint_dump() if stage.section else None
    upstream = {}
    for name in stage.reads:
        found = ctx.ws.manifest(STAGES[name].manifest or name)
        upstream[name] = None if found is None else [found["fingerprint"], found["created"]]
    extra = stage.extra(ctx) if stage.extra else None
    return {"config": fingerprint_of(section), "upstream": upstream, "inputs": fingerprint_of(extra)}


def _why_run(stage: Stage, ctx: _Context, record: dict[str, Any] | None, parts: dict[str, Any]) -> str | None:
    """None when the stage can be skipped, else the reason it must run."""
    own = ctx.ws.manifest(stage.manifest or stage.name)
    if record is None:
        return "never ran" if own is None else "not run by `slmigrate run` before"
    if record.get("finished") is None:
        return "failed last time" if record.get("failed") else "did not finish last time"
    if own is None:
        return "its output is missing"
    if own["created"] != record.get("manifest_created"):
        return "ran outside `slmigrate run` since"
    old = record.get("parts") or {}
    if old.get("config") != parts["config"]:
        return f"[{stage.section}] config changed" if stage.section else "its settings changed"
    changed = [name for name, ident in parts["upstream"].items() if (old.get("upstream") or {}).get(name) != ident]
    if changed:
        return f"{', '.join(changed)} changed"
    if old.get("inputs") != parts["inputs"]:
        return "its inputs changed"
    return None


class _Records:
    """The runner's manifest: per stage, what it saw when the stage last finished."""

    def __init__(self, ws: Workspace):
        self.ws = ws
        found = ws.manifest(RUNNER_MANIFEST)
        self.stages: dict[str, Any] = dict((found or {}).get("stages") or {})

    def get(self, stage: str) -> dict[str, Any] | None:
        return self.stages.get(stage)

    def put(self, stage: str, record: dict[str, Any]) -> None:
        self.stages[stage] = record
        self.ws.write_manifest(RUNNER_MANIFEST, fingerprint=fingerprint_of(self.stages),
                               extra={"stages": self.stages})


def run(
    ws: Workspace,
    config_path: str | Path | None = None,
    from_stage: str | None = None,
    to_stage: str | None = None,
    progress: Say | None = None,
    *,
    bar: Progress | None = None,
    config: Config | None = None,
    stages: Sequence[str] = STAGE_ORDER,
    registry: dict[str, Stage] | None = None,
) -> RunSummary:
    """Run the stages in order, skipping unchanged ones; returns what each did (check ``summary.ok``).

    ``config`` (already loaded) wins over ``config_path``; ``--from`` forces that stage to run even when it
    is unchanged (that is what asking for it means), ``--to`` stops after a stage. ``registry`` swaps stage
    implementations, for tests.
    """
    registry = registry or STAGES
    say = progress or (lambda _msg: None)
    if config is None:
        config = load_config(config_path)
    base_dir = Path(config_path).resolve().parent if config_path else Path.cwd()
    ctx = _Context(ws=ws, config=config, base_dir=base_dir, progress=say, bar=bar)
    chosen = _select_stages(list(stages), from_stage, to_stage)
    records = _Records(ws)
    results: list[StageResult] = []
    blocked_by: str | None = None
    started_all = time.monotonic()
    error = None
    for name in chosen:
        stage = registry[name]
        if blocked_by and name != "report":
            results.append(StageResult(name, "blocked", f"{blocked_by} did not run"))
            continue
        missing = stage.unavailable()
        if missing:
            # A stage that is not installed stops everything that needs its output; the report still shows
            # what exists, with the missing sections marked "not run yet".
            results.append(StageResult(name, "unavailable", missing))
            blocked_by = blocked_by or name
            continue
        parts = _parts(stage, ctx)
        reason = _why_run(stage, ctx, records.get(name), parts)
        if reason is None and name == from_stage:
            reason = "asked for with --from"
        if reason is None:
            counts = _manifest_counts(ws, stage.manifest or name)
            results.append(StageResult(name, "skipped", "inputs and config unchanged", 0.0, counts))
            say(f"{name}: skipped (inputs and config unchanged)")
            continue
        say(f"{name}: running ({reason})")
        before = ws.manifest(stage.manifest or name)
        records.put(name, {"started": now_iso(), "finished": None, "parts": parts})
        t0, t_wall = time.monotonic(), time.time()
        try:
            try:
                counts = stage.execute(ctx)
            except ImportError as missing:  # an optional extra the stage needs is not installed
                from slmigrate.extras import as_missing_extra

                needed = as_missing_extra(missing)
                if needed is None:
                    raise
                raise needed from missing
        except SlmigrateError as exc:
            records.put(name, {**records.get(name), "failed": str(exc)})
            results.append(StageResult(name, "failed", str(exc), round(time.monotonic() - t0, 2)))
            error = f"{name} failed: {exc}"
            blocked_by = name
            continue
        own = ws.manifest(stage.manifest or name)
        if stage.runner_writes_manifest or own is None:
            # A stage module that writes no manifest of its own (import, report) gets one from the runner, so
            # the stages after it have an identity to depend on.
            section = getattr(config, stage.section).model_dump(mode="json") if stage.section else {}
            own = ws.write_manifest(stage.manifest or name, fingerprint=fingerprint_of(parts), counts=counts,
                                    config=section, started=t_wall)
        duration = round(time.monotonic() - t0, 2)
        # Recompute after the run: the stage's own inputs (e.g. the store for curate) may be what it changed.
        records.put(name, {"started": records.get(name)["started"], "finished": now_iso(),
                           "parts": _parts(stage, ctx), "manifest_created": own["created"]})
        if before is not None and before["created"] == own["created"] and not stage.runner_writes_manifest:
            # The stage module checked its own fingerprint and found nothing new (e.g. curate after a re-import
            # that added no calls): it did no work, and the stages after it see the same input.
            results.append(StageResult(name, "skipped", f"{reason}, but it found nothing new to do", duration,
                                       counts))
            say(f"{name}: nothing new to do")
            continue
        results.append(StageResult(name, "ran", reason, duration, counts))
        say(f"{name}: done in {duration:.1f}s")
    report = report_path(ws, config) if "report" in chosen else None
    return RunSummary(
        gate=_gate(ws, config) if error is None and "evaluate" in chosen else None,
        workspace=str(ws.root), stages=results, error=error,
        report=str(report) if report and report.exists() else None,
        duration_s=round(time.monotonic() - started_all, 2), answer=_answer(ws, config),
    )


def _answer(ws: Workspace, config: Config) -> dict[str, Any] | None:
    from slmigrate.headline import headline

    return headline(ws, config)


def _gate(ws: Workspace, config: Config) -> dict[str, Any] | None:
    """The CI gate on the workspace's evaluation - whether `evaluate` ran now or was unchanged and skipped."""
    from slmigrate.evaluate.run import gate

    fail_under = config.evaluate.fail_under
    evaluation = ws.evaluation()
    if fail_under is None or evaluation is None:
        return None
    return {"fail_under": fail_under, "failing": gate(dict(evaluation), fail_under)}


def audit(paths: Sequence[str | Path], out_dir: str | Path | None = None, progress: Say | None = None, *,
          bar: Progress | None = None, config: Config | None = None, workspace: str | Path | None = None,
          tools: str | Path | None = None, assume_model: str | None = None,
          fewshot: bool | None = None) -> RunSummary:
    """One-off audit of existing logs: import, curate, cluster, probe, estimate (select, no training), report.

    The workspace is ``workspace`` when given (the report then goes to ``out_dir``, or the workspace's
    ``reports/``), else ``out_dir`` holds both, the report as ``report.html`` and ``report.md``. ``tools``: the
    tool schemas of logs that carry none (as `collect import --tools`); ``assume_model``: the model of calls
    whose log names none, for pricing; ``fewshot=False`` skips the small model's few-shot probe.
    """
    files = [Path(p).expanduser().resolve() for p in paths]
    if not files:
        raise SlmigrateError("audit needs at least one log file; e.g. `slmigrate audit calls.jsonl`")
    for f in files:
        if not f.exists():
            raise SlmigrateError(f"log file {f} does not exist; pass paths to existing call logs")
    if tools is not None and not Path(tools).expanduser().exists():
        raise SlmigrateError(f"tools file {tools} does not exist; pass the JSON file of the agent's tool schemas")
    out = Path(out_dir).expanduser().resolve() if out_dir is not None else None
    config = (config or Config()).model_copy(deep=True)
    config.run.inputs = [str(f) for f in files]
    if tools is not None:
        config.run.tools = str(Path(tools).expanduser().resolve())
    if assume_model:
        config.prices.default_model = assume_model
    if fewshot is False:
        config.probe.fewshot_calls = 0
    if workspace is not None:
        ws = Workspace.open(workspace)
        config.run.report = str(out / "report.html") if out is not None else "report.html"
    else:
        out = out or Path("slmigrate-audit").resolve()
        config.run.report = str(out / "report.html")
        ws = Workspace.open(out)
    return run(ws, config=config, stages=AUDIT_STAGES, progress=progress, bar=bar)
