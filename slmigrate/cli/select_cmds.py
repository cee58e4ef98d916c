"""`slmigrate select`: candidate small models per cluster."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from slmigrate import artifacts
from slmigrate.cli._app import JsonOpt, WorkspaceOpt, app, console, open_workspace, print_json
from slmigrate.errors import SlmigrateError


def _count(text: str | None) -> float | None:
    """'3B', '500M', '3e9' or '3000000000' -> parameters."""
    if text is None:
        return None
    t = text.strip().upper().replace("_", "").replace(",", "")
    scale = {"K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9}.get(t[-1:], 1.0)
    try:
        value = float(t[:-1] if t[-1:] in "KMBG" else t) * scale
    except ValueError as exc:
        raise SlmigrateError(f"--max-params {text!r}: expected a count such as 3B, 500M or 3e9") from exc
    if value <= 0:
        raise SlmigrateError(f"--max-params {text!r}: expected a positive count")
    return value



# Where a candidate's weights are, as the ranking shows it: finetune can only train what is here or downloadable.
WEIGHTS_TEXT = {"local": " [green]local[/]", "builtin": " [green]built in[/]", "hub": " [dim]downloads[/]",
                None: " [yellow]needs download[/]"}

@app.command()
def select(
    gpu_memory: Annotated[Optional[float], typer.Option(
        "--gpu-memory", help="GB of GPU memory for training and serving (LoRA bf16, else QLoRA 4-bit).")] = None,
    cpu_only: Annotated[Optional[bool], typer.Option(
        "--cpu-only", help="Plan for CPU only: LoRA in fp32 in host RAM (--cpu-memory, default 24 GB).")] = None,
    cpu_memory: Annotated[Optional[float], typer.Option(help="GB of host RAM for --cpu-only.")] = None,
    license: Annotated[Optional[str], typer.Option(
        "--license", help="permissive (default), commercial, any, or comma-separated SPDX ids.")] = None,
    max_params: Annotated[Optional[str], typer.Option(help="Largest model to consider, e.g. 3B or 500M.")] = None,
    top: Annotated[Optional[int], typer.Option(help="Candidates kept per cluster.", min=1)] = None,
    probe: Annotated[Optional[int], typer.Option(
        help="Run candidates whose weights are local on N validation calls per cluster (zero- and few-shot) "
             "and blend the measured score into the ranking.", min=0)] = None,
    force: Annotated[bool, typer.Option(
        help="Re-run even when clusters, catalogue and options are unchanged.")] = False,
    config_file: Annotated[Optional[Path], typer.Option("--config", help="slmigrate.toml to read.")] = None,
    workspace: WorkspaceOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Per cluster, rank catalogue models that fit the task's context, the hardware (training and serving) and
    the licence policy, with a one-line reason for every choice and every rejection. Saves selection.json for
    finetune.

    Example: slmigrate select --cpu-only --license permissive --top 3
    """
    from slmigrate.config import load_config
    from slmigrate.selection.run import select as run_select

    cfg = load_config(config_file, {"select": {
        "gpu_memory_gb": gpu_memory, "cpu_only": cpu_only, "cpu_memory_gb": cpu_memory, "license": license,
        "max_params": _count(max_params), "top": top, "probe": probe}})
    ws = open_workspace(workspace, create=False)
    if cfg.select.probe and not json_out:
        from slmigrate.cli._app import err_console

        with err_console.status(f"probing local candidates on {cfg.select.probe} calls per cluster"):
            result = run_select(ws, cfg.select, force=force)
    else:
        result = run_select(ws, cfg.select, force=force)
    if json_out:
        print_json(result.to_dict())
        return
    hw = result.hardware
    console.print(f"Hardware: {hw['memory_gib']:g} GiB {'GPU' if hw['device'] == 'cuda' else 'CPU'} "
                  f"({hw['policy']}); licences: {result.license_policy}"
                  + (" [dim](unchanged since the last run)[/]" if result.fresh else ""))
    if result.probe:
        console.print(f"Probe: {result.probe}")
    for c in result.clusters:
        title = (f"cluster {c['cluster']} {c.get('label') or ''} - {c['output_kind']}, {c.get('size') or '?'} "
                 f"calls, {c['seq_len']:,} tokens p95")
        console.print(f"[bold]{title}[/]")
        for r in c["candidates"]:
            where = WEIGHTS_TEXT.get(r.get("weights"), "")
            console.print(f"  {r['rank']}. [bold]{r['name']}[/] ({r['method']}, train {r['train_memory_gib']:.1f} "
                          f"GiB, score {r['score']:.1f}){where}: {r['reason']}", highlight=False)
        if c.get("choice"):
            console.print(f"  -> trains [bold]{c['choice']}[/] ({c['choice_reason']})", highlight=False)
        if not c["candidates"]:
            console.print(f"  [yellow]no candidate[/]: {c['note']}")
        for rej in c["rejected"]:
            console.print(f"  [dim]rejected {rej['name']}: {rej['reason']}[/]")
    console.print(f"Saved {artifacts.path(ws, artifacts.SELECTION)}", style="dim")
