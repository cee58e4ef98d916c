"""`slmigrate run`, `slmigrate audit` and `slmigrate report`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape
from rich.table import Table

from slmigrate.cli._app import ConfigOpt, JsonOpt, WorkspaceOpt, app, console, err_console, open_workspace, print_json
from slmigrate.errors import SlmigrateError
from slmigrate.progress import Bars

_STYLE = {"ran": "green", "skipped": "dim", "failed": "bold red", "unavailable": "yellow", "blocked": "yellow"}


class _Feedback:
    """Stage lines and in-stage progress bars on stderr. A bar lives only while its stage reports progress:
    the next stage line closes it, so it never overlaps a stage module's own bar."""

    def __init__(self) -> None:
        # Bars only on a terminal: in a log file or CI the stage lines are enough.
        self.bars = Bars(err_console.is_terminal, console=err_console, label="  {task.description}")

    def say(self, message: str) -> None:
        self.close()
        err_console.print(f"[dim]›[/] {escape(message)}", highlight=False)

    def close(self) -> None:
        self.bars.close()

    def __enter__(self) -> "_Feedback":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _print_summary(summary, title: str) -> None:
    table = Table(title=title, title_justify="left")
    for col in ("stage", "status", "why", "time", "counts"):
        table.add_column(col, justify="right" if col == "time" else "left", overflow="fold")
    for s in summary.stages:
        counts = ", ".join(f"{k}={v:,}" if isinstance(v, int) else f"{k}={v}" for k, v in s.counts.items()
                           if not isinstance(v, (dict, list)))
        table.add_row(s.stage, f"[{_STYLE.get(s.status, '')}]{s.status}[/]", escape(s.reason),
                      f"{s.duration_s:.1f}s" if s.status == "ran" else "", escape(counts))
    console.print(table)
    console.print(("[green]" if summary.ok else "[red]") + escape(summary.headline) + "[/]", highlight=False)
    if summary.report:
        console.print(f"Report: [bold]{summary.report}[/] (and {Path(summary.report).with_suffix('.md').name})")
    if summary.answer:
        _print_answer(summary.answer)
    if summary.gate:
        failing = summary.gate["failing"]
        console.print(f"Quality gate (fail_under {summary.gate['fail_under']}): "
                      + ("[red]failed[/] for " + ", ".join(escape(f["cluster"]) for f in failing) if failing
                         else "[green]passed[/]"), highlight=False)


def _print_answer(answer: dict) -> None:
    """The headline: per task prior, measured with interval, fine-tuned; then the answer in words."""
    table = Table(title="What could move to small models", title_justify="left")
    for col in ("task", "calls", "cost", "prior", "measured (95% interval)", "threshold", "fine-tuned"):
        table.add_column(col, justify="left" if col == "task" else "right", overflow="fold")

    def pct(x):
        return "" if x is None else f"{100 * x:.0f}%"

    for t in answer["per_task"]:
        measured = "" if t["measured"] is None else (
            f"{t['measured']:.2f} ({t['low']:.2f}-{t['high']:.2f}, {t['probe']}, n={t['n']})")
        cost = f"${t['cost_usd']:,.2f}" if answer["cost_known"] and t["cost_usd"] is not None else "unknown"
        table.add_row(escape(f"{t['cluster']} {t['label'] or ''}"), "" if t["calls"] is None else f"{t['calls']:,}",
                      cost, pct(t["prior"]),
                      escape(measured), "" if t["threshold"] is None else f"{t['threshold']:.2f}",
                      "" if t["finetuned"] is None else f"{t['finetuned']:.2f}")
    console.print(table)
    console.print(f"[bold]{escape(answer['text'])}[/]", highlight=False)


def _finish(summary, json_out: bool, title: str) -> None:
    if json_out:
        print_json(summary.to_dict())
    else:
        _print_summary(summary, title)
    if not summary.ok:
        raise SlmigrateError(summary.error)
    if summary.gate_failed:
        from slmigrate.evaluate.run import raise_if_failing

        raise_if_failing(summary.gate["failing"], summary.gate["fail_under"])  # exit code 3


