"""`slmigrate serve`, `slmigrate refine` and `slmigrate export vllm|merged`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from slmigrate.cli._app import ConfigOpt, JsonOpt, WorkspaceOpt, app, console, err_console, open_workspace, print_json

export_app = typer.Typer(help="Hand the specialists to production serving (vLLM multi-LoRA, merged weights).",
                         no_args_is_help=True)
app.add_typer(export_app, name="export")


@app.command()
def serve(
    upstream: Annotated[str, typer.Option("--upstream", help="The LLM's base URL, e.g. https://api.openai.com/v1.")],
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8788,
    shadow: Annotated[bool, typer.Option("--shadow", help="Answer with the LLM; run the SLM beside it and record "
                                                          "agreement per cluster.")] = False,
    canary: Annotated[float, typer.Option("--canary", min=0, max=100, help="Percent of a migrated cluster's traffic "
                                                                            "the SLM answers.")] = 100.0,
    slm_timeout: Annotated[float, typer.Option("--slm-timeout", help="Seconds before an SLM answer is abandoned "
                                                                     "for the LLM.")] = 30.0,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    agent: Annotated[Optional[str], typer.Option(help="Agent tag for calls without one.")] = None,
    keep_origin: Annotated[bool, typer.Option("--keep-origin", help="Store client address and user ids "
                                                                    "(off: see docs/security.md).")] = False,
    workspace: WorkspaceOpt = None,
) -> None:
    """Route an agent's chat completions: migrated tasks to their small model, everything else to the LLM.

    Point the agent's base_url at http://HOST:PORT/v1. Every call is logged to the workspace with the model that
    answered, so `slmigrate refine` learns from live traffic. Metrics: /slmigrate/metrics (Prometheus),
    /slmigrate/routes (JSON).

    Example: slmigrate serve --upstream https://api.openai.com/v1 --canary 10
    """
    from slmigrate import env
    from slmigrate.cli.proxy_cmds import capture_summary
    from slmigrate.redact import redact_url
    from slmigrate.serve import RouterSettings, serve as run_router

    ws = open_workspace(workspace, create=False)
    settings = RouterSettings(upstream=upstream, shadow=shadow, canary=canary, slm_timeout=slm_timeout, agent=agent,
                              keep_origin=keep_origin, admin_token=env.get(env.ADMIN_TOKEN))

    def ready(_settings) -> None:
        mode = "shadow" if shadow else f"canary {canary:g}%"
        err_console.print(f"slmigrate router on http://{host}:{port}/v1 -> {redact_url(upstream)} ({mode}); "
                          "Ctrl-C to stop")

    final = run_router(ws, settings, host=host, port=port, device=device, on_ready=ready)
    table = Table(title="routing", title_justify="left")
    for col in ("cluster", "slm", "fallback", "llm", "shadow", "agreement"):
        table.add_column(col, justify="left" if col == "cluster" else "right")
    for cid, s in final["clusters"].items():
        table.add_row(cid, str(s["routed"]), str(s["fallback"]), str(s["upstream"]), str(s["shadow"]),
                      "" if s["agreement"] is None else f"{s['agreement']:.3f}")
    err_console.print(table)
    err_console.print(capture_summary(final["capture"]))


@app.command()
def refine(
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the plan; change nothing.")] = False,
    config: ConfigOpt = None,
    workspace: WorkspaceOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Fold the calls that arrived since the last run back in: assign, detect new tasks and drift, retrain.

    Example: slmigrate refine --dry-run
    """
    from slmigrate.config import load_config
    from slmigrate.refine import refine as run_refine

    cfg = load_config(config)
    plan = run_refine(open_workspace(workspace, create=False), cfg, dry_run=dry_run)
    if json_out:
        print_json(plan)
        return
    if plan["nothing_to_do"]:
        console.print(f"Nothing to do: {plan['summary']}")
        return
    console.print(plan["summary"])
    table = Table(title="plan" + (" (dry run: nothing changed)" if dry_run else ""), title_justify="left")
    for col in ("action", "cluster", "why"):
        table.add_column(col)
    for action in plan["actions"]:
        table.add_row(action["action"], str(action.get("cluster") or ""), action["why"])
    console.print(table)


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
    from slmigrate.export import export_vllm as run

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
    from slmigrate.export import export_merged as run

    result = run(open_workspace(workspace, create=False), cluster, out)
    if json_out:
        print_json(result)
    else:
        console.print(f"merged {cluster} ({result['parameters']:,} parameters) into {result['path']}")
