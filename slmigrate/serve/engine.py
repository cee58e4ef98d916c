"""The small-model side of the router: one base model, one LoRA adapter per migrated cluster, in one process.

Adapters are loaded once as named PEFT adapters on the same base weights and switched per request
(``set_adapter``), so ten migrated tasks cost one base model's memory plus ten small adapters. Generation is
not thread-safe on one model, so requests take turns under a lock, in a worker thread off the event loop.

For speed each task is generated from its own merged copy (LoRA folded into the weights, made on the task's
first request; ~0.5 GB each at 135M parameters, the ``MERGED_MAX`` most recent kept) through the fast batch-1
decoder, which drafts from the task's recent answers (docs/evaluate.md, "Generation speed").
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from slmigrate.serve.deployment import Deployment


@dataclass
class SlmAnswer:
    message: dict[str, Any]  # OpenAI assistant message (tool_calls with JSON-string arguments)
    text: str  # what the model generated
    prompt_tokens: int
    completion_tokens: int
    latency_ms: float
    finish_reason: str  # stop | length
    served_by: str | None = None  # the serving endpoint (credentials masked) when not this process


MERGED_MAX = 4  # merged copies kept; the least recently used is dropped and merged again when its task returns


class SlmEngine:
    def __init__(self, deployments: list[Deployment], *, device: str = "auto", base_model: str | None = None):
        from slmigrate.evaluate import generate as G

        self.deployments = {d.cluster: d for d in deployments}
        self._lock = threading.Lock()
        self._merged: OrderedDict[str, Any] = OrderedDict()
        self._lookups: dict[str, Any] = {}
        self.model = self.tokenizer = None
        if not deployments:
            return
        bases = {d.base_model for d in deployments}
        base = base_model or next(iter(bases))
        model, self.tokenizer, self.resolved = G.load_model(base, device=device)
        from peft import PeftModel

        first, *rest = deployments
        self.model = PeftModel.from_pretrained(model, str(first.adapter), adapter_name=first.name)
        for d in rest:
            self.model.load_adapter(str(d.adapter), adapter_name=d.name)
        self.model.eval()

    def answer(self, cluster: str, request: dict[str, Any]) -> SlmAnswer:
        """Generate the cluster's specialist answer for an OpenAI chat request (blocking)."""
        from slmigrate import chat_format
        from slmigrate.evaluate.run import context_budget
        from slmigrate.evaluate.generate import generate, guides_for
        from slmigrate.evaluate.greedy import AnswerLookup

        d = self.deployments[cluster]
        messages, tools, limit = d.prepare(request)
        budget = context_budget(self.model, self.tokenizer, d.max_new_tokens)  # as evaluate renders prompts
        prompt = chat_format.render_prompt(self.tokenizer, messages, tools, max_tokens=budget).text
        with self._lock:
            model = self._merged_model(d.name)
            t0 = time.perf_counter()
            guides = guides_for(model, self.tokenizer, [request]) if d.constrained else None
            result = generate(model, self.tokenizer, [prompt], batch_size=1, max_new_tokens=limit,
                              lookup=self._lookups.setdefault(cluster, AnswerLookup()), guides=guides)
            elapsed = (time.perf_counter() - t0) * 1000
        text = result.texts[0]
        try:
            message = chat_format.parse_answer(text)
        except Exception:  # noqa: BLE001 - an unparseable answer is a failed answer; validation catches it
            message = {"role": "assistant", "content": text}
        return SlmAnswer(message=message, text=text, prompt_tokens=result.prompt_tokens[0],
                         completion_tokens=result.new_tokens[0], latency_ms=elapsed,
                         finish_reason="length" if result.truncated else "stop")

    def _merged_model(self, name: str) -> Any:
        """The adapter ``name`` merged into a copy of the base (made once, least recently used dropped)."""
        from slmigrate.evaluate.greedy import for_serving, merged

        assert self.model is not None
        self.model.set_adapter(name)
        if name not in self._merged:
            if len(self._merged) >= MERGED_MAX:
                self._merged.popitem(last=False)
            self._merged[name] = for_serving(merged(self.model))
        self._merged.move_to_end(name)
        return self._merged[name]
