"""`slmigrate init` and `slmigrate status`."""

from __future__ import annotations

from rich.table import Table

from slmigrate.cli._app import JsonOpt, WorkspaceOpt, app, console, open_workspace, print_json


@app.command()
def init(workspace: WorkspaceOpt = None, json_out: JsonOpt = False) -> None:
    """Create a workspace (store + artifact folders). Other commands create it too when needed.

    Example: slmigrate init --workspace ./migration
    """
    ws = open_workspace(workspace)
    info = {"workspace": str(ws.root), "store": ws.store.display, "schema_version": ws.store.schema_version}
    if json_out:
        print_json(info)
    else:
        console.print(f"Workspace ready at [bold]{ws.root}[/] (store schema v{info['schema_version']}).")


@app.command()
def status(workspace: WorkspaceOpt = None, json_out: JsonOpt = False) -> None:
    """Show calls by source, agent and model, token totals, and which stages are done or stale.

    Example: slmigrate status --json
    """
    from slmigrate.status import status as workspace_status

    info = workspace_status(open_workspace(workspace, create=False))
    if json_out:
        print_json(info)
        return
    console.print(
        f"[bold]{info['workspace']}[/]: {info['calls']:,} calls in {info['sessions']:,} sessions, "
        f"{info['prompt_tokens']:,} prompt + {info['completion_tokens']:,} completion tokens, "
        f"{info['failed_calls']:,} failed"
    )
    for key, title in (("by_source", "source"), ("by_agent", "agent"), ("by_model", "model")):
        table = Table(title=f"calls by {title}", title_justify="left")
        for col in (title, "calls", "prompt tokens", "completion tokens"):
            table.add_column(col, justify="left" if col == title else "right")
        for row in info[key]:
            table.add_row(str(row["key"]), f"{row['calls']:,}", f"{row['prompt_tokens']:,}",
                          f"{row['completion_tokens']:,}")
        console.print(table)
    table = Table(title="stages", title_justify="left")
    for col in ("stage", "state", "last run", "counts"):
        table.add_column(col)
    for stage, s in info["stages"].items():
        state = "not run" if not s["exists"] else ("[yellow]stale[/]: " + s["why"] if s["stale"] else "[green]fresh[/]")
        counts = ", ".join(f"{k}={v}" for k, v in (s.get("counts") or {}).items())
        table.add_row(stage, state, s.get("created") or "", counts)
    console.print(table)
    if info["live_guard"]:
        table = Table(title="live guard (slmigrate serve)", title_justify="left")
        for col in ("task", "state", "sampled", "agreement", "95% bound", "threshold"):
            table.add_column(col, justify="left" if col in ("task", "state") else "right")
        for cid, t in info["live_guard"].items():
            bound = "" if t["lower"] is None else f"{t['lower']:.3f}-{t['upper']:.3f}"
            table.add_row(cid, "[red]demoted to the LLM[/]" if t["demoted"] else "[green]on the small model[/]",
                          str(t["samples"]), "" if t["agreement"] is None else f"{t['agreement']:.3f}", bound,
                          "" if t["threshold"] is None else f"{t['threshold']:.2f}")
        console.print(table)
