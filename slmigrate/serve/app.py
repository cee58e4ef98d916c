"""The router as an ASGI application: the SLM in front, the logging proxy behind.

Chat completions go through ``Router``; a request the SLM does not answer is replayed into the proxy
application (same bytes, plus internal ``x-slmigrate-route-*`` headers that the proxy strips and stores as
route facts), so relaying, streaming, error handling and logging of LLM answers are the proxy's, not a copy.
The live guard's check of an SLM answer takes the same path in a background task, after the client has its
answer; its LLM answer is logged too (route fact ``guard=sample``), so ``refine`` has the teacher's answers for
exactly the traffic the small model served.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

from slmigrate.serve.router import ROUTE_HEADER, Route, Router, sse_chunks

log = logging.getLogger("slmigrate.serve")


def _is_chat(scope: dict[str, Any]) -> tuple[bool, str | None]:
    path = scope.get("path", "")
    agent = None
    if path.startswith("/agent/"):
        agent, _, rest = path[len("/agent/"):].partition("/")
        path = "/" + rest
    return scope.get("method") == "POST" and path.rstrip("/") == "/v1/chat/completions", agent


class RouterApp:
    def __init__(self, router: Router, proxy_app: Any):
        self.router = router
        self.proxy_app = proxy_app
        self._background: set[asyncio.Task] = set()  # live guard checks in flight (a reference keeps them alive)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            chat, agent = _is_chat(scope)
            if chat:
                return await self.chat(scope, receive, send, agent)
            if scope["path"] in ("/slmigrate/metrics", "/slmigrate/routes"):
                return await self.admin(scope, receive, send)
        await self.proxy_app(scope, receive, send)  # lifespan, passthrough, health

    async def admin(self, scope, receive, send) -> None:
        from starlette.requests import Request
        from starlette.responses import JSONResponse, PlainTextResponse

        from slmigrate.collect.proxy.app import unauthorised

        request = Request(scope, receive)
        if not self.proxy_app.state.authorised(request):  # the proxy's check: one token for every admin endpoint
            response = unauthorised()
        elif scope["path"] == "/slmigrate/routes":
            response = JSONResponse(self.router.snapshot())
        else:
            proxy_metrics = self.proxy_app.state.metrics.render(self.proxy_app.state.writer.stats())
            guard = self.router.guard.render() if self.router.guard is not None else ""
            response = PlainTextResponse(proxy_metrics + self.router.metrics.render() + guard,
                                         media_type="text/plain; version=0.0.4")
        await response(scope, receive, send)

    async def chat(self, scope, receive, send, path_agent: str | None) -> None:
        started = time.perf_counter()
        body = await _read_body(receive)
        try:
            request = json.loads(body)
            if not isinstance(request, dict):
                raise ValueError
        except (ValueError, RecursionError):  # RecursionError: nested deeper than Python parses
            return await self.upstream(scope, receive, body, send, {})  # the upstream says what is wrong
        headers = {k.lower(): v for k, v in scope.get("headers", [])}
        agent = (headers.get(b"x-slmigrate-agent", b"").decode() or path_agent)
        session = headers.get(b"x-slmigrate-session", b"").decode() or None

        t0 = time.perf_counter()
        try:
            route = await asyncio.to_thread(self.router.route, request)
        except Exception as exc:  # noqa: BLE001 - a request the assigner cannot read still reaches the LLM
            log.warning("routing failed, sending the call to the LLM: %s: %s", type(exc).__name__, exc)
            route = Route(None, None, False, False, f"routing failed: {type(exc).__name__}")
        self.router.metrics.overhead((time.perf_counter() - t0) * 1000)
        facts = {"cluster": route.cluster or "", "reason": route.reason,
                 "distance": "" if route.distance is None else f"{route.distance:.4f}"}
        if route.use_slm:
            try:
                result, reason, answer = await asyncio.wait_for(
                    asyncio.to_thread(self.router.answer_with_slm, route, request), self.router.settings.slm_timeout)
            except asyncio.TimeoutError:
                result, reason, answer = None, f"slm timeout after {self.router.settings.slm_timeout:g}s", None
            if result is not None:
                self.router.metrics.record(route.cluster, "routed", slm_ms=answer.latency_ms)
                self.router.log_slm_call(request, result, route, answer, agent, session, started)
                await _send_completion(scope, send, result, bool(request.get("stream")))
                if self.router.guard is not None and self.router.guard.begin(route.cluster):
                    task = asyncio.get_running_loop().create_task(
                        self.guard_check(scope, request, route, result["choices"][0]["message"]))
                    self._background.add(task)
                    task.add_done_callback(self._background.discard)
                return
            self.router.metrics.record(route.cluster, "fallback", reason=reason,
                                       slm_ms=answer.latency_ms if answer else None)
            facts.update(answered_by="llm", fallback=reason or "")
        else:
            self.router.metrics.record(route.cluster, "upstream")
            facts["answered_by"] = "llm"

        if route.deployed and self.router.settings.shadow and not request.get("stream"):
            # Tee the LLM's answer, then compare the SLM's in the background; the client never waits for it.
            captured: list[bytes] = []
            status: list[int] = []

            async def tee(message):
                if message["type"] == "http.response.start":
                    status.append(message["status"])
                elif message["type"] == "http.response.body":
                    captured.append(message.get("body", b""))
                await send(message)

            await self.upstream(scope, receive, body, tee, facts)
            if status and status[0] < 400:
                try:
                    llm_response = json.loads(b"".join(captured))
                except (ValueError, RecursionError):
                    return
                asyncio.get_running_loop().run_in_executor(None, self.router.shadow_compare, route, request,
                                                           llm_response)
            return
        await self.upstream(scope, receive, body, send, facts)

    async def guard_check(self, scope, request: dict[str, Any], route: Route, slm_message: dict[str, Any]) -> None:
        """Ask the LLM the request the SLM already answered (through the proxy, so it is logged) and hand the
        pair to the live guard. Runs after the client's response is complete; never raises."""
        assert self.router.guard is not None
        try:
            # Asked whole, not streamed: the guard compares finished answers.
            body = json.dumps({k: v for k, v in request.items() if k not in ("stream", "stream_options")},
                              ensure_ascii=False).encode()
            captured: list[bytes] = []
            status: list[int] = []

            async def sink(message):
                if message["type"] == "http.response.start":
                    status.append(message["status"])
                elif message["type"] == "http.response.body":
                    captured.append(message.get("body", b""))

            async def no_disconnect():
                await asyncio.Event().wait()  # nobody is waiting on this answer, and nobody hangs up
                return {"type": "http.disconnect"}

            facts = {"cluster": route.cluster or "", "reason": "live guard sample", "answered_by": "llm",
                     "guard": "sample"}
            await self.upstream(scope, no_disconnect, body, sink, facts)
            if not status or status[0] >= 400:
                log.info("live guard: the LLM answered %s for task %s; sample not counted",
                         status[0] if status else "nothing", route.cluster)
                return
            try:
                llm_response = json.loads(b"".join(captured))
            except (ValueError, RecursionError):
                return
            await asyncio.to_thread(self.router.guard_compare, route, request, slm_message, llm_response)
        except Exception as exc:  # noqa: BLE001 - a failed check must not take the router down
            log.warning("live guard check failed for task %s: %s: %s", route.cluster, type(exc).__name__, exc)
        finally:
            self.router.guard.end()

    async def upstream(self, scope, client_receive, body: bytes, send, facts: dict[str, str]) -> None:
        """Replay the request into the proxy application, with the route facts as internal headers."""
        headers = [(k, v) for k, v in scope.get("headers", []) if not k.lower().startswith(ROUTE_HEADER)]
        headers += [(ROUTE_HEADER + k.replace("_", "-").encode(), str(v).encode("latin-1", "replace"))
                    for k, v in facts.items()]
        replayed = False

        async def receive():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await client_receive()  # the client's own disconnect still reaches the proxy

        await self.proxy_app({**scope, "headers": headers}, receive, send)


async def _read_body(receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.request":
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                return b"".join(chunks)
        elif message["type"] == "http.disconnect":
            return b"".join(chunks)


async def _send_completion(scope, send, body: dict[str, Any], stream: bool) -> None:
    if stream:
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream; charset=utf-8"),
                                (b"cache-control", b"no-cache")]})
        for piece in sse_chunks(body):
            await send({"type": "http.response.body", "body": piece, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        return
    raw = json.dumps(body, ensure_ascii=False).encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())]})
    await send({"type": "http.response.body", "body": raw, "more_body": False})
