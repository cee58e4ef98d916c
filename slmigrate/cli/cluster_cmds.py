"""`slmigrate cluster`: discover the agent's recurring tasks in the curated calls."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Optional

import typer
from rich.table import Table

from slmigrate import artifacts
from slmigrate.cli._app import (
    ConfigOpt, ForceOpt, JsonOpt, RayAddressOpt, WorkspaceOpt, app, console, err_console, open_workspace,
    print_json,
)

if TYPE_CHECKING:
    from slmigrate.cluster import ClusterResult


@app.command("cluster")
def cluster_cmd(
    min_size: Annotated[Optional[int], typer.Option(
        "--min-size", min=2, help="Smallest number of calls that counts as a recurring task (default 5).")] = None,
    granularity: Annotated[Optional[str], typer.Option(
        "--granularity", help="coarse (which job) or fine (which step of a job: tool called, JSON, reply).")]
    = None,
    by: Annotated[Optional[str], typer.Option(
        "--by", help="'agent': cluster each agent tag's calls separately ('none' to turn off).")] = None,
    threshold: Annotated[Optional[float], typer.Option(
        "--threshold", help="Cluster radius in the task-view space (default 0.6 coarse, 0.55 fine).")] = None,
    engine: Annotated[Optional[str], typer.Option(
        "--engine", help="local, or ray: the embedding pass as Ray Data over --workers actors "
        "(needs the ray extra of slmigrate).")] = None,
    ray_address: RayAddressOpt = None,
    workers: Annotated[Optional[int], typer.Option(
        "--workers", min=1, help="Embedding workers: processes (local; default one per core from 1,000 texts to "
        "embed, else this process) or Ray actors (ray; default every CPU).")] = None,
    force: ForceOpt = False,
    config: ConfigOpt = None,
    workspace: WorkspaceOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Cluster the curated calls into recurring tasks; show each task's size, cost, output kind and an estimate
    of how replaceable it is by a small model. Writes clusters/ (clusters.json, model, map.png). With --json and
    no clustering option it prints the current result (`stale`: the config changed since); --force re-clusters.

    Example: slmigrate cluster --granularity fine --min-size 10

    Example: slmigrate cluster --engine ray --workers 2
    """
    from slmigrate.cluster import cluster
    from slmigrate.config import load_config
    from slmigrate.errors import SlmigrateError

    if granularity not in (None, "coarse", "fine"):
        raise SlmigrateError(f"--granularity {granularity!r} is not known; use coarse or fine")
    if by not in (None, "agent", "none"):
        raise SlmigrateError(f"--by {by!r} is not known; use agent (or none)")
    cfg = load_config(config, {"cluster": {"min_size": min_size, "granularity": granularity, "by": by,
                                           "threshold": threshold, "engine": engine,
                                           "ray_address": ray_address, "workers": workers}})
    ws = open_workspace(workspace, create=False)
    options = (min_size, granularity, by, threshold)
    stored = artifacts.clusters_file(ws, required=False) if json_out and not force else None
    if stored is not None and all(o is None for o in options):
        # Asking for JSON is asking for the result: show what is there instead of clustering again (--force).
        print_json(_stored(ws, dict(stored), cfg.cluster.model_dump()))
        return
    if json_out:
        print_json(cluster(ws, cfg, force=force).to_dict())
        return
    from slmigrate.progress import Bars

    with Bars(console=err_console) as bars:
        result = cluster(ws, cfg, force=force, progress=bars)
    _print(ws, result)


def _stored(ws, result: dict, settings: dict) -> dict:
    made_with = (ws.manifest("cluster") or {}).get("config") or {}
    speed_only = {"engine", "ray_address", "workers"}  # they change how fast, never which clusters
    result["skipped"] = True
    result["stale"] = any(made_with.get(k) != v for k, v in settings.items() if k not in speed_only)
    return result


def _print(ws, result: ClusterResult) -> None:
    table = Table(title=f"{len(result.clusters)} tasks in {result.calls:,} calls"
                        + (" (unchanged, not re-run)" if result.skipped else ""), title_justify="left")
    for col in ("cluster", "label", "kind", "calls", "share", "cost $", "prompt p50/p95", "compl. p50/p95",
                "replaceable"):
        table.add_column(col, justify="left" if col in ("cluster", "label", "kind") else "right")
    for c in result.clusters:
        p, q = c["prompt_tokens"], c["completion_tokens"]
        score = f"{c['replaceability']:.2f}" + (" [green]yes[/]" if c["likely_replaceable"] else "")
        table.add_row(c["id"], c["label"][:60], c["output_kind"], f"{c['size']:,}", f"{c['share']:.1%}",
                      f"{c['cost_usd']:.2f}", f"{p['p50']}/{p['p95']}", f"{q['p50']}/{q['p95']}", score)
    u = result.unclustered
    table.add_row("-", "unclustered (one-off calls)", "", f"{u['size']:,}", f"{u['share']:.1%}",
                  f"{u['cost_usd']:.2f}", "", "", "")
    console.print(table)
    o = result.overall
    console.print(f"Likely replaceable by small models: [bold]{o['call_share']:.0%}[/] of calls, "
                  f"[bold]{o['cost_share']:.0%}[/] of cost ({len(o['replaceable_clusters'])} clusters).")
    if result.map:
        console.print(f"Map: {ws.resolve(result.map)}")
    if result.warning:
        console.print(f"[yellow]Warning:[/] {result.warning}", highlight=False)
