"""The small-model side of the router when the adapters run elsewhere: an OpenAI-compatible serving engine.

``EndpointEngine`` is the second implementation of the engine interface ``Router`` uses (``deployments`` and
``answer(cluster, request) -> SlmAnswer``, as ``engine.SlmEngine``): instead of generating in this process it
asks a server that holds the migrated clusters' LoRA adapters - vLLM started from ``slmigrate export vllm``, or
``slmigrate serve --adapters-only`` - with ``model`` set to the adapter's LoRA module name (``Deployment.name``,
the name ``export vllm`` gives it). Everything around the answer stays the router's: validation, the fallback to
the LLM, the live guard and the call log. An endpoint that is down, slow, or answers garbage raises here, and
the router falls back to the LLM with the reason logged (``slm error: ConnectError``, ``... ReadTimeout``,
``... EndpointError``).
"""

from __future__ import annotations

import time
from typing import Any

import httpx

from slmigrate import env
from slmigrate.redact import redact_url
from slmigrate.serve.deployment import Deployment
from slmigrate.serve.engine import SlmAnswer


class EndpointError(Exception):
    """The endpoint answered, but not with a usable chat completion."""


class EndpointEngine:
    def __init__(self, deployments: list[Deployment], url: str, *, timeout: float = 30.0,
                 api_key: str | None = None):
        self.deployments = {d.cluster: d for d in deployments}
        self.url = url.rstrip("/")
        self.where = redact_url(self.url)  # what the call log and the messages show: never a credential
        key = api_key if api_key is not None else env.get(env.SLM_API_KEY)
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        # One pooled client for every request (the router calls from worker threads; httpx.Client is thread-safe).
        # The timeout ends the request itself: the router's own --slm-timeout only stops waiting for it.
        self._client = httpx.Client(timeout=httpx.Timeout(timeout, connect=min(timeout, 5.0)), headers=headers)

    def close(self) -> None:
        self._client.close()

    def request_body(self, cluster: str, request: dict[str, Any]) -> dict[str, Any]:
        """What the serving engine is asked: the request as the adapter was trained on it (its cluster's static
        prompt parts removed - a serving engine knows nothing of them), greedy, capped at the task's answer
        length, never streamed."""
        d = self.deployments[cluster]
        messages, tools, limit = d.prepare(request)
        body: dict[str, Any] = {"model": d.name, "messages": messages, "max_tokens": limit, "temperature": 0}
        if tools:
            body["tools"] = tools
        return body

    def answer(self, cluster: str, request: dict[str, Any]) -> SlmAnswer:
        """The cluster's specialist answer from the endpoint (blocking); raises when there is none to use."""
        from slmigrate import chat_format

        t0 = time.perf_counter()
        response = self._client.post(self.url + "/chat/completions", json=self.request_body(cluster, request))
        elapsed = (time.perf_counter() - t0) * 1000
        if response.status_code != 200:
            raise EndpointError(f"{self.where} answered HTTP {response.status_code}")
        try:
            body = response.json()
            choice = body["choices"][0]
            message = choice["message"]
            if not isinstance(message, dict):
                raise TypeError
        except (ValueError, LookupError, TypeError) as exc:
            raise EndpointError(f"{self.where} answered no chat completion") from exc
        content = message.get("content")
        text = content if isinstance(content, str) else ""
        if not message.get("tool_calls"):
            # Without a tool parser (vLLM's default) the adapter's tool calls arrive as the text it was trained to
            # write; read them back exactly as the in-process engine does.
            message = chat_format.parse_answer(text)
        usage = body.get("usage") if isinstance(body.get("usage"), dict) else {}
        kept = {"role": "assistant", "content": message.get("content")}  # not a server's extra fields
        if message.get("tool_calls"):
            kept["tool_calls"] = message["tool_calls"]
        return SlmAnswer(message=kept, text=text, prompt_tokens=int(usage.get("prompt_tokens") or 0),
                         completion_tokens=int(usage.get("completion_tokens") or 0), latency_ms=elapsed,
                         finish_reason="length" if choice.get("finish_reason") == "length" else "stop",
                         served_by=self.where)
