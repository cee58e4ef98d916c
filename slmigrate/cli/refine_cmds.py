"""`slmigrate refine`: fold new traffic back in (new tasks, drift, retraining)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from slmigrate.cli._app import JsonOpt, WorkspaceOpt, app, console, open_workspace, print_json


@app.command()
def refine(
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the plan; change nothing.")] = False,
    config: Annotated[Optional[Path], typer.Option(
        "--config", "-c", help="Config file (default: the settings the workspace's stages last ran with).")] = None,
    workspace: WorkspaceOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Fold the calls that arrived since the last run back in: assign, detect new tasks and drift, retrain.

    Example: slmigrate refine --dry-run
    """
    from slmigrate.config import workspace_config
    from slmigrate.refine import refine as run_refine

    ws = open_workspace(workspace, create=False)
    # The workspace's own settings (what its stages ran with) unless --config names a file: not ./slmigrate.toml.
    plan = run_refine(ws, workspace_config(ws, config), dry_run=dry_run)
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
