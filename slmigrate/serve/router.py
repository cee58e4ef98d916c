"""The router: an OpenAI-compatible server that answers migrated tasks with their small model.

It sits where the logging proxy would and *is* the logging proxy for everything it does not answer itself:
``/v1/chat/completions`` requests are assigned to a cluster; a migrated cluster (with a confident assignment,
and within the canary share) is answered by the base SLM with that cluster's adapter, after the answer passes
validation; anything else - unknown task, low confidence, invalid SLM answer, SLM error or timeout - goes to the
upstream LLM through the proxy application, unchanged for the client. Every call is logged to the same store
with which model answered, so ``refine`` learns from live traffic.

``--shadow`` answers everything with the LLM and runs the SLM beside it for migrated clusters, recording
agreement per cluster (a safe rollout). ``--canary P`` sends P% of a migrated cluster's traffic to the SLM.
``--guard-sample P`` checks a share of the SLM's answers against the LLM in the background and demotes a task
whose live agreement falls below its threshold (``serve/guard.py``).
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from slmigrate.record import CallRecord, now_iso
from slmigrate.serve.validation import validate_answer

log = logging.getLogger("slmigrate.serve")

ROUTE_HEADER = b"x-slmigrate-route-"  # route facts handed to the proxy layer, stored under metadata["route"]


@dataclass
class RouterSettings:
    upstream: str
    shadow: bool = False
    canary: float = 100.0  # percent of a migrated cluster's traffic the SLM answers
    slm_timeout: float = 30.0
    agent: str | None = None
    keep_origin: bool = False
    admin_token: str | None = None
    shadow_log: Path | None = None  # JSONL of shadow comparisons
    guard_sample: float = 0.05  # share of SLM answers the live guard also sends to the LLM (0: no guard)
    guard_min_samples: int = 20  # comparisons before the guard may demote a task
    canary_ramp: bool = False  # double a task's canary share while the guard's lower bound holds its threshold
    slm_endpoint: str | None = None  # OpenAI-compatible server of the adapters (vLLM); None: this process runs them


@dataclass
class Route:
    cluster: str | None
    distance: float | None
    deployed: bool
    use_slm: bool
    reason: str


@dataclass
class ClusterStats:
    routed: int = 0  # answered by the SLM
    fallback: int = 0  # sent to the SLM but answered by the LLM
    upstream: int = 0  # answered by the LLM without trying the SLM
    shadow: int = 0
    agreement_sum: float = 0.0
    slm_ms: list[float] = field(default_factory=list)
    fallback_reasons: dict[str, int] = field(default_factory=lambda: defaultdict(int))


class RouterMetrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.clusters: dict[str, ClusterStats] = defaultdict(ClusterStats)
        self.overhead_ms: list[float] = []  # assignment, pseudonymisation, validation; not generation

    def record(self, cluster: str | None, what: str, *, slm_ms: float | None = None, reason: str | None = None,
               agreement: float | None = None) -> None:
        with self._lock:
            s = self.clusters[cluster or "unclustered"]
            setattr(s, what, getattr(s, what) + 1)
            if slm_ms is not None:
                s.slm_ms.append(slm_ms)
                del s.slm_ms[:-1000]
            if reason:
                s.fallback_reasons[reason.split(":")[0][:60]] += 1
            if agreement is not None:
                s.agreement_sum += agreement

    def overhead(self, ms: float) -> None:
        with self._lock:
            self.overhead_ms.append(ms)
            del self.overhead_ms[:-10000]

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            out = {}
            for cid, s in self.clusters.items():
                lat = sorted(s.slm_ms)
                out[cid] = {
                    "routed": s.routed, "fallback": s.fallback, "upstream": s.upstream, "shadow": s.shadow,
                    "agreement": round(s.agreement_sum / s.shadow, 4) if s.shadow else None,
                    "slm_latency_p50_ms": lat[len(lat) // 2] if lat else None,
                    "fallback_reasons": dict(s.fallback_reasons),
                }
            over = sorted(self.overhead_ms)
            return {"clusters": out, "overhead_p50_ms": over[len(over) // 2] if over else None}

    def render(self) -> str:
        snap = self.snapshot()
        lines = []
        for name, help_text in (("routed", "answered by the small model"),
                                ("fallback", "small model tried, answered by the LLM"),
                                ("upstream", "answered by the LLM without trying the small model"),
                                ("shadow", "shadow comparisons made")):
            lines += [f"# HELP slmigrate_router_{name}_total Requests {help_text}, per cluster.",
                      f"# TYPE slmigrate_router_{name}_total counter"]
            lines += [f'slmigrate_router_{name}_total{{cluster="{c}"}} {v[name]}' for c, v in snap["clusters"].items()]
        lines += ["# HELP slmigrate_router_agreement Mean shadow agreement (primary metric) per cluster.",
                  "# TYPE slmigrate_router_agreement gauge"]
        lines += [f'slmigrate_router_agreement{{cluster="{c}"}} {v["agreement"]}'
                  for c, v in snap["clusters"].items() if v["agreement"] is not None]
        lines += ["# HELP slmigrate_router_slm_latency_p50_ms Median small-model answer time per cluster.",
                  "# TYPE slmigrate_router_slm_latency_p50_ms gauge"]
        lines += [f'slmigrate_router_slm_latency_p50_ms{{cluster="{c}"}} {v["slm_latency_p50_ms"]}'
                  for c, v in snap["clusters"].items() if v["slm_latency_p50_ms"] is not None]
        if snap["overhead_p50_ms"] is not None:
            lines += ["# HELP slmigrate_router_overhead_p50_ms Median routing overhead (assignment, "
                      "pseudonymisation, validation).",
                      "# TYPE slmigrate_router_overhead_p50_ms gauge",
                      f"slmigrate_router_overhead_p50_ms {snap['overhead_p50_ms']}"]
        return "\n".join(lines) + "\n"


class Canary:
    """Exactly P% of each cluster's requests, spread evenly (a credit counter, not a coin flip)."""

    def __init__(self, percent: float):
        self.share = max(0.0, min(100.0, percent)) / 100
        self._shares: dict[str, float] = {}  # per-cluster shares set by the canary ramp
        self._credit: dict[str, float] = defaultdict(float)
        self._lock = threading.Lock()

    def set_percent(self, cluster: str, percent: float) -> None:
        with self._lock:
            self._shares[cluster] = max(0.0, min(100.0, percent)) / 100

    def pick(self, cluster: str) -> bool:
        with self._lock:
            self._credit[cluster] += self._shares.get(cluster, self.share)
            if self._credit[cluster] >= 1 - 1e-9:
                self._credit[cluster] -= 1
                return True
            return False