@app.command("run")
def run_cmd(
    config: ConfigOpt = None,
    from_stage: Annotated[Optional[str], typer.Option(
        "--from", help="Start at this stage and run it even if unchanged: "
        "import, curate, cluster, select, finetune, evaluate, report.")] = None,
    to_stage: Annotated[Optional[str], typer.Option("--to", help="Stop after this stage.")] = None,
    workspace: WorkspaceOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Run the whole migration from one config file, skipping stages whose inputs and config are unchanged.

    A stage interrupted last time runs again; finished ones are not redone. Ends with a summary and the path
    of the report.

    Example: slmigrate run --config slmigrate.toml --to cluster
    """
    from slmigrate.pipeline import run

    ws = open_workspace(workspace)
    with _Feedback() as fb:
        summary = run(ws, config_path=config, from_stage=from_stage, to_stage=to_stage, progress=fb.say,
                      bar=fb.bars)
    _finish(summary, json_out, f"slmigrate run ({summary.duration_s:.1f}s)")


@app.command("audit")
def audit_cmd(
    paths: Annotated[list[Path], typer.Argument(help="Call logs to audit (any format `collect import` reads).")],
    out: Annotated[Optional[Path], typer.Option(
        "--out", "-o", help="Folder for the report (report.html, report.md); without the global --workspace "
        "also the audit's workspace.  [default: slmigrate-audit]", show_default=False)] = None,
    config: Annotated[Optional[Path], typer.Option(
        "--config", "-c", help="Config file for stage settings and prices (optional).")] = None,
    tools: Annotated[Optional[Path], typer.Option(
        "--tools", help="Tool schemas (JSON) for logs that carry none, as for `collect import --tools`.")] = None,
    assume_model: Annotated[Optional[str], typer.Option(
        "--assume-model", help="Model of the calls whose log names none, for pricing (e.g. gpt-4o); "
        "config: [prices] default_model.")] = None,
    fewshot: Annotated[bool, typer.Option(
        "--fewshot/--no-fewshot", help="Also probe the local small model few-shot on a small sample "
        "(minutes on a CPU); the nearest-neighbour probe always runs.")] = True,
    json_out: JsonOpt = False,
) -> None:
    """One-off audit of logs you already have: import, curate, cluster, probe, estimate (no training), report.

    Ends with the answer: the recurring tasks the agent's LLM calls fall into, what they cost, and the share of
    calls and cost that could move to small models - measured per task with a 95% interval, beside the hand-set
    prior - before you train anything. The global --workspace keeps the audit in that workspace.

    Example: slmigrate audit tau-airline.json --tools airline_tools.json --assume-model gpt-4o --out audit/
    """
    import os

    from slmigrate import env
    from slmigrate.cli._app import workspace_path
    from slmigrate.config import load_config
    from slmigrate.pipeline import audit

    cfg = load_config(config) if config else None
    workspace = workspace_path(None) or os.environ.get(env.WORKSPACE) or None
    with _Feedback() as fb:
        summary = audit(paths, out, progress=fb.say, bar=fb.bars, config=cfg, workspace=workspace, tools=tools,
                        assume_model=assume_model, fewshot=fewshot)
    _finish(summary, json_out, f"slmigrate audit ({summary.duration_s:.1f}s)")


@app.command("report")
def report_cmd(
    out: Annotated[Optional[Path], typer.Option(
        "--out", "-o", help="HTML file to write (default: reports/report.html in the workspace).")] = None,
    markdown: Annotated[bool, typer.Option("--markdown/--no-markdown",
                                           help="Also write the Markdown version next to it.")] = True,
    config: Annotated[Optional[Path], typer.Option(
        "--config", "-c", help="Config file for prices and thresholds (default: the settings the workspace's stages "
        "last ran with).")] = None,
    workspace: WorkspaceOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Write one self-contained HTML report (opens offline) and its Markdown twin from what the workspace holds.

    Sections for stages that have not run say which command fills them.

    Example: slmigrate report --out migration.html
    """
    from slmigrate.config import workspace_config
    from slmigrate.report import report

    ws = open_workspace(workspace, create=False)
    target = out or ws.path("reports", "report.html")
    info = report(ws, workspace_config(ws, config), out=target, markdown=markdown)
    if json_out:
        print_json(info.to_dict())
        return
    console.print(f"Report: [bold]{info.html}[/]" + (f" and {info.markdown}" if info.markdown else ""))
    missing = [s["title"] for s in info.sections if not s["present"]]
    if missing:
        console.print(f"[dim]not run yet: {', '.join(missing)}[/]")
