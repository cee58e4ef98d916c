"""`slmigrate export vllm | merged`: hand the specialists to production serving."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from slmigrate.cli._app import JsonOpt, WorkspaceOpt, app, console, open_workspace, print_json

export_app = typer.Typer(help="Hand the specialists to production serving (vLLM multi-LoRA, merged weights).",
                         no_args_is_help=True)
app.add_typer(export_app, name="export")


@export_app.command("vllm")
def export_vllm(
    out: Annotated[Optional[Path], typer.Option("--out", help="Folder for vllm_serve.sh and routing.json.")] = None,
    port: Annotated[int, typer.Option(help="Port for vLLM.")] = 8000,
    workspace: WorkspaceOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Print a vLLM multi-LoRA launch command for every migrated cluster, and a routing table.

    Example: slmigrate export vllm --out deploy/
    """
    from slmigrate.serve.export import export_vllm as run

    result = run(open_workspace(workspace, create=False), out, port=port)
    if json_out:
        print_json(result)
        return
    console.print(result["command"], highlight=False, soft_wrap=True)
    for route in result["routing"]["routes"]:
        console.print(f"  {route['cluster']} -> model {route['model']!r} ({route['kind']})", highlight=False)
    for f in result.get("files", []):
        console.print(f"wrote {f}")


@export_app.command("merged")
def export_merged(
    cluster: Annotated[str, typer.Option("--cluster", help="The cluster whose adapter to merge.")],
    out: Annotated[Optional[Path], typer.Option("--out", help="Output folder (default exports/merged/<cluster>).")]
    = None,
    workspace: WorkspaceOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Merge a cluster's LoRA adapter into its base model and save full safetensors weights.

    Example: slmigrate export merged --cluster c2 --out merged-c2/
    """
    from slmigrate.serve.export import export_merged as run

    result = run(open_workspace(workspace, create=False), cluster, out)
    if json_out:
        print_json(result)
    else:
        console.print(f"merged {cluster} ({result['parameters']:,} parameters) into {result['path']}")
