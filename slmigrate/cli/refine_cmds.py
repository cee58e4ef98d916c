"""`slmigrate refine`: fold new traffic back in (new tasks, drift, retraining)."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from slmigrate.cli._app import ConfigOpt, JsonOpt, WorkspaceOpt, app, console, open_workspace, print_json


@app.command()
def refine(
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the plan; change nothing.")] = False,
    config: ConfigOpt = None,
    workspace: WorkspaceOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Fold the calls that arrived since the last run back in: assign, detect new tasks and drift, retrain.

    Example: slmigrate refine --dry-run
    """
    from slmigrate.config import load_config
    from slmigrate.refine import refine as run_refine

    cfg = load_config(config)
    plan = run_refine(open_workspace(workspace, create=False), cfg, dry_run=dry_run)
    if json_out:
        print_json(plan)
        return
    if plan["nothing_to_do"]:
        console.print(f"Nothing to do: {plan['summary']}")
        return
    console.print(plan["summary"])
    table = Table(title="plan" + (" (dry run: nothing changed)" if dry_run else ""), title_justify="left")
    for col in ("action", "cluster", "why"):
        table.add_column(col)
    for action in plan["actions"]:
        table.add_row(action["action"], str(action.get("cluster") or ""), action["why"])
    console.print(table)
