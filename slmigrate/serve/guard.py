"""The live guard: a running check that a migrated task still agrees with the LLM on live traffic.

``slmigrate serve --guard-sample P`` sends a share P of the requests the small model answered to the upstream
LLM as well, in the background (the client already has the small model's answer), and scores the pair with the
task's primary metric - the metric and threshold its migration was decided on. Per task it keeps the running
mean agreement and a 95% Wilson interval; once the task has ``min_samples`` comparisons and the interval's
**upper** bound is below the threshold, the task is demoted: the LLM answers it from then on.

The interval is Wilson's for a proportion. Scores of continuous metrics (ROUGE-L, field accuracy) enter as their
sum over ``n``: a score in [0, 1] with mean p has variance at most p(1 - p), so the interval is, if anything, wider
than the truth and a demotion no earlier. ``min_samples`` guards against deciding on the first few requests, where
a check after every sample would otherwise make one early disagreement enough.

With ``--canary P --canary-ramp`` a task starts at P% of its traffic on the small model, and its share doubles
(up to 100%) each time it has ``min_samples`` more checks at the current share and the **lower** bound of its
live agreement reaches the threshold: the share grows only as fast as the evidence that the task holds its bar.

``serve/guard.json`` (owned by this module) holds the per-task state, so a demotion survives a restart and
``slmigrate status`` and ``refine`` (``demotions``) can see it. A demotion holds for the evaluation run it was
made against: a new ``slmigrate evaluate`` (typically after ``refine`` retrained the task) starts the task afresh.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from slmigrate import artifacts
from slmigrate.errors import SlmigrateError
from slmigrate.record import now_iso
from slmigrate.stats import wilson  # a sum of scores in [0, 1] stands in for successes on graded metrics

if TYPE_CHECKING:
    from slmigrate.serve.deployment import Deployment
    from slmigrate.serve.router import Canary
    from slmigrate.workspace import Workspace

log = logging.getLogger("slmigrate.serve")

GUARD = ("serve", "guard.json")


@dataclass
class TaskGuard:
    """One task's live record (a row of ``serve/guard.json``)."""

    cluster: str
    metric: str | None
    threshold: float | None
    adapter: str
    evaluation_run: str | None
    samples: int = 0
    agreement_sum: float = 0.0
    demoted: bool = False
    demoted_at: str | None = None
    reason: str | None = None
    canary: float | None = None  # the SLM's share of the task's traffic, in percent, under the canary ramp
    since_step: int = 0  # checks since the share last grew

    def bounds(self, z: float) -> tuple[float, float] | None:
        return wilson(self.agreement_sum, self.samples, z) if self.samples else None

    def view(self, z: float) -> dict[str, Any]:
        bounds = self.bounds(z)
        return {**asdict(self),
                "agreement": round(self.agreement_sum / self.samples, 4) if self.samples else None,
                "lower": round(bounds[0], 4) if bounds else None, "upper": round(bounds[1], 4) if bounds else None}


