"""`slmigrate finetune`: train one small model per cluster on the LLM's recorded answers."""

from __future__ import annotations

from typing import Annotated, Optional

import typer
from rich.table import Table

from slmigrate.cli._app import ConfigOpt, JsonOpt, WorkspaceOpt, app, console, open_workspace, print_json


@app.command()
def finetune(
    cluster: Annotated[Optional[list[str]], typer.Option(
        "--cluster", help="Cluster id to train (repeatable); default: selected clusters, else all.")] = None,
    selected: Annotated[bool, typer.Option("--selected", help="Train the clusters `slmigrate select` chose a "
                                                              "model for.")] = False,
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="Catalogue name, hub id or local model "
                                                 "folder; default: the selected model, else SmolLM2-135M.")] = None,
    method: Annotated[Optional[str], typer.Option(help="lora | qlora (CUDA) | full.")] = None,
    device: Annotated[Optional[str], typer.Option(help="auto | cpu | cuda.")] = None,
    epochs: Annotated[Optional[float], typer.Option(help="Epochs (default by data size).")] = None,
    max_steps: Annotated[Optional[int], typer.Option("--max-steps", help="Stop after N optimiser steps.")] = None,
    lr: Annotated[Optional[float], typer.Option(help="Peak learning rate (default by method and size).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the last checkpoint.")] = False,
    prune_static_prefix: Annotated[Optional[bool], typer.Option(
        "--prune-static-prefix/--keep-static-prefix",
        help="Train without the cluster's shared system-prompt prefix and fixed tool list (fewer input tokens "
             "per call).")] = None,
    gradient_checkpointing: Annotated[Optional[bool], typer.Option(
        "--gradient-checkpointing/--no-gradient-checkpointing", help="Trade compute for memory.")] = None,
    stop_when_exact: Annotated[Optional[bool], typer.Option(
        "--stop-when-exact/--no-stop-when-exact",
        help="Stop once three validations in a row find every validation answer reproduced exactly.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Retrain even when nothing changed.")] = False,
    config_file: ConfigOpt = None,
    workspace: WorkspaceOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Fine-tune a small model per cluster (LoRA, QLoRA or full) on the curated calls; save PEFT adapters.

    Writes adapters/<cluster>/<model>/ (PEFT adapter, config, data fingerprint, metrics, loss.png).

    Example: slmigrate finetune --cluster 3 --model smollm2-135m-instruct --max-steps 200
    """
    from slmigrate.config import load_config
    from slmigrate.finetune import finetune as run

    if cluster and selected:
        raise typer.BadParameter("use either --cluster or --selected, not both")
    config = load_config(config_file, {"finetune": {
        "model": model, "method": method, "device": device, "epochs": epochs, "max_steps": max_steps, "lr": lr,
        "prune_static_prefix": prune_static_prefix, "gradient_checkpointing": gradient_checkpointing,
        "stop_when_exact": stop_when_exact,
    }}).finetune
    ws = open_workspace(workspace, create=False)
    if json_out:
        print_json(run(ws, config, clusters=cluster, selected=selected, resume=resume, force=force).to_dict())
        return
    from slmigrate.progress import Bars

    # The bars stay when done: each cluster's last loss is worth keeping on screen.
    with Bars(transient=False, fields={"loss": "loss {}", "tps": "{} tok/s"}) as bars:
        result = run(ws, config, progress=bars, force=force, clusters=cluster, selected=selected, resume=resume)
    table = Table(title="finetune", title_justify="left")
    for col in ("cluster", "model", "status", "examples", "steps", "best val loss", "tokens/s", "padding",
                "output"):
        table.add_column(col, justify="right" if col in ("examples", "steps", "tokens/s") else "left")
    for r in result.adapters:
        val = r.get("best_val_loss")
        table.add_row(
            str(r["cluster"]), r.get("model", ""), r["status"], str(r.get("examples", "")), str(r.get("steps", "")),
            f"{val:.4f}" if val is not None else "", f"{r['tokens_per_second']:,.0f}" if "tokens_per_second" in r
            else "", f"{r['padding_share']:.1%}" if "padding_share" in r else "",
            r.get("path") or r.get("reason") or r.get("checkpoints", ""),
        )
    console.print(table)
    for r in result.adapters:
        if r.get("prompts_cut"):
            console.print(f"{r['cluster']}: {r['prompts_cut']} prompt(s) lost old history to fit; "
                          f"{r.get('too_long', 0)} call(s) too long even then were left out")
        if r.get("prefix_tokens_saved"):
            console.print(f"{r['cluster']}: static prompt pruning saved {r['prefix_tokens_saved']:,} prompt tokens")
