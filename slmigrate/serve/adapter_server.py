"""`slmigrate serve --adapters-only`: the migrated clusters' adapters behind OpenAI-compatible chat completions.

What vLLM's multi-LoRA server is for production (``slmigrate export vllm``), in one small process and on a CPU:
``POST /v1/chat/completions`` with ``model`` = a LoRA module name (``Deployment.name``, as ``export vllm`` names
them) is answered by that cluster's adapter through the router's own in-process engine (``SlmEngine``);
``GET /v1/models`` lists the names. Like vLLM it serves what it is asked - no routing, validation, fallback or
logging (that is ``slmigrate serve --slm-endpoint``'s job in front of it) - and, like vLLM, it knows nothing of
the clusters' static prompt parts: the router removes them before asking.
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any, Callable

from slmigrate.chat_format import StaticPrompt
from slmigrate.serve.deployment import load_deployments
from slmigrate.serve.engine import SlmAnswer
from slmigrate.serve.router import completion_body, sse_chunks
from slmigrate.workspace import Workspace


def _error(status: int, message: str, kind: str):
    from starlette.responses import JSONResponse

    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status_code=status)


def create_app(engine: Any, *, api_key: str | None = None,
               on_answer: Callable[[str, SlmAnswer], None] | None = None):
    """The ASGI app over ``engine`` (anything with ``deployments`` and ``answer``); ``api_key``: the bearer key
    requests must carry; ``on_answer(model, answer)`` after each answer (the CLI's request line)."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    clusters = {d.name: cluster for cluster, d in engine.deployments.items()}

    def authorised(request: Request) -> bool:
        return not api_key or request.headers.get("authorization") == f"Bearer {api_key}"

    async def models(request: Request):
        if not authorised(request):
            return _error(401, "invalid API key", "authentication_error")
        return JSONResponse({"object": "list", "data": [{"id": name, "object": "model", "owned_by": "slmigrate"}
                                                        for name in clusters]})

    async def chat(request: Request):
        if not authorised(request):
            return _error(401, "invalid API key", "authentication_error")
        try:
            body = await request.json()
            if not isinstance(body, dict):
                raise ValueError
        except (ValueError, RecursionError):
            return _error(400, "the request body is not a JSON object", "invalid_request_error")
        name = body.get("model")
        if not isinstance(name, str) or name not in clusters:
            return _error(404, f"model {name!r} is not served here; models: {', '.join(clusters) or 'none'}",
                          "not_found_error")
        answer = await asyncio.to_thread(engine.answer, clusters[name], body)
        result = completion_body(answer.message, name, answer.prompt_tokens, answer.completion_tokens,
                                 answer.finish_reason)
        if on_answer is not None:
            on_answer(name, answer)
        if body.get("stream"):
            return StreamingResponse(iter(sse_chunks(result)), media_type="text/event-stream")
        return JSONResponse(result)

    return Starlette(routes=[Route("/v1/models", models, methods=["GET"]),
                             Route("/v1/chat/completions", chat, methods=["POST"])])


def serve_adapters(ws: Workspace, *, host: str = "127.0.0.1", port: int = 8000, device: str = "auto",
                   api_key: str | None = None, on_ready: Callable[[list[str]], None] | None = None,
                   on_answer: Callable[[str, SlmAnswer], None] | None = None) -> None:
    """Serve the workspace's migrated adapters until SIGTERM/SIGINT."""
    from slmigrate.collect.proxy import run_server
    from slmigrate.errors import SlmigrateError
    from slmigrate.serve.engine import SlmEngine

    deployments = load_deployments(ws)
    if not deployments:
        raise SlmigrateError("no migrated cluster with an adapter to serve; run `slmigrate finetune` and "
                             "`slmigrate evaluate` first")
    # The router in front has already removed each cluster's static prompt parts (as it must for vLLM).
    engine = SlmEngine([dataclasses.replace(d, static=StaticPrompt()) for d in deployments], device=device)
    names = [d.name for d in deployments]
    run_server(create_app(engine, api_key=api_key, on_answer=on_answer), host=host, port=port,
               on_ready=None if on_ready is None else (lambda: on_ready(names)))
