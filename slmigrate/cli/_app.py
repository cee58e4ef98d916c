"""The typer application and the helpers every command module shares."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console

from slmigrate import __version__

console = Console()
err_console = Console(stderr=True)

app = typer.Typer(
    name="slmigrate",
    help=(
        "Migrate an AI agent's LLM calls to small, specialised language models.\n\n"
        "Pipeline: collect -> curate -> cluster -> select -> finetune -> evaluate -> serve/refine.\n\n"
        "Example: slmigrate collect import calls.jsonl && slmigrate status"
    ),
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
)

_state: dict[str, Any] = {"workspace": None, "store": None}

WorkspaceOpt = Annotated[
    Optional[Path],
    typer.Option("--workspace", "-w", help="Workspace folder (env SLMIGRATE_WORKSPACE, default ./.slmigrate).",
                 show_default=False),
]
StoreOpt = Annotated[
    Optional[str],
    typer.Option("--store", help="Where calls are stored: postgresql://USER@HOST/DB (several proxies into one "
                 "database), sqlite:///PATH or a file path (env SLMIGRATE_STORE, default WORKSPACE/slmigrate.sqlite).",
                 show_default=False),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON instead of tables.")]
ConfigOpt = Annotated[Optional[Path], typer.Option(
    "--config", "-c", help="Config file (default ./slmigrate.toml when present).")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Run even when nothing changed since the last run.")]
# The stages with a heavy per-call pass (curate, cluster) can run it on Ray (slmigrate/engines.py).
RayAddressOpt = Annotated[Optional[str], typer.Option(
    "--ray-address", help="Ray cluster to use with --engine ray (default: start a local Ray).")]


def _version(value: bool) -> None:
    if value:
        print(f"slmigrate {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    workspace: WorkspaceOpt = None,
    store: StoreOpt = None,
    key_file: Annotated[Optional[Path], typer.Option(
        "--key-file", help="File holding the payload encryption key (instead of SLMIGRATE_ENCRYPTION_KEY)."
    )] = None,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Show the version and exit.")] = False,
) -> None:
    _state["workspace"] = workspace
    _state["store"] = store
    if key_file is not None:
        from slmigrate.store import crypto

        crypto.use_key_file(key_file)


def workspace_path(local: Optional[Path] = None) -> Optional[Path]:
    """The per-command --workspace wins over the global one; both fall back to the environment/default."""
    return local or _state["workspace"]


def open_workspace(local: Optional[Path] = None, *, create: bool = True, store: Optional[str] = None):
    """The workspace of --workspace, with its calls in --store (per-command wins over global, then the env)."""
    from slmigrate.workspace import Workspace

    return Workspace.open(workspace_path(local), create=create, store=store or _state["store"])


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n")


# Command groups shared by several modules (e.g. `collect import` and `collect proxy` live apart).
collect_app = typer.Typer(help="Bring an agent's LLM calls into the workspace (import logs, or a logging proxy).",
                          no_args_is_help=True)
calls_app = typer.Typer(help="List, show and export the stored calls.", no_args_is_help=True)
models_app = typer.Typer(help="The small-model catalogue and local weights (list, pull).", no_args_is_help=True)
app.add_typer(collect_app, name="collect")
app.add_typer(calls_app, name="calls")
app.add_typer(models_app, name="models")
