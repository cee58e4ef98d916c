"""`slmigrate.collect.capture.instrument()`: log every chat completion an ``openai`` client makes.

    client = instrument(openai.OpenAI(), agent="support-bot", workspace="./.slmigrate")

The wrapper sits in the client's HTTP transport, below the SDK, so everything the SDK builds on top - sync and
async calls, ``stream=True`` iteration, ``with ... as stream``, ``.parse()``, the ``.stream()`` helper,
``with_raw_response``, retries - is untouched: the caller receives exactly what it would without slmigrate. Each
HTTP exchange with ``.../chat/completions`` becomes one record (source ``"sdk"``), written by the same background
writer the proxy uses. Per-call tags: ``extra_headers={"X-Slmigrate-Session": "run-42"}`` (the header is removed
before the request leaves).
"""

from __future__ import annotations

import importlib
import time
from typing import Any

from slmigrate.collect import deadletter
from slmigrate.errors import SlmigrateError
from slmigrate.collect.proxy.exchange import Exchange
from slmigrate.collect.writer import RecordWriter, shared_writer

_TAG = "x-slmigrate-"


def instrument(client: Any, *, agent: str | None = None, workspace: Any = None, session: str | None = None) -> Any:
    """Wrap an ``openai.OpenAI`` / ``openai.AsyncOpenAI`` client in place and return it.

    ``workspace`` is a ``Workspace``, a folder, or None for ``$SLMIGRATE_WORKSPACE`` / ``./.slmigrate``.
    Calling it again on the same client only changes the tags and the workspace.
    """
    http = getattr(client, "_client", None)
    if http is None or not hasattr(http, "_transport"):
        raise SlmigrateError(
            f"instrument() expects an openai.OpenAI or openai.AsyncOpenAI client, got {type(client).__name__}; "
            "pass the client object itself (or point its base_url at `slmigrate collect proxy`)"
        )
    ws = _workspace(workspace)
    writer = shared_writer(ws.store.path, ws.path(deadletter.FILE_NAME))
    tags = {"agent": agent, "session": session}
    http._transport = _wrap(http._transport, writer, tags)
    mounts = getattr(http, "_mounts", None)
    if isinstance(mounts, dict):  # proxies configured from the environment route through these instead
        for pattern, transport in list(mounts.items()):
            if transport is not None:
                mounts[pattern] = _wrap(transport, writer, tags)
    return client


def flush(timeout: float = 10.0) -> bool:
    """Wait until every call captured so far in this process is in its store (True) or the timeout passed."""
    from slmigrate.collect import writer as writer_module

    return all(w.flush(timeout) for w in list(writer_module._shared.values()))


def _workspace(workspace: Any) -> Any:
    from slmigrate.workspace import Workspace

    return workspace if isinstance(workspace, Workspace) else Workspace.open(workspace)


def _wrap(transport: Any, writer: RecordWriter, tags: dict[str, Any]) -> Any:
    if getattr(transport, "_slmigrate_inner", None) is not None:
        transport._writer, transport._tags = writer, tags
        return transport
    is_async = hasattr(transport, "handle_async_request")
    cls = _classes(type(transport).__module__.split(".")[0])["async" if is_async else "sync"]
    return cls(transport, writer, tags)


def _is_chat(request: Any) -> bool:
    return request.method == "POST" and request.url.path.rstrip("/").endswith("/chat/completions")


def _begin(request: Any, body: bytes, tags: dict[str, Any]) -> tuple[Exchange, float]:
    per_call = {}
    for name in [n for n in request.headers.keys() if n.lower().startswith(_TAG)]:
        per_call[name.lower()[len(_TAG):]] = request.headers[name]
        del request.headers[name]
    # Uncompressed, so the captured bytes need no decoding; the SDK decodes either way.
    request.headers["accept-encoding"] = "identity"
    exchange = Exchange(
        request_body=body, started_wall=time.time(), source="sdk", path=request.url.path,
        agent=per_call.get("agent") or tags.get("agent"), session=per_call.get("session") or tags.get("session"),
    )
    return exchange, time.perf_counter()


