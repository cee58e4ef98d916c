"""What is deployed: the clusters whose fine-tuned model passed evaluation, and where their adapters are.

The router, ``export vllm`` and ``refine`` all read this one view, built from ``evals/latest.json`` (the
evaluate stage's decisions) and ``adapters/<cluster>/<model>/`` (the finetune stage's output).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slmigrate import artifacts
from slmigrate.artifacts import EvaluationFile
from slmigrate.chat_format import StaticPrompt
from slmigrate.errors import SlmigrateError
from slmigrate.workspace import Workspace


@dataclass
class Deployment:
    cluster: str
    adapter: Path
    base_model: str | None
    kind: str  # tool_call | json | label | text
    label: str | None = None
    metric: str | None = None
    score: float | None = None
    lower: float | None = None  # the 95% lower bound the task migrated on (evaluate's decision)
    threshold: float | None = None  # the primary metric's bar the migration was decided on (the live guard's)
    static: StaticPrompt = field(default_factory=StaticPrompt)  # prompt parts the adapter was trained without
    max_new_tokens: int = 256
    constrained: bool = True  # tool calls decoded inside the request's schemas, as the evaluation decoded them

    @property
    def name(self) -> str:
        """A LoRA module name that vLLM and HTTP clients accept."""
        return "".join(ch if ch.isalnum() or ch in "-_" else "-" for ch in self.cluster)

    def prepare(self, request: dict[str, Any]) -> tuple[list[dict[str, Any]], Any, int]:
        """(messages, tools, token limit) the adapter is asked with, wherever it runs: the request without the
        cluster's static prompt parts (it was trained without them), capped at the task's answer length."""
        messages, tools = self.static.apply(list(request.get("messages") or []), request.get("tools"))
        limit = self.max_new_tokens
        if isinstance(request.get("max_tokens"), int):
            limit = min(limit, request["max_tokens"])
        return messages, tools, limit


def _evaluation(ws: Workspace) -> EvaluationFile:
    found = artifacts.evaluation(ws, required=False)
    if found is None:
        raise SlmigrateError(f"no evaluation in {ws.root}; run `slmigrate evaluate` first so the router knows which "
                             "clusters may be answered by a small model")
    return found


def load_deployments(ws: Workspace, *, include_failed: bool = False) -> list[Deployment]:
    """Migrated clusters with an adapter on disk (``include_failed``: every evaluated cluster with one).

    Migrated means ``decision.migrate``: the outcome ``migrate`` only; a task that stays or has "not enough
    evidence" is never routed to its small model."""
    out = []
    evaluation = _evaluation(ws)
    constrained = bool((evaluation.get("config") or {}).get("constrained", False))
    for result in evaluation["clusters"]:
        if not result.get("adapter"):
            continue
        path = ws.resolve(result["adapter"])
        if not path.exists():
            continue
        if not include_failed and not (result.get("decision") or {}).get("migrate"):
            continue
        metrics_file = path / "metrics.json"
        trained = json.loads(metrics_file.read_text()) if metrics_file.exists() else {}
        finetuned = (result.get("variants") or {}).get("finetuned") or {}
        base = None
        config_file = path / "adapter_config.json"
        if config_file.exists():
            base = json.loads(config_file.read_text()).get("base_model_name_or_path")
        out.append(Deployment(
            cluster=result["cluster"], adapter=path, base_model=base or trained.get("base_model"),
            kind=result.get("kind") or "text", label=result.get("label"), metric=result.get("primary_metric"),
            score=finetuned.get("primary"), lower=(result.get("decision") or {}).get("lower"),
            threshold=result.get("threshold"),
            static=StaticPrompt.load(path),
            max_new_tokens=int((finetuned.get("efficiency") or {}).get("max_new_tokens") or 256),
            constrained=constrained,
        ))
    return out
