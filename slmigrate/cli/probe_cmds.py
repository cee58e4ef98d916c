"""`slmigrate probe`: measured replaceability per task, with 95% intervals."""

from __future__ import annotations

from typing import Annotated, Optional

import typer
from rich.markup import escape
from rich.table import Table

from slmigrate.cli._app import ConfigOpt, ForceOpt, JsonOpt, WorkspaceOpt, app, console, open_workspace, print_json


@app.command("probe")
def probe_cmd(
    fewshot: Annotated[Optional[bool], typer.Option(
        "--fewshot/--no-fewshot", help="Probe the local small model few-shot on a small sample "
        "(default: [probe] fewshot_calls).", show_default=False)] = None,
    lora: Annotated[Optional[bool], typer.Option(
        "--lora/--no-lora", help="Fine-tune each task briefly in memory and score it on held-out calls, on a CPU "
        "too (minutes per task; default: [probe] lora, which runs it only with a GPU).", show_default=False)] = None,
    cluster: Annotated[Optional[list[str]], typer.Option(
        "--cluster", help="Give the LoRA probe to this task only (repeatable; default: the biggest tasks).",
        show_default=False)] = None,
    force: ForceOpt = False,
    config: ConfigOpt = None,
    workspace: WorkspaceOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Measure per task how predictable the LLM's answers are from the task's own calls: the nearest train
    call's answer, the small model few-shot, and (with a GPU, or --lora) a budgeted LoRA fine-tune, scored on
    held-out calls with the task's primary metric.

    Examples: slmigrate probe --no-fewshot
              slmigrate probe --lora --cluster c01 --cluster c04
    """
    from slmigrate.config import load_config
    from slmigrate.probe import probe

    cfg = load_config(config)
    if fewshot is False:
        cfg.probe.fewshot_calls = 0
    if lora is not None:
        cfg.probe.lora = "on" if lora else "off"
    if cluster:
        cfg.probe.lora_clusters = list(cluster)
    ws = open_workspace(workspace, create=False)
    result = probe(ws, cfg, force=force)
    if json_out:
        print_json(result.to_dict())
        return
    table = Table(title="Measured replaceability (95% intervals)" + (" - unchanged, not re-run"
                  if result.skipped else ""), title_justify="left")
    for col in ("task", "calls", "metric", "prior", "nearest neighbour", "few-shot", "LoRA", "threshold",
                "replaceable"):
        table.add_column(col, justify="left" if col in ("task", "metric") else "right", overflow="fold")
    for t in result.clusters:
        table.add_row(escape(f"{t['cluster']} {t['label'] or ''}"), f"{t['size']:,}", t["metric"],
                      "" if t["prior"] is None else f"{t['prior']:.2f}", _figure(t["neighbour"]),
                      _figure(t["fewshot"]), _figure(t["lora"]), f"{t['threshold']:.2f}",
                      "yes" if t["replaceable"] else "no")
    console.print(table)


def _figure(found: dict) -> str:
    if found.get("skipped"):
        return f"[dim]{escape(found['reason'])}[/]"
    return f"{found['score']:.2f} ({found['low']:.2f}-{found['high']:.2f}, n={found['n']})"
