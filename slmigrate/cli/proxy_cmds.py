"""`slmigrate collect proxy`: run the OpenAI-compatible logging proxy."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from slmigrate.cli._app import JsonOpt, StoreOpt, WorkspaceOpt, collect_app, err_console, open_workspace, print_json


@collect_app.command("proxy")
def proxy(
    upstream: Annotated[str, typer.Option("--upstream", help="Base URL the agent used before, e.g. "
                                          "https://api.openai.com/v1 (a bare host gets /v1).")],
    host: Annotated[str, typer.Option(help="Address to listen on. Keep 127.0.0.1 unless agents are remote.")]
    = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8787,
    agent: Annotated[Optional[str], typer.Option(
        help="Agent tag for calls without an X-Slmigrate-Agent header or /agent/NAME/ prefix.")] = None,
    keep_origin: Annotated[bool, typer.Option(
        "--keep-origin", help="Also store the client address, the request's user/safety_identifier and "
        "identity headers (off by default: origins are anonymised).")] = False,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the upstream before answering 504.")]
    = 600.0,
    flush_interval: Annotated[float, typer.Option(
        help="Seconds between store commits (at most 0.2); a hard kill loses at most about this much.")] = 0.1,
    workspace: WorkspaceOpt = None,
    store: StoreOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Run an OpenAI-compatible proxy that logs every chat completion to the workspace.

    Point the agent's base_url at http://HOST:PORT/v1 (or /agent/NAME/v1 to tag it). Stops on Ctrl-C or
    SIGTERM after writing every pending record. Health and Prometheus metrics: /slmigrate/health,
    /slmigrate/metrics (Bearer $SLMIGRATE_ADMIN_TOKEN when set).

    Example: slmigrate collect proxy --upstream https://api.openai.com/v1 --port 8787 --agent support-bot
    Example (many proxies, one database): slmigrate collect proxy --upstream URL --store postgresql://slm@db/calls
    """
    from slmigrate.config import load_config
    from slmigrate.collect.proxy import serve

    ws = open_workspace(workspace, store=store)
    if agent is None:
        agent = load_config().collect.agent  # [collect] agent in ./slmigrate.toml

    def ready(settings) -> None:
        err_console.print(
            f"slmigrate proxy on http://{host}:{port}/v1 -> {settings.upstream_display}, logging to {ws.store.display} "
            f"({'origins kept' if keep_origin else 'origins anonymised'}). Ctrl-C to stop."
        )

    stats = serve(upstream=upstream, workspace=ws, host=host, port=port, agent=agent, keep_origin=keep_origin,
                  timeout=timeout, flush_interval=flush_interval, on_ready=ready)
    if json_out:
        print_json(stats)
    else:
        err_console.print(capture_summary(stats))


def capture_summary(stats: dict) -> str:
    """The closing line of the proxy and the router: what the writer did with the calls it captured."""
    kept = (f", {stats['deadlettered']:,} in the dead-letter file {stats['deadletter_file']}"
            if stats.get("deadlettered") else "")
    return f"Stopped: {stats['logged']:,} calls logged{kept}, {stats['dropped']:,} dropped."
