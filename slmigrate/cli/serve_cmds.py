"""`slmigrate serve`: the router in front of the LLM."""

from __future__ import annotations

from typing import Annotated, Optional

import typer
from rich.table import Table

from slmigrate.cli._app import WorkspaceOpt, app, err_console, open_workspace

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
