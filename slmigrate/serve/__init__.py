"""`slmigrate serve`: the router between the agent, its small models and the upstream LLM (paper step S6).

``build_app`` assembles the pieces - deployments (migrated clusters with adapters), the SLM engine (in this
process, or ``--slm-endpoint``: an OpenAI-compatible server of the adapters such as vLLM), the cluster
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
                    request: dict[str, Any], metric: str | None = None) -> float | None:
    """Agreement of one (SLM, LLM) answer pair, for shadow mode and the live guard: ``metric`` (the one the
    task was evaluated on) or else the kind's primary metric; None when the metric cannot score the pair here
    (one that needs an embedder or a judge)."""
    from slmigrate.evaluate import metrics as M

    kind = kind if kind in M.KINDS else "text"
    if metric is None or metric not in M.metrics_for(kind):
        metric = M.primary_metric(kind)
    scores = M.score(kind, [prediction], [reference], M.MetricContext(requests=[request]), only=[metric])
    value = scores.means.get(metric)
    return float(value) if value is not None else None


def build_app(ws: Workspace, settings: RouterSettings, *, device: str = "auto", writer: Any = None,
              engine: Any = None, assign: Any = None, pseudonymiser: Any = "workspace"):
    """The router ASGI app and its ``Router`` (for tests and embedding). ``pseudonymiser``: "workspace" scrubs
    what the small model is asked the way the workspace's curate stage scrubbed its training data
    (``serve/pseudonym.py``; nothing when curate ran with ``pii = "off"``), None never, or a ``Pseudonymiser``."""
    from slmigrate.collect import deadletter
    from slmigrate.collect.proxy.app import ProxySettings, create_app
    from slmigrate.serve.app import RouterApp
    from slmigrate.serve.engine import SlmEngine
    from slmigrate.serve.router import Router
    from slmigrate.collect.writer import RecordWriter

    if writer is None:
        writer = RecordWriter(ws.store.opener(), name="slmigrate-router-writer",
                              deadletter_path=ws.path(deadletter.FILE_NAME))
    if engine is None and settings.slm_endpoint:
        from slmigrate.serve.endpoint import EndpointEngine

        engine = EndpointEngine(load_deployments(ws), settings.slm_endpoint, timeout=settings.slm_timeout)
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
    guard = None
    if settings.guard_sample > 0 and not settings.shadow and engine.deployments:
        from slmigrate.serve.guard import Guard

        guard = Guard(ws, engine.deployments, sample=settings.guard_sample, min_samples=settings.guard_min_samples)
    if isinstance(pseudonymiser, str):
        pseudonymiser = None
        if engine.deployments:
            from slmigrate.serve.pseudonym import Pseudonymiser

            pseudonymiser = Pseudonymiser.for_workspace(ws)
            if pseudonymiser is not None:
                pseudonymiser.warm()  # presidio and spaCy load here, not on the first request
    router = Router(settings, engine, assign, writer, agreement=agreement_score, guard=guard,
                    pseudonymiser=pseudonymiser)
    if guard is not None and settings.canary_ramp:
        guard.ramp(router.canary, settings.canary)
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
        if hasattr(router.engine, "close"):  # the endpoint engine's connection pool
            router.engine.close()
    return {**router.snapshot(), "capture": writer.stats()}