def completion_body(message: dict[str, Any], model: str, prompt_tokens: int, completion_tokens: int,
                    finish_reason: str) -> dict[str, Any]:
    if message.get("tool_calls"):
        finish_reason = "tool_calls"
        message = {**message, "tool_calls": [{**tc, "id": f"call_{uuid.uuid4().hex[:24]}"}
                                             for tc in message["tool_calls"]]}
    return {
        "id": f"chatcmpl-slm-{uuid.uuid4().hex[:24]}", "object": "chat.completion", "created": int(time.time()),
        "model": model, "system_fingerprint": "slmigrate-router",
        "choices": [{"index": 0, "message": message, "finish_reason": finish_reason, "logprobs": None}],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens},
    }


def sse_chunks(body: dict[str, Any]) -> list[bytes]:
    """A finished completion as the chunks a streaming client expects (role, content, tool calls, finish)."""
    message = body["choices"][0]["message"]
    base = {"id": body["id"], "object": "chat.completion.chunk", "created": body["created"], "model": body["model"]}

    def chunk(delta: dict[str, Any], finish: str | None = None, usage: dict | None = None) -> bytes:
        data = {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}
        if usage is not None:
            data["usage"] = usage
        return f"data: {json.dumps(data, ensure_ascii=False)}\n\n".encode()

    out = [chunk({"role": "assistant", "content": ""})]
    if message.get("content"):
        out.append(chunk({"content": message["content"]}))
    for i, tc in enumerate(message.get("tool_calls") or []):
        out.append(chunk({"tool_calls": [{"index": i, "id": tc["id"], "type": "function",
                                          "function": tc["function"]}]}))
    out.append(chunk({}, body["choices"][0]["finish_reason"], body["usage"]))
    out.append(b"data: [DONE]\n\n")
    return out