class Guard:
    """Samples SLM-answered requests, keeps each task's running bound, and demotes a task that falls below."""

    def __init__(self, ws: Workspace, deployments: dict[str, Deployment], *, sample: float, min_samples: int = 20,
                 z: float = 1.96, max_in_flight: int = 32):
        from slmigrate.serve.router import Canary

        self.ws = ws
        self.sample = sample
        self.min_samples = max(1, min_samples)
        self.z = z
        self.max_in_flight = max_in_flight
        self.in_flight = 0
        self.skipped = 0  # samples dropped because too many upstream checks were still running
        self._lock = threading.Lock()
        self._picker = Canary(sample * 100)  # an exact share spread evenly, as the canary does
        self._canary: Canary | None = None  # the router's, when the canary ramp is on
        evaluation = artifacts.evaluation(ws, required=False) or {}
        run = evaluation.get("run")
        stored = (read_guard(ws) or {}).get("tasks", {})
        self.tasks: dict[str, TaskGuard] = {}
        for cid, d in deployments.items():
            adapter = ws.relative(d.adapter)
            fresh = TaskGuard(cid, d.metric, d.threshold, adapter, run)
            old = stored.get(cid) or {}
            if old.get("evaluation_run") == run and old.get("adapter") == adapter:
                # The same decision on the same adapter: carry on where the last router left off.
                fresh.samples = int(old.get("samples") or 0)
                fresh.agreement_sum = float(old.get("agreement_sum") or 0.0)
                fresh.demoted = bool(old.get("demoted"))
                fresh.demoted_at, fresh.reason = old.get("demoted_at"), old.get("reason")
                fresh.canary, fresh.since_step = old.get("canary"), int(old.get("since_step") or 0)
            self.tasks[cid] = fresh

    def ramp(self, canary: Canary, start_percent: float) -> None:
        """Drive the router's canary: each task from ``start_percent`` (or where a previous router left it) up."""
        self._canary = canary
        with self._lock:
            for cid, task in self.tasks.items():
                if task.canary is None:
                    task.canary = max(0.0, min(100.0, start_percent))
                canary.set_percent(cid, task.canary)

    def demoted(self, cluster: str) -> bool:
        task = self.tasks.get(cluster)
        return task is not None and task.demoted

    def begin(self, cluster: str) -> bool:
        """Should this SLM answer be checked against the LLM? True reserves an in-flight slot (``end`` frees it)."""
        if self.sample <= 0 or cluster not in self.tasks or self.demoted(cluster):
            return False
        if not self._picker.pick(cluster):
            return False
        with self._lock:
            if self.in_flight >= self.max_in_flight:
                self.skipped += 1
                return False
            self.in_flight += 1
            return True

    def end(self) -> None:
        with self._lock:
            self.in_flight -= 1

    def record(self, cluster: str, score: float) -> dict[str, Any] | None:
        """Add one comparison; the task's view when this one demoted it, else None."""
        with self._lock:
            task = self.tasks[cluster]
            if task.demoted:
                return None
            task.samples += 1
            task.agreement_sum += min(max(score, 0.0), 1.0)
            low_high = task.bounds(self.z)
            demote = (task.threshold is not None and low_high is not None and task.samples >= self.min_samples
                      and low_high[1] < task.threshold)
            if demote:
                assert low_high is not None
                task.demoted, task.demoted_at = True, now_iso()
                task.reason = (f"live {task.metric or 'agreement'} {task.agreement_sum / task.samples:.3f} on "
                               f"{task.samples} sampled requests, upper bound {low_high[1]:.3f} < threshold "
                               f"{task.threshold:.2f}")
            elif self._canary is not None and task.canary is not None and task.canary < 100:
                task.since_step += 1
                if (task.threshold is not None and low_high is not None and task.since_step >= self.min_samples
                        and low_high[0] >= task.threshold):
                    task.canary, task.since_step = min(100.0, task.canary * 2), 0
                    self._canary.set_percent(cluster, task.canary)
                    log.info("canary ramp: task %s now %g%% on the small model (live lower bound %.3f >= %.2f)",
                             cluster, task.canary, low_high[0], task.threshold)
            self._save()
            event = task.view(self.z) if demote else None
        if event is not None:
            log.warning("live guard demoted task %s to the LLM: %s", cluster, event["reason"])
        return event

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {"sample": self.sample, "min_samples": self.min_samples, "in_flight": self.in_flight,
                    "skipped": self.skipped, "tasks": {cid: t.view(self.z) for cid, t in self.tasks.items()}}

    def render(self) -> str:
        """Prometheus text for /slmigrate/metrics."""
        tasks = self.snapshot()["tasks"]
        lines = ["# HELP slmigrate_router_guard_samples_total SLM answers checked against the LLM, per cluster.",
                 "# TYPE slmigrate_router_guard_samples_total counter"]
        lines += [f'slmigrate_router_guard_samples_total{{cluster="{c}"}} {t["samples"]}' for c, t in tasks.items()]
        lines += ["# HELP slmigrate_router_guard_upper Upper 95% bound of live agreement per cluster.",
                  "# TYPE slmigrate_router_guard_upper gauge"]
        lines += [f'slmigrate_router_guard_upper{{cluster="{c}"}} {t["upper"]}' for c, t in tasks.items()
                  if t["upper"] is not None]
        lines += ["# HELP slmigrate_router_guard_demoted 1 when the live guard sent the cluster back to the LLM.",
                  "# TYPE slmigrate_router_guard_demoted gauge"]
        lines += [f'slmigrate_router_guard_demoted{{cluster="{c}"}} {int(t["demoted"])}' for c, t in tasks.items()]
        return "\n".join(lines) + "\n"

    def _save(self) -> None:
        artifacts.write_json(self.ws.path(*GUARD), {"updated": now_iso(), "z": self.z,
                                                    "min_samples": self.min_samples,
                                                    "tasks": {cid: t.view(self.z) for cid, t in self.tasks.items()}})


def read_guard(ws: Workspace) -> dict[str, Any] | None:
    """``serve/guard.json`` as the router wrote it, or None before a guarded router ran (or when unreadable)."""
    file = ws.path(*GUARD)
    if not file.exists():
        return None
    import json

    try:
        body = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        log.warning("cannot read %s (%s); the live guard's record is ignored", file, exc)
        return None
    return body if isinstance(body, dict) else None


def live_record(ws: Workspace) -> dict[str, dict[str, Any]]:
    """The guard's per-task record under the current evaluation (cluster -> metric, threshold, samples,
    agreement, lower, upper, demoted, demoted_at, reason); records made against an older evaluation are left out."""
    body = read_guard(ws) or {}
    if not body:
        return {}
    try:
        run = (artifacts.evaluation(ws, required=False) or {}).get("run")
    except SlmigrateError:
        return {}  # no readable decision: nothing is migrated, so nothing is guarded
    return {cid: t for cid, t in (body.get("tasks") or {}).items()
            if isinstance(t, dict) and t.get("evaluation_run") == run}


def demotions(ws: Workspace) -> dict[str, dict[str, Any]]:
    """Tasks the live guard demoted under the current evaluation (cluster -> its record, as ``live_record``).
    ``refine`` retrains these; ``status`` shows them."""
    return {cid: t for cid, t in live_record(ws).items() if t.get("demoted")}
