"""The logging reverse proxy as a Starlette application.

Every ``/v1/*`` request is forwarded to the upstream with one shared, pooled ``httpx.AsyncClient`` and its bytes
are relayed unchanged (streams chunk by chunk as they arrive). ``POST /v1/chat/completions`` is also captured as
an ``Exchange`` and handed to the background writer; nothing on the request path touches the store.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from slmigrate.collect.proxy.exchange import Exchange
from slmigrate.collect.proxy.metrics import Metrics
from slmigrate.redact import redact_url, redact_urls
from slmigrate.collect.writer import RecordWriter

log = logging.getLogger("slmigrate.collect.proxy")

# Hop-by-hop headers (RFC 9110 7.6.1) belong to one connection and are never relayed; host and length are
# recomputed for the next hop.
_HOP = {b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization", b"proxy-connection", b"te",
        b"trailer", b"transfer-encoding", b"upgrade", b"host", b"content-length"}
_TAG_PREFIX = b"x-slmigrate-"
_ROUTE_PREFIX = b"x-slmigrate-route-"
_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD"]


@dataclass
class ProxySettings:
    upstream: str
    agent: str | None = None
    keep_origin: bool = False
    timeout: float = 600.0
    connect_timeout: float = 10.0
    admin_token: str | None = None
    max_connections: int = 1000
    source: str = "proxy"  # "router" when `slmigrate serve` puts the proxy behind its small models

    def __post_init__(self) -> None:
        parts = urlsplit(self.upstream)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            from slmigrate.errors import SlmigrateError

            raise SlmigrateError(
                f"--upstream {redact_url(self.upstream)!r} is not an http(s) URL; pass the base URL the agent used "
                "before, e.g. https://api.openai.com/v1"
            )
        base = f"{parts.scheme}://{parts.netloc}{parts.path.rstrip('/')}"
        # The OpenAI convention puts /v1 in the base URL; a bare host means the server's /v1.
        self.upstream_base = base if parts.path.strip("/") else base + "/v1"
        # Query parameters of the upstream URL (an Azure api-version, a gateway's api_key) go on every request.
        self.upstream_query = parts.query

    @property
    def upstream_display(self) -> str:
        """The upstream as it may be shown anywhere: credentials masked (see slmigrate.redact)."""
        return redact_url(self.upstream_base + (f"?{self.upstream_query}" if self.upstream_query else ""))


def create_app(settings: ProxySettings, writer: RecordWriter) -> Starlette:
    metrics = Metrics()
    state: dict[str, Any] = {"client": None, "started": time.time()}

    @asynccontextmanager
    async def lifespan(app: Starlette):
        client = httpx.AsyncClient(
            timeout=httpx.Timeout(settings.timeout, connect=settings.connect_timeout),
            limits=httpx.Limits(max_connections=settings.max_connections,
                                max_keepalive_connections=min(settings.max_connections, 256)),
            follow_redirects=False,
        )
        # httpx adds its own Accept-Encoding/User-Agent defaults; a transparent proxy sends only what the
        # client sent, or the upstream could answer in an encoding the client never asked for.
        for name in list(client.headers.keys()):
            del client.headers[name]
        state["client"] = client
        try:
            yield
        finally:
            await client.aclose()
            # Every in-flight request has finished by now (uvicorn waits for them); drain what they queued.
            await asyncio.to_thread(writer.close)

    def authorised(request: Request) -> bool:
        if not settings.admin_token:
            return True
        given = request.headers.get("authorization", "")
        return hmac.compare_digest(given.encode(), f"Bearer {settings.admin_token}".encode())

    async def health(request: Request) -> Response:
        if not authorised(request):
            return unauthorised()
        stats = writer.stats()
        body = {"status": "ok" if stats["healthy"] else "degraded", "upstream": settings.upstream_display,
                "uptime_s": round(time.time() - state["started"], 1), "capture": stats,
                "traffic": metrics.snapshot()}
        return JSONResponse(body)

    async def prometheus(request: Request) -> Response:
        if not authorised(request):
            return unauthorised()
        return PlainTextResponse(metrics.render(writer.stats()), media_type="text/plain; version=0.0.4")

    async def forward(request: Request) -> Response:
        path = request.url.path
        agent = None
        if path.startswith("/agent/"):
            # /agent/NAME/v1/... tags the call for clients that cannot set headers.
            _, _, rest = path.partition("/agent/")
            agent, slash, tail = rest.partition("/")
            path = "/" + tail if slash else "/"
        if not (path == "/v1" or path.startswith("/v1/")):
            return _error(404, f"slmigrate proxy serves /v1/... and /agent/NAME/v1/...; got {request.url.path}",
                          "not_found")
        return await relay(request, path, agent)

    async def relay(request: Request, path: str, path_agent: str | None) -> Response:
        wall, t0 = time.time(), time.perf_counter()
        body = await request.body()
        capture = request.method == "POST" and path.rstrip("/") == "/v1/chat/completions"
        route = "chat_completions" if capture else "passthrough"
        headers: list[tuple[bytes, bytes]] = []
        tags: dict[bytes, str] = {}
        origin: dict[str, str] = {}
        for name, value in request.headers.raw:
            lname = name.lower()
            if lname in _HOP:
                continue
            if lname.startswith(_TAG_PREFIX):
                tags[lname] = value.decode("latin-1")
                continue
            if capture and lname == b"accept-encoding":
                continue  # see below
            if settings.keep_origin and capture:
                origin[lname.decode("latin-1")] = value.decode("latin-1")
            headers.append((name, value))
        if capture:
            # Chat answers are asked for uncompressed so they can be logged without decoding brotli/gzip on
            # the request path; the client still receives exactly the bytes the upstream sent.
            headers.append((b"accept-encoding", b"identity"))
        url = settings.upstream_base + path[3:]
        query = "&".join(q for q in (settings.upstream_query, request.url.query) if q)
        if query:
            url += "?" + query
        exchange = None
        if capture:
            exchange = Exchange(
                request_body=body, started_wall=wall, source=settings.source, path=path,
                agent=tags.get(b"x-slmigrate-agent") or path_agent or settings.agent,
                session=tags.get(b"x-slmigrate-session"), keep_origin=settings.keep_origin,
                client_ip=request.client.host if (settings.keep_origin and request.client) else None,
                origin_headers=origin,
                # The router's decision for this call (cluster, who answered, why), from its internal headers.
                route={k[len(_ROUTE_PREFIX):].decode("latin-1").replace("-", "_"): v for k, v in tags.items()
                       if k.startswith(_ROUTE_PREFIX)},
            )

        client: httpx.AsyncClient = state["client"]
        upstream_request = client.build_request(request.method, url, headers=headers, content=body)
        try:
            upstream = await client.send(upstream_request, stream=True)
        except httpx.TimeoutException as exc:
            return finish_failed(exchange, route, t0, 504, f"upstream timed out: {type(exc).__name__}",
                                 "upstream_timeout")
        except httpx.HTTPError as exc:
            return finish_failed(exchange, route, t0, 502, f"upstream unreachable: {type(exc).__name__}: {exc}",
                                 "upstream_unreachable")

        response_headers = [(k, v) for k, v in upstream.headers.raw if k.lower() not in _HOP]
        content_type = upstream.headers.get("content-type", "")
        status = upstream.status_code
        if exchange is not None:
            exchange.status_code = status
            exchange.content_type = content_type

        if "text/event-stream" not in content_type:
            try:
                raw = b"".join([piece async for piece in upstream.aiter_raw()])
            except httpx.HTTPError as exc:
                await upstream.aclose()
                return finish_failed(exchange, route, t0, 502, f"upstream broke off: {type(exc).__name__}",
                                     "upstream_unreachable")
            await upstream.aclose()
            elapsed = time.perf_counter() - t0
            if exchange is not None:
                exchange.pieces.append((elapsed, raw))
                exchange.elapsed = elapsed
                writer.submit(exchange)
            metrics.observe(route, elapsed, status >= 400)
            response = Response(raw, status_code=status)
            response.raw_headers = response_headers + [(b"content-length", str(len(raw)).encode())]
            return response

        async def stream():
            failed = status >= 400
            try:
                async for piece in upstream.aiter_raw():
                    if exchange is not None:
                        exchange.pieces.append((time.perf_counter() - t0, piece))
                    yield piece
            except httpx.HTTPError as exc:
                failed = True
                if exchange is not None:
                    exchange.transport_error = f"upstream stream broke off: {type(exc).__name__}"
                # Abort our response too (no closing chunk), so the client sees the break as it happened.
                raise
            except BaseException:
                # The client went away (cancellation): still log what was relayed, as a failed call.
                failed = True
                if exchange is not None and exchange.transport_error is None:
                    exchange.transport_error = "client disconnected before the stream ended"
                raise
            finally:
                await upstream.aclose()
                elapsed = time.perf_counter() - t0
                if exchange is not None:
                    exchange.elapsed = elapsed
                    writer.submit(exchange)
                metrics.observe(route, elapsed, failed)

        response = StreamingResponse(stream(), status_code=status)
        response.raw_headers = response_headers
        return response

    def finish_failed(exchange: Exchange | None, route: str, t0: float, code: int, message: str,
                      kind: str) -> Response:
        elapsed = time.perf_counter() - t0
        message = redact_urls(message)  # httpx may name the URL, credentials and all
        if exchange is not None:
            exchange.status_code = code
            exchange.transport_error = message
            exchange.elapsed = elapsed
            writer.submit(exchange)
        metrics.observe(route, elapsed, True)
        log.warning("%s", message)
        return _error(code, message, kind)

    routes = [
        Route("/slmigrate/health", health, methods=["GET"]),
        Route("/slmigrate/metrics", prometheus, methods=["GET"]),
        Route("/{path:path}", forward, methods=_METHODS),
    ]
    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.metrics = metrics
    app.state.writer = writer
    app.state.authorised = authorised  # the router's own admin endpoints use the same check
    return app


def unauthorised() -> Response:
    return _error(401, "admin token required: send Authorization: Bearer $SLMIGRATE_ADMIN_TOKEN", "unauthorized")


def _error(status: int, message: str, kind: str) -> Response:
    """An OpenAI-style error body, so SDKs raise their usual exception types."""
    body = json.dumps({"error": {"message": message, "type": kind, "param": None, "code": kind}})
    return Response(body, status_code=status, media_type="application/json")