class Router:
    """Decides, per request, who answers; owns the SLM engine, the assigner and the metrics."""

    def __init__(self, settings: RouterSettings, engine: Any, assign: Callable[[dict[str, Any]], tuple],
                 writer: Any, agreement: Callable[..., float | None] | None = None, guard: Any = None,
                 pseudonymiser: Any = None):
        self.settings = settings
        self.engine = engine
        self.assign = assign
        self.writer = writer
        self.agreement = agreement  # (kind, prediction, reference, request, metric=) -> score, None when unscorable
        self.guard = guard  # serve.guard.Guard, or None when no SLM answer is checked
        # serve.pseudonym.Pseudonymiser: the SLM's side of a request scrubbed as its training data was (None: as is)
        self.pseudonymiser = pseudonymiser
        self.metrics = RouterMetrics()
        self.canary = Canary(settings.canary)
        self._shadow_lock = threading.Lock()

    def route(self, request: dict[str, Any]) -> Route:
        cluster, distance = self.assign(request)
        deployed = cluster is not None and cluster in self.engine.deployments
        if cluster is None:
            return Route(None, distance, False, False, "no confident cluster")
        if not deployed:
            return Route(cluster, distance, False, False, "cluster not migrated")
        if self.guard is not None and self.guard.demoted(cluster):
            return Route(cluster, distance, True, False, "demoted by the live guard")
        if self.settings.shadow:
            return Route(cluster, distance, True, False, "shadow mode")
        if not self.canary.pick(cluster):
            return Route(cluster, distance, True, False, "outside the canary share")
        return Route(cluster, distance, True, True, "migrated")

    def answer_with_slm(self, route: Route, request: dict[str, Any]) -> tuple[dict[str, Any] | None, str | None,
                                                                               Any]:
        """(completion body, None) when the SLM's answer is valid, else (None, reason, answer-or-None)."""
        deployment = self.engine.deployments[route.cluster]
        restore = None
        try:
            if self.pseudonymiser is not None:
                t0 = time.perf_counter()
                slm_request, restore = self.pseudonymiser.pseudonymise(request)
                self.metrics.overhead((time.perf_counter() - t0) * 1000)
            else:
                slm_request = request
            answer = self.engine.answer(route.cluster, slm_request)
        except Exception as exc:  # noqa: BLE001 - any SLM failure falls back to the LLM
            log.warning("small model failed on cluster %s: %s", route.cluster, exc)
            return None, f"slm error: {type(exc).__name__}", None
        if restore:  # the answer in the request's own values, before it is checked against the request's tools
            answer.message = restore.message(answer.message)
        t0 = time.perf_counter()
        problems = validate_answer(answer.message, request.get("tools"), deployment.kind)
        if answer.finish_reason == "length" and not problems:
            problems = ["answer cut at the token limit"]
        self.metrics.overhead((time.perf_counter() - t0) * 1000)
        if problems:
            return None, "invalid answer: " + problems[0], answer
        model = f"slmigrate/{deployment.name}"
        body = completion_body(answer.message, model, answer.prompt_tokens, answer.completion_tokens,
                               answer.finish_reason)
        return body, None, answer

    def log_slm_call(self, request: dict[str, Any], body: dict[str, Any], route: Route, answer: Any,
                     agent: str | None, session: str | None, started: float) -> None:
        from slmigrate.collect.proxy.exchange import LiveCall

        clean = {k: v for k, v in request.items() if k not in ("user", "safety_identifier")}
        rec = CallRecord(
            request=clean, response=body, timestamp=now_iso(), latency_ms=round((time.perf_counter() - started) *
                                                                                1000, 3),
            agent=agent or self.settings.agent, session=session, model=body["model"], source="router",
            metadata={"route": {"answered_by": "slm", "cluster": route.cluster,
                                "distance": route.distance, "adapter": str(self.engine.deployments[
                                    route.cluster].adapter)}},
        )
        if getattr(answer, "served_by", None):
            rec.metadata["route"]["served_by"] = answer.served_by
        self.writer.submit(LiveCall(rec, time.time()))  # finalised on the writer thread, off the request path

    def shadow_compare(self, route: Route, request: dict[str, Any], llm_response: dict[str, Any]) -> None:
        """Run the SLM on a request the LLM answered and record how far they agree (never affects the client)."""
        choices = llm_response.get("choices") if isinstance(llm_response, dict) else None
        if not choices or not isinstance(choices, list) or not isinstance(choices[0], dict):
            return  # not a chat completion: nothing to compare with
        reference = choices[0].get("message") or {}
        body, reason, answer = self.answer_with_slm(route, request)
        prediction = (body["choices"][0]["message"] if body else (answer.message if answer else None))
        deployment = self.engine.deployments[route.cluster]
        score = 0.0
        if prediction is not None and self.agreement is not None:
            score = float(self.agreement(deployment.kind, prediction, reference, request,
                                         metric=deployment.metric) or 0.0)
        # The row goes to the log before the counter moves: whoever sees the count (a dashboard, a test) can then
        # rely on the row being there too.
        if self.settings.shadow_log is not None:
            row = {"timestamp": now_iso(), "cluster": route.cluster, "agreement": score, "valid": reason is None,
                   "reason": reason, "slm": prediction, "llm": reference}
            with self._shadow_lock, self.settings.shadow_log.open("a") as fh:
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
        self.metrics.record(route.cluster, "shadow", agreement=score,
                            slm_ms=answer.latency_ms if answer is not None else None)

    def guard_compare(self, route: Route, request: dict[str, Any], slm_message: dict[str, Any],
                      llm_response: Any) -> dict[str, Any] | None:
        """Score the SLM's answer (already sent) against the LLM's for the live guard; the task's record when
        this comparison demoted it. An LLM reply that is no chat completion, or a pair the metric cannot score,
        counts for nothing."""
        choices = llm_response.get("choices") if isinstance(llm_response, dict) else None
        if self.guard is None or self.agreement is None or not choices or not isinstance(choices, list) \
                or not isinstance(choices[0], dict):
            return None
        reference = choices[0].get("message") or {}
        deployment = self.engine.deployments[route.cluster]
        score = self.agreement(deployment.kind, slm_message, reference, request, metric=deployment.metric)
        if score is None:
            return None
        return self.guard.record(route.cluster, float(score))

    def snapshot(self) -> dict[str, Any]:
        """What ``/slmigrate/routes`` shows: the routing counters and the live guard's per-task record."""
        return {**self.metrics.snapshot(), "guard": self.guard.snapshot() if self.guard is not None else None}
