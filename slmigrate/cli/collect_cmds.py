"""`slmigrate collect import`: load existing call logs into the workspace."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from slmigrate.cli._app import (ConfigOpt, JsonOpt, WorkspaceOpt, collect_app, console, err_console, open_workspace,
                                print_json)

_BAR_MIN_BYTES = 4 << 20  # smaller imports finish before a bar is worth drawing


@collect_app.command("import")
def import_cmd(
    paths: Annotated[list[Path], typer.Argument(help="Log files or folders (.jsonl, .json, gzipped or not).",
                                                show_default=False)],
    format: Annotated[str, typer.Option(
        "--format", "-f", help="auto (detect per file), openai, openai-ft, conversation, otel, langfuse, "
        "anthropic, toolbench, or a plug-in's name. See docs/formats.md.")] = "auto",
    agent: Annotated[Optional[str], typer.Option(
        "--agent", help="Agent tag for calls whose log does not name one (default: collect.agent in "
        "slmigrate.toml).")] = None,
    tools: Annotated[Optional[Path], typer.Option(
        "--tools", help="JSON file of tool schemas for records that carry none (e.g. conversation logs).")] = None,
    config: ConfigOpt = None,
    workspace: WorkspaceOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Import LLM call logs; the format is detected per file. Re-importing a file adds nothing.

    Exit code 0 when every record was imported (or already present), 2 when some were skipped (each listed with
    file:line and the reason), 1 when an input cannot be read at all (then nothing is written).

    Example: slmigrate collect import calls.jsonl.gz traces.json --format auto --agent support-bot
    """
    from slmigrate.collect.importer import import_calls
    from slmigrate.config import load_config

    cfg = load_config(config, {"collect": {"agent": agent}}).collect
    ws = open_workspace(workspace)
    total = sum(p.stat().st_size for p in paths if p.is_file())
    if total >= _BAR_MIN_BYTES:
        from slmigrate.progress import Bars

        with Bars(console=err_console, unit="bytes", label="importing {task.description}") as bars:
            result = import_calls(ws, paths, format=format, agent=cfg.agent, tools_file=tools,
                                  progress=lambda file, done, size: bars(Path(file).name, done, size))
    else:
        result = import_calls(ws, paths, format=format, agent=cfg.agent, tools_file=tools)

    if json_out:
        print_json(result.to_dict())
    else:
        table = Table(title=f"imported into {ws.root}", title_justify="left")
        for col in ("file", "format", "calls", "new", "duplicates", "skipped"):
            table.add_column(col, justify="left" if col in ("file", "format") else "right",
                             overflow="fold" if col == "file" else "ellipsis")
        for f in result.files:
            fmt = f"{f.format} (detected)" if f.detected else f.format
            table.add_row(f.path, fmt, f"{f.calls:,}", f"{f.imported:,}", f"{f.duplicates:,}", f"{f.skipped:,}")
        console.print(table)
        _print_listed("skipped", [(e["file"], e["line"], e["reason"]) for e in result.errors], result.skipped,
                      "skipped records")
        _print_listed("normalised", [(n["file"], n["line"], n["note"]) for n in result.notes], result.normalised,
                      "normalised calls")
        normalised = f", {result.normalised:,} imported with values normalised" if result.normalised else ""
        console.print(f"{result.imported:,} new calls, {result.duplicates:,} already present, "
                      f"{result.skipped:,} skipped{normalised}.")
    if result.exit_code:
        raise typer.Exit(result.exit_code)


def _print_listed(label: str, items: list[tuple[str, int, str]], total: int, what: str, shown: int = 20) -> None:
    """The first ``shown`` of a list of file:line messages on stderr, then how many more there are."""
    from rich.markup import escape

    for file, line, text in items[:shown]:
        # escape: a reason may quote the log ("[DONE]", "[/]"), which rich would read as markup
        err_console.print(f"[yellow]{label}[/] {escape(f'{file}:{line}: {text}')}", highlight=False, soft_wrap=True)
    if total > shown:
        err_console.print(f"... and {total - shown:,} more {what} (see --json for the list)")