_CLASSES: dict[str, dict[str, type]] = {}


def _classes(module_name: str) -> dict[str, type]:
    """Transport and stream wrappers built on the HTTP library the client uses (httpx or a fork of it), since
    its ``Response`` only accepts its own stream base classes."""
    if module_name in _CLASSES:
        return _CLASSES[module_name]
    lib = importlib.import_module(module_name)

    class SyncTee(lib.SyncByteStream):
        def __init__(self, inner: Any, exchange: Exchange, t0: float, writer: RecordWriter):
            self._inner, self._exchange, self._t0, self._writer, self._done = inner, exchange, t0, writer, False

        def __iter__(self):
            try:
                for piece in self._inner:
                    self._exchange.pieces.append((time.perf_counter() - self._t0, piece))
                    yield piece
            except Exception as exc:
                self._exchange.transport_error = f"response broke off: {type(exc).__name__}"
                raise

        def close(self) -> None:
            try:
                self._inner.close()
            finally:
                self._finish()

        def _finish(self) -> None:
            if not self._done:
                self._done = True
                self._exchange.elapsed = time.perf_counter() - self._t0
                self._writer.submit(self._exchange)

    class AsyncTee(lib.AsyncByteStream):
        def __init__(self, inner: Any, exchange: Exchange, t0: float, writer: RecordWriter):
            self._inner, self._exchange, self._t0, self._writer, self._done = inner, exchange, t0, writer, False

        async def __aiter__(self):
            try:
                async for piece in self._inner:
                    self._exchange.pieces.append((time.perf_counter() - self._t0, piece))
                    yield piece
            except Exception as exc:
                self._exchange.transport_error = f"response broke off: {type(exc).__name__}"
                raise

        async def aclose(self) -> None:
            try:
                await self._inner.aclose()
            finally:
                if not self._done:
                    self._done = True
                    self._exchange.elapsed = time.perf_counter() - self._t0
                    self._writer.submit(self._exchange)

    class SyncTransport(lib.BaseTransport):
        def __init__(self, inner: Any, writer: RecordWriter, tags: dict[str, Any]):
            self._slmigrate_inner, self._writer, self._tags = inner, writer, tags

        def handle_request(self, request: Any) -> Any:
            if not _is_chat(request):
                return self._slmigrate_inner.handle_request(request)
            exchange, t0 = _begin(request, request.read(), self._tags)
            try:
                response = self._slmigrate_inner.handle_request(request)
            except Exception as exc:
                _failed(exchange, t0, exc, self._writer)
                raise
            exchange.status_code = response.status_code
            exchange.content_type = response.headers.get("content-type", "")
            response.stream = SyncTee(response.stream, exchange, t0, self._writer)
            return response

        def close(self) -> None:
            self._slmigrate_inner.close()

    class AsyncTransport(lib.AsyncBaseTransport):
        def __init__(self, inner: Any, writer: RecordWriter, tags: dict[str, Any]):
            self._slmigrate_inner, self._writer, self._tags = inner, writer, tags

        async def handle_async_request(self, request: Any) -> Any:
            if not _is_chat(request):
                return await self._slmigrate_inner.handle_async_request(request)
            exchange, t0 = _begin(request, await request.aread(), self._tags)
            try:
                response = await self._slmigrate_inner.handle_async_request(request)
            except Exception as exc:
                _failed(exchange, t0, exc, self._writer)
                raise
            exchange.status_code = response.status_code
            exchange.content_type = response.headers.get("content-type", "")
            response.stream = AsyncTee(response.stream, exchange, t0, self._writer)
            return response

        async def aclose(self) -> None:
            await self._slmigrate_inner.aclose()

    _CLASSES[module_name] = {"sync": SyncTransport, "async": AsyncTransport}
    return _CLASSES[module_name]


def _failed(exchange: Exchange, t0: float, exc: Exception, writer: RecordWriter) -> None:
    kind = type(exc).__name__
    exchange.status_code = 504 if "Timeout" in kind else 502
    exchange.transport_error = f"upstream unreachable: {kind}"
    exchange.elapsed = time.perf_counter() - t0
    writer.submit(exchange)
