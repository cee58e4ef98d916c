"""`slmigrate calls list | show | export`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from slmigrate.cli._app import JsonOpt, WorkspaceOpt, calls_app, console, err_console, open_workspace, print_json

_TABLE_LIMIT = 50


@calls_app.command("list")
def list_cmd(
    limit: Annotated[Optional[int], typer.Option(
        "--limit", "-n", help=f"At most N calls, oldest first (table default {_TABLE_LIMIT}, JSON default all; "
        "0 = all).")] = None,
    workspace: WorkspaceOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """List stored calls: id, the input's own id, agent, model, time, tokens, status and cluster.

    Example: slmigrate calls list --limit 20 --json
    """
    from slmigrate.calls import list_calls

    ws = open_workspace(workspace, create=False)
    if json_out:
        print_json(list_calls(ws, limit))
        return
    rows = list_calls(ws, _TABLE_LIMIT if limit is None else limit)
    table = Table(title_justify="left")
    # Ids are what a user copies into `calls show`: never cut or wrapped, whatever the terminal's width; the
    # other columns fold instead.
    table.add_column("id", no_wrap=True, min_width=26)
    for col in ("input id", "agent", "model", "timestamp", "tokens in/out", "status", "cluster"):
        table.add_column(col, justify="right" if col == "tokens in/out" else "left", overflow="fold")
    for r in rows:
        table.add_row(r["id"], r["input_id"] or "", r["agent"] or "", r["model"] or "", r["timestamp"] or "",
                      f"{r['prompt_tokens'] or 0:,}/{r['completion_tokens'] or 0:,}", r["status"],
                      r["cluster"] or "")
    console.print(table)
    total = ws.store.count_calls()
    if len(rows) < total:
        err_console.print(f"showing {len(rows):,} of {total:,} calls; use --limit 0 for all")


@calls_app.command("show")
def show_cmd(
    call_id: Annotated[str, typer.Argument(help="The call's id (or the input's own id).", show_default=False)],
    workspace: WorkspaceOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Show one call in full: request, response, usage, timing and metadata.

    Example: slmigrate calls show 01JD3Z6P8XQ0S6R3K9V7W2M4TB
    """
    from slmigrate.calls import show_call

    call = show_call(open_workspace(workspace, create=False), call_id)
    if json_out:
        print_json(call)
        return
    from rich.json import JSON

    # Coloured on a terminal, but never hard-wrapped: what is printed stays valid JSON to copy or pipe.
    console.print(JSON.from_data(call, default=str), soft_wrap=True)


@calls_app.command("export")
def export_cmd(
    format: Annotated[str, typer.Option(
        "--format", "-f", help="openai ({request, response} per line, re-importable) or openai-ft "
        "(fine-tuning JSONL).")] = "openai",
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Output file (default: stdout).")] = None,
    workspace: WorkspaceOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Export every stored call as JSONL. `--format openai` round-trips through `collect import`.

    Example: slmigrate calls export --format openai-ft --out train.jsonl
    """
    from slmigrate.calls import export_calls

    counts = export_calls(open_workspace(workspace, create=False), format, out)
    if out is None:
        return  # stdout carries the data; a summary would corrupt it
    if json_out:
        print_json({"out": str(out), "format": format, **counts})
    else:
        console.print(f"wrote {counts['written']:,} calls to {out}"
                      + (f" ({counts['skipped']:,} failed calls left out)" if counts["skipped"] else ""))
