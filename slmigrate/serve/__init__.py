"""`slmigrate serve`: the router between the agent, its small models and the upstream LLM (paper step S6).

``build_app`` assembles the pieces - deployments (migrated clusters with adapters), the SLM engine, the cluster
assigner, the proxy application that handles and logs everything the SLM does not answer - so tests can run
the same application in-process; ``serve`` runs it under uvicorn until SIGTERM/SIGINT and drains the log.
"""

from __future__ import annotations

from typing import Any

from slmigrate.serve.deployment import Deployment, load_deployments
from slmigrate.serve.router import RouterSettings
from slmigrate.workspace import Workspace

__all__ = ["Deployment", "RouterSettings", "build_app", "load_deployments", "serve"]


def agreement_score(kind: str, prediction: dict[str, Any], reference: dict[str, Any],
                    request: dict[str, Any]) -> float:
    """Shadow agreement: the cluster kind's primary evaluation metric on one (SLM, LLM) answer pair."""
    from slmigrate.evaluate import metrics as M

    metric = M.primary_metric(kind if kind in M.KINDS else "text")
    scores = M.score(kind if kind in M.KINDS else "text", [prediction], [reference],
                     M.MetricContext(requests=[request]), only=[metric])
    value = scores.means.get(metric)
    return float(value) if value is not None else 0.0


def build_app(ws: Workspace, settings: RouterSettings, *, device: str = "auto", writer: Any = None,
              engine: Any = None, assign: Any = None):
    """The router ASGI app and its ``Router`` (for tests and embedding)."""
    from slmigrate.collect import deadletter
    from slmigrate.collect.proxy.app import ProxySettings, create_app
    from slmigrate.serve.app import RouterApp
    from slmigrate.serve.engine import SlmEngine
    from slmigrate.serve.router import Router
    from slmigrate.collect.writer import RecordWriter

    if writer is None:
        writer = RecordWriter(ws.store.opener(), name="slmigrate-router-writer",
                              deadletter_path=ws.path(deadletter.FILE_NAME))
    if engine is None:
        engine = SlmEngine(load_deployments(ws), device=device)
    if assign is None:
        from slmigrate.serve.assign import request_assigner

        assign = request_assigner(ws)
    proxy = create_app(ProxySettings(upstream=settings.upstream, agent=settings.agent, source="router",
                                     keep_origin=settings.keep_origin, admin_token=settings.admin_token), writer)
    if settings.shadow_log is None:
        settings.shadow_log = ws.path("serve", "shadow.jsonl")
        settings.shadow_log.parent.mkdir(parents=True, exist_ok=True)
    router = Router(settings, engine, assign, writer, agreement=agreement_score)
    return RouterApp(router, proxy), router


def serve(ws: Workspace, settings: RouterSettings, *, host: str = "127.0.0.1", port: int = 8788,
          device: str = "auto", on_ready: Any = None) -> dict[str, Any]:
    """Run the router until SIGTERM/SIGINT; returns the final routing counters, and the log's under "capture"."""
    from slmigrate.collect.proxy import run_server

    app, router = build_app(ws, settings, device=device)
    writer = app.proxy_app.state.writer
    try:
        run_server(app, host=host, port=port, on_ready=None if on_ready is None else (lambda: on_ready(settings)))
    finally:
        writer.close()
    return {**router.metrics.snapshot(), "capture": writer.stats()}
