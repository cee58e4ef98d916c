"""`slmigrate curate` (scrub, dedup, filter, split) and `slmigrate curate export`."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer
from rich.table import Table

from slmigrate.cli._app import (
    ConfigOpt, ForceOpt, JsonOpt, RayAddressOpt, WorkspaceOpt, app, console, err_console, open_workspace,
    print_json,
)

if TYPE_CHECKING:
    from slmigrate.curate.run import CurateResult

# The group's help is the callback's docstring, so `slmigrate curate --help` shows the options and an example.
curate_app = typer.Typer(invoke_without_command=True)
app.add_typer(curate_app, name="curate")


@curate_app.callback()
def curate_cmd(
    ctx: typer.Context,
    pii: Annotated[Optional[str], typer.Option(
        "--pii", help="placeholder (<PERSON_1>), synthetic (consistent fake values) or off.")] = None,
    entities: Annotated[Optional[str], typer.Option(
        "--entities", help="Comma-separated entity types to scrub (DEFAULT = the default set, e.g. "
        "DEFAULT,LOCATION). See docs/curate.md.")] = None,
    workers: Annotated[Optional[int], typer.Option(
        "--workers", help="Workers for PII analysis: processes (local) or Ray actors (ray).", min=1)] = None,
    engine: Annotated[Optional[str], typer.Option(
        "--engine", help="local, or ray: the PII pass as Ray Data over --workers actors "
        "(needs the ray extra of slmigrate).")] = None,
    ray_address: RayAddressOpt = None,
    min_outcome: Annotated[Optional[float], typer.Option(
        "--min-outcome", help="Drop calls from workflows whose outcome (e.g. tau reward) is below this.")] = None,
    force: ForceOpt = False,
    config: ConfigOpt = None,
    workspace: WorkspaceOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Scrub PII/PHI/secrets, drop failed, truncated, empty and duplicate calls, split train/validation/test by
    session, and save a new version of the curated dataset with a report.

    Example: slmigrate curate --pii synthetic --workers 2 --min-outcome 1.0

    Example: slmigrate curate --engine ray --ray-address ray://head:10001 --workers 32
    """
    if ctx.invoked_subcommand is not None:
        return
    from slmigrate.config import load_config
    from slmigrate.curate.run import curate

    ent_list = [e for e in entities.split(",") if e.strip()] if entities else None
    cfg = load_config(config, {"curate": {"pii": pii, "entities": ent_list, "workers": workers,
                                          "min_outcome": min_outcome, "engine": engine,
                                          "ray_address": ray_address}}).curate
    ws = open_workspace(workspace, create=False)
    if json_out:
        print_json(curate(ws, cfg, force=force).to_dict())
        return
    from slmigrate.progress import Bars

    with Bars(console=err_console, label="{task.description:>8}") as bars:
        report = curate(ws, cfg, progress=bars, force=force)
    _print_report(report)


def _print_report(report: CurateResult) -> None:
    if report.skipped:
        console.print(f"Curated data {report.version} is up to date ({report.skip_reason}); "
                      "nothing to do. Use --force to run anyway.")
        return
    console.print(f"Curated [bold]{report.version}[/]: {report.calls_in:,} calls in, "
                  f"{report.calls_out:,} kept (pii={report.pii}, {report.duration_s}s).")
    table = Table(title="dropped", title_justify="left")
    table.add_column("reason")
    table.add_column("calls", justify="right")
    for reason, n in report.dropped.items():
        table.add_row(reason, f"{n:,}")
    console.print(table)
    table = Table(title="splits (by session)", title_justify="left")
    for col in ("split", "calls", "sessions"):
        table.add_column(col, justify="left" if col == "split" else "right")
    for split, n in report.splits.items():
        table.add_row(split, f"{n:,}", f"{report.sessions[split]:,}")
    console.print(table)
    if report.entities:
        table = Table(title="entities replaced (distinct values per call, summed)", title_justify="left")
        table.add_column("entity")
        table.add_column("count", justify="right")
        for entity, n in report.entities.items():
            table.add_row(entity, f"{n:,}")
        console.print(table)
    for ex in report.examples or []:
        console.print(f"[dim]example {ex['id']} ({', '.join(ex['entities'])}):[/] {ex['text']!r}", highlight=False)


@curate_app.command("export")
def export_cmd(
    out: Annotated[Path, typer.Option("--out", "-o", help="JSON Lines file to write.")],
    fmt: Annotated[str, typer.Option(
        "--format", "-f", help="openai (request/response with ids) or openai-ft (messages+tools per line).")]
    = "openai",
    split: Annotated[str, typer.Option("--split", help="train, validation, test or all.")] = "all",
    version: Annotated[Optional[str], typer.Option("--version", help="Curated version (default: newest).")]
    = None,
    workspace: WorkspaceOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Export the curated calls as JSON Lines for other trainers (TRL, axolotl, Unsloth, OpenAI fine-tuning).

    Example: slmigrate curate export --format openai-ft --split train --out train.jsonl
    """
    from slmigrate.curate.run import export

    info = export(open_workspace(workspace, create=False), out, fmt, split, version)
    if json_out:
        print_json(info)
    else:
        console.print(f"Wrote {info['calls']:,} {info['split']} calls ({info['format']}, {info['version']}) "
                      f"to [bold]{info['out']}[/].")
