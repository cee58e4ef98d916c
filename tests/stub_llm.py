"""A deterministic OpenAI-compatible LLM server for tests and benchmarks (loopback only).

    with StubLLM() as stub:                      # a real HTTP server on 127.0.0.1, random port, own thread
        client = openai.OpenAI(base_url=stub.url, api_key="test")
        client.chat.completions.create(model="stub", messages=[...])

Answers are a pure function of the request (``expected_completion(request)``), so a test can check every answer
it gets, directly or through a proxy:
- a plain user message is answered ``"Echo: <last user text>"``;
- with ``tools``, a user message is answered with one call of the first tool, arguments
  ``{"query": <last user text>}``; a ``tool`` message is answered ``"Tool said: <tool content>"``;
- ``stream: true`` sends the same answer as ``chat.completion.chunk`` events (text word by word, tool-call
  arguments in three fragments, a usage chunk when ``stream_options.include_usage``), then ``[DONE]``.
Failures on request, by model name: ``stub-error-<status>`` answers that HTTP status with an OpenAI error body;
``stub-slow-<ms>`` waits first; ``stub-cut`` breaks a stream off after the first chunk.
Poison, for the capture's robustness tests (the answer still reaches the client, as from a misbehaving server):
``stub-poison-usage`` answers with ``usage.prompt_tokens = 10**20``; ``stub-broken-json`` answers 200 with
truncated JSON, ``stub-broken-html`` with an HTML page, ``stub-broken-sse`` (streamed) with a garbage event in
the middle of a good stream; ``stub-poison-deep`` answers 200 with JSON nested deeper than Python parses. A
request body the stub cannot parse (nested too deeply) is answered like ``{"messages": []}``.
``StubLLM(answer=fn)`` answers a request with ``fn(request)`` instead, where that is not None: the assistant's
text (an upstream with its own answers: the teacher's labels, or a label no model produces) or a whole
``chat.completion`` (a generated log's recorded teacher answer).
``/v1/models`` and ``/v1/embeddings`` answer too. ``stub.requests`` lists what arrived (path, query, headers,
body).

Run alone (for benchmarks): ``python tests/stub_llm.py --port 9000``.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

CREATED = 1_700_000_000
DEEP = 5000  # nesting levels: beyond Python's default recursion limit of 1000


def _last(messages: list[dict[str, Any]], role: str) -> dict[str, Any] | None:
    for message in reversed(messages):
        if message.get("role") == role:
            return message
    return None


def _text(message: dict[str, Any] | None) -> str:
    if not message:
        return ""
    content = message.get("content")
    if isinstance(content, list):  # content parts
        return " ".join(p.get("text", "") for p in content if isinstance(p, dict))
    return content or ""


def _words(text: str) -> int:
    return len(text.split())


# a request -> the text to answer it with, a whole chat.completion (a recorded teacher answer), or None
Answer = Callable[[dict[str, Any]], "str | dict[str, Any] | None"]


def expected_completion(request: dict[str, Any], answer: Answer | None = None) -> dict[str, Any]:
    """The ``chat.completion`` the stub answers ``request`` with."""
    messages = request.get("messages") or []
    digest = hashlib.sha1(json.dumps(request, sort_keys=True).encode()).hexdigest()
    last = messages[-1] if messages else {}
    message: dict[str, Any] = {"role": "assistant", "content": None}
    own = answer(request) if answer is not None else None
    if isinstance(own, dict):
        return own
    if own is not None:
        message["content"] = own
        finish, completion_tokens = "stop", _words(own)
    elif request.get("tools") and last.get("role") == "user":
        name = request["tools"][0]["function"]["name"]
        arguments = json.dumps({"query": _text(last)})
        message["tool_calls"] = [{"id": "call_" + digest[:12], "type": "function",
                                  "function": {"name": name, "arguments": arguments}}]
        finish, completion_tokens = "tool_calls", max(1, len(arguments) // 4)
    elif last.get("role") == "tool":
        message["content"] = "Tool said: " + _text(last)
        finish, completion_tokens = "stop", _words(message["content"])
    else:
        message["content"] = "Echo: " + _text(_last(messages, "user"))
        finish, completion_tokens = "stop", _words(message["content"])
    prompt_tokens = sum(_words(_text(m)) for m in messages)
    return {
        "id": "chatcmpl-" + digest[:16], "object": "chat.completion", "created": CREATED,
        "model": request.get("model", "stub"),
        "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish}],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens},
    }


def stream_chunks(request: dict[str, Any], answer: Answer | None = None) -> list[dict[str, Any]]:
    """The ``chat.completion.chunk`` objects of the streamed form of ``expected_completion(request, answer)``."""
    done = expected_completion(request, answer)
    base = {"id": done["id"], "object": "chat.completion.chunk", "created": CREATED, "model": done["model"]}
    message = done["choices"][0]["message"]

    def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {**base, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}

    out = [chunk({"role": "assistant", "content": ""})]
    if message.get("content"):
        words = message["content"].split(" ")
        out += [chunk({"content": w if i == 0 else " " + w}) for i, w in enumerate(words)]
    for index, call in enumerate(message.get("tool_calls") or []):
        out.append(chunk({"tool_calls": [{"index": index, "id": call["id"], "type": "function",
                                          "function": {"name": call["function"]["name"], "arguments": ""}}]}))
        args = call["function"]["arguments"]
        step = max(1, len(args) // 3 + 1)
        for start in range(0, len(args), step):
            out.append(chunk({"tool_calls": [{"index": index, "function": {"arguments": args[start:start + step]}}]}))
    out.append(chunk({}, done["choices"][0]["finish_reason"]))
    if (request.get("stream_options") or {}).get("include_usage"):
        out.append({**base, "choices": [], "usage": done["usage"]})
    return out


def _sse(chunks: list[dict[str, Any]]) -> list[bytes]:
    return [f"data: {json.dumps(c)}\n\n".encode() for c in chunks] + [b"data: [DONE]\n\n"]


def error_body(status: int) -> dict[str, Any]:
    kind = {400: "invalid_request_error", 401: "authentication_error", 429: "rate_limit_exceeded"}.get(
        status, "server_error")
    return {"error": {"message": f"stub error {status} on request", "type": kind, "param": None, "code": kind}}


def _poison(model: str, body: dict[str, Any]):
    """The answer of a poison model (see the module docstring), or None for every other model."""
    from starlette.responses import Response

    if model == "stub-poison-usage":
        done = expected_completion(body)
        done["usage"]["prompt_tokens"] = 10**20
        return Response(json.dumps(done), media_type="application/json")
    if model == "stub-broken-json":
        return Response(json.dumps(expected_completion(body))[:40], media_type="application/json")
    if model == "stub-broken-html":
        return Response("<html><body><h1>502 Bad Gateway</h1></body></html>", media_type="text/html")
    if model == "stub-poison-deep":
        return Response('{"choices": ' + "[" * DEEP + "]" * DEEP + "}", media_type="application/json")
    return None


def create_stub_app(requests_log: list[dict[str, Any]] | None = None, answer: Answer | None = None):
    from starlette.applications import Starlette
    from starlette.responses import Response, StreamingResponse
    from starlette.routing import Route

    def log(request, body: Any) -> None:
        if requests_log is not None:
            requests_log.append({"path": request.url.path, "query": request.url.query,
                                 "headers": dict(request.headers), "body": body})

    async def chat(request):
        raw = await request.body()
        try:
            body = json.loads(raw)
        except RecursionError:
            body = {"model": "stub", "messages": []}
        log(request, body)
        model = str(body.get("model", ""))
        poisoned = _poison(model, body)
        if poisoned is not None:
            return poisoned
        if model.startswith("stub-slow-"):
            await asyncio.sleep(int(model.rsplit("-", 1)[1]) / 1000)
        if model.startswith("stub-error-"):
            status = int(model.rsplit("-", 1)[1])
            return Response(json.dumps(error_body(status)), status_code=status, media_type="application/json")
        if not body.get("stream"):
            return Response(json.dumps(expected_completion(body, answer)), media_type="application/json")
        events = _sse(stream_chunks(body, answer))

        if model == "stub-broken-sse":
            events.insert(2, b"data: {this is not json\n\n")

        async def gen():
            for i, event in enumerate(events):
                if model == "stub-cut" and i == 2:
                    raise ConnectionResetError("stub-cut: stream broken off on request")
                yield event

        return StreamingResponse(gen(), media_type="text/event-stream")

    async def models(request):
        log(request, None)
        return Response(json.dumps({"object": "list", "data": [
            {"id": "stub", "object": "model", "created": CREATED, "owned_by": "stub"}]}),
            media_type="application/json")

    async def embeddings(request):
        body = json.loads(await request.body())
        log(request, body)
        inputs = body.get("input")
        inputs = [inputs] if isinstance(inputs, str) else list(inputs or [])
        data = [{"object": "embedding", "index": i, "embedding": [
            b / 255 for b in hashlib.sha256(str(text).encode()).digest()[:8]]} for i, text in enumerate(inputs)]
        return Response(json.dumps({"object": "list", "data": data, "model": body.get("model"),
                                    "usage": {"prompt_tokens": 1, "total_tokens": 1}}),
                        media_type="application/json")

    return Starlette(routes=[
        Route("/v1/chat/completions", chat, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/embeddings", embeddings, methods=["POST"]),
    ])


class ServerThread:
    """Serve an ASGI app with uvicorn on 127.0.0.1 (random free port) in a background thread."""

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0):
        import uvicorn

        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((host, port))
        self.host, self.port = self._sock.getsockname()
        config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on",
                                timeout_graceful_shutdown=5)
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self._sock]}, daemon=True)

    @property
    def base(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> "ServerThread":
        self._thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("test server did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(15)
        self._sock.close()

    def __enter__(self) -> "ServerThread":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class StubLLM(ServerThread):
    """The stub LLM server; ``url`` is its OpenAI base URL (ending in /v1)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, record: bool = True, answer: Answer | None = None):
        self.requests: list[dict[str, Any]] = []
        super().__init__(create_stub_app(self.requests if record else None, answer), host, port)

    @property
    def url(self) -> str:
        return self.base + "/v1"

    def __enter__(self) -> "StubLLM":
        self.start()
        return self


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc, timeout: float = 180) -> None:
    """Wait until ``url`` answers (any status below 500) from the server process ``proc``; fail early, with its
    stderr when it was captured, if the process exits first."""
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = proc.stderr.read()[-2000:] if proc.stderr else ""
            raise RuntimeError(f"{proc.args[:4]} exited with {proc.returncode}: {tail}")
        try:
            if httpx.get(url, timeout=2).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not come up")


if __name__ == "__main__":
    import uvicorn

    parser = argparse.ArgumentParser(description="Run the stub OpenAI-compatible server.")
    parser.add_argument("--port", type=int, default=9000)
    args = parser.parse_args()
    uvicorn.run(create_stub_app(None), host="127.0.0.1", port=args.port, log_level="warning", access_log=False)


def stored_calls(writer, db, expect: int = 1, timeout: float = 10.0) -> list:
    """The calls a proxy or router has logged into ``db``, once at least ``expect`` of them are there.

    A streamed call is logged when the server's generator finishes, which can be a moment *after* the client
    has read the last chunk - so a test cannot just flush once and read; it waits for the count it expects
    (``expect=0`` reads at once, for tests that check nothing was logged).
    """
    from slmigrate.store import Store

    deadline = time.monotonic() + timeout
    while True:
        assert writer.flush(timeout)
        with Store(db) as store:
            calls = list(store.iter_calls())
        if len(calls) >= expect or time.monotonic() > deadline:
            return calls
        time.sleep(0.02)
