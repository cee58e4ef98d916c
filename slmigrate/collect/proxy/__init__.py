"""`slmigrate collect proxy`: an OpenAI-compatible logging reverse proxy.

Agents point their ``base_url`` at the proxy and keep working as before; every chat completion is captured to the
workspace (see docs/capture.md and docs/security.md). ``serve()`` runs it; ``create_app()`` (in ``.app``) builds
the ASGI application for embedding or tests. Starlette and uvicorn are imported only when the proxy runs.
"""

from __future__ import annotations

from typing import Any


def serve(
    *,
    upstream: str,
    workspace: Any,
    host: str = "127.0.0.1",
    port: int = 8787,
    agent: str | None = None,
    keep_origin: bool = False,
    timeout: float = 600.0,
    flush_interval: float = 0.1,
    graceful_timeout: float = 30.0,
    admin_token: str | None = None,
    on_ready: Any = None,
) -> dict[str, Any]:
    """Run the proxy until SIGTERM/SIGINT; drain every pending record; return the final capture counters."""
    from slmigrate import env
    from slmigrate.collect import deadletter
    from slmigrate.errors import SlmigrateError
    from slmigrate.collect.proxy.app import ProxySettings, create_app
    from slmigrate.collect.writer import RecordWriter

    settings = ProxySettings(upstream=upstream, agent=agent, keep_origin=keep_origin, timeout=timeout,
                             admin_token=admin_token if admin_token is not None else env.get(env.ADMIN_TOKEN))
    # Open once here so a bad workspace, store URL or key is reported before traffic arrives; the writer then
    # opens its own connection on its thread (to the same SQLite file or PostgreSQL database: several proxies
    # on several hosts can share one database, see docs/scaling.md).
    opener = workspace.store.opener()
    if not 0 < flush_interval <= 0.2:
        raise SlmigrateError(f"--flush-interval {flush_interval} must be between 0 and 0.2 seconds")
    writer = RecordWriter(opener, flush_interval=flush_interval, name="slmigrate-proxy-writer",
                          deadletter_path=workspace.path(deadletter.FILE_NAME))
    app = create_app(settings, writer)
    try:
        run_server(app, host=host, port=port, graceful_timeout=graceful_timeout,
                   on_ready=None if on_ready is None else (lambda: on_ready(settings)))
    finally:
        writer.close()  # idempotent; covers a server that failed before the lifespan ran
    return writer.stats()


def run_server(app: Any, *, host: str, port: int, graceful_timeout: float = 30.0, on_ready: Any = None) -> None:
    """Serve ``app`` with uvicorn until SIGTERM/SIGINT (shared by the proxy and the router)."""
    import uvicorn

    from slmigrate.errors import SlmigrateError

    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False, lifespan="on",
                            timeout_graceful_shutdown=graceful_timeout, timeout_keep_alive=30)
    server = _server_class()(config)
    if on_ready is not None:
        _call_when_started(server, on_ready)
    try:
        server.run()
    except OSError as exc:
        raise SlmigrateError(f"cannot listen on {host}:{port}: {exc.strerror}; pick another --port") from exc


def _server_class() -> Any:
    import contextlib

    import uvicorn

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):
            # uvicorn re-raises SIGTERM/SIGINT after its graceful shutdown so the process dies of the signal. Here
            # the drained shutdown is the normal end: return, so the command prints its counters and exits 0.
            with super().capture_signals():
                yield
                captured = getattr(self, "_captured_signals", None)
                if isinstance(captured, list):
                    captured.clear()

    return Server


def _call_when_started(server: Any, callback: Any) -> None:
    import threading
    import time

    def wait() -> None:
        while not server.started and not server.should_exit:
            time.sleep(0.02)
        if server.started:
            callback()

    threading.Thread(target=wait, daemon=True).start()
