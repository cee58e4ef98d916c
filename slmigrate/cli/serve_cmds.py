"""`slmigrate serve`: the router in front of the LLM."""

from __future__ import annotations

from typing import Annotated, Optional

import typer
from rich.table import Table

from slmigrate.cli._app import ConfigOpt, WorkspaceOpt, app, err_console, open_workspace


@app.command()
def serve(
    upstream: Annotated[Optional[str], typer.Option(
        "--upstream", help="The LLM's base URL, e.g. https://api.openai.com/v1 (default [serve] upstream).")] = None,
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[Optional[int], typer.Option(help="Port to listen on (default [serve] port, 8788).")] = None,
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
    guard_sample: Annotated[Optional[float], typer.Option(
        "--guard-sample", min=0, max=1, help="Share of SLM answers also checked against the LLM in the background; "
        "a task whose live agreement falls below its threshold is demoted to the LLM (default [serve] guard_sample, "
        "0.05; 0: off).")] = None,
    canary_ramp: Annotated[bool, typer.Option(
        "--canary-ramp", help="Start each migrated task at --canary percent and double its share each time the "
        "live guard's lower 95% bound, over guard_min_samples more checks, reaches the task's threshold.")] = False,
    slm_endpoint: Annotated[Optional[str], typer.Option(
        "--slm-endpoint", help="Ask an OpenAI-compatible server of the adapters (vLLM from `slmigrate export vllm`, "
        "or `serve --adapters-only`) instead of running them here, e.g. http://127.0.0.1:8000/v1 (default [serve] "
        "slm_endpoint; key: $SLMIGRATE_SLM_API_KEY).")] = None,
    adapters_only: Annotated[bool, typer.Option(
        "--adapters-only", help="Serve only the migrated adapters over /v1/chat/completions with model = LoRA module "
        "name (a CPU stand-in for vLLM; no routing, no LLM, no log); requests need $SLMIGRATE_SLM_API_KEY when "
        "set.")] = False,
    config_file: ConfigOpt = None,
    workspace: WorkspaceOpt = None,
) -> None:
    """Route an agent's chat completions: migrated tasks to their small model, everything else to the LLM.

    Point the agent's base_url at http://HOST:PORT/v1. Every call is logged to the workspace with the model that
    answered, so `slmigrate refine` learns from live traffic. Metrics: /slmigrate/metrics (Prometheus),
    /slmigrate/routes (JSON).

    Example: slmigrate serve --upstream https://api.openai.com/v1 --canary 10 --guard-sample 0.1

    Example: slmigrate serve --adapters-only --port 8000 &  slmigrate serve --upstream https://api.openai.com/v1
    --slm-endpoint http://127.0.0.1:8000/v1
    """
    from slmigrate import env
    from slmigrate.cli.proxy_cmds import capture_summary
    from slmigrate.config import load_config
    from slmigrate.errors import SlmigrateError
    from slmigrate.redact import redact_url
    from slmigrate.serve import RouterSettings, serve as run_router

    if adapters_only:
        return _serve_adapters(workspace, host, port or 8000, device)
    cfg = load_config(config_file, {"serve": {"upstream": upstream, "port": port, "guard_sample": guard_sample,
                                              "slm_endpoint": slm_endpoint}}).serve
    if not cfg.upstream:
        raise SlmigrateError("no upstream LLM: pass --upstream https://... or set [serve] upstream in slmigrate.toml")
    upstream, port = cfg.upstream, cfg.port
    ws = open_workspace(workspace, create=False)
    settings = RouterSettings(upstream=upstream, shadow=shadow, canary=canary, slm_timeout=slm_timeout, agent=agent,
                              keep_origin=keep_origin, admin_token=env.get(env.ADMIN_TOKEN),
                              guard_sample=cfg.guard_sample, guard_min_samples=cfg.guard_min_samples,
                              canary_ramp=canary_ramp, slm_endpoint=cfg.slm_endpoint)
    if canary_ramp and (shadow or cfg.guard_sample <= 0):
        raise SlmigrateError("--canary-ramp grows a task's share on the live guard's evidence: it needs "
                             "--guard-sample above 0 and no --shadow")

    def ready(_settings) -> None:
        mode = "shadow" if shadow else f"canary {canary:g}%" + (" ramping" if canary_ramp else "")
        if not shadow and cfg.guard_sample > 0:
            mode += f", live guard on {cfg.guard_sample:.0%} of SLM answers"
        if cfg.slm_endpoint:
            mode += f", small models at {redact_url(cfg.slm_endpoint)}"
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
    demoted = {cid: t for cid, t in ((final.get("guard") or {}).get("tasks") or {}).items() if t["demoted"]}
    for cid, t in demoted.items():
        err_console.print(f"[yellow]demoted by the live guard[/]: {cid}: {t['reason']}")
    err_console.print(capture_summary(final["capture"]))


def _serve_adapters(workspace, host: str, port: int, device: str) -> None:
    """`serve --adapters-only`: one line per answer, so whoever runs it sees what it served."""
    from slmigrate import env
    from slmigrate.serve.adapter_server import serve_adapters

    ws = open_workspace(workspace, create=False)

    def ready(names: list[str]) -> None:
        err_console.print(f"slmigrate adapters on http://{host}:{port}/v1 (models: {', '.join(names)}); "
                          "Ctrl-C to stop")

    def answered(model: str, answer) -> None:
        err_console.print(f"answered model={model} tokens={answer.prompt_tokens}+{answer.completion_tokens} "
                          f"in {answer.latency_ms:.0f} ms", highlight=False)

    serve_adapters(ws, host=host, port=port, device=device, api_key=env.get(env.SLM_API_KEY), on_ready=ready,
                   on_answer=answered)
