"""The gate between fine-tuning and serving: is the small model good enough for this task?

``run.evaluate`` answers each test call with the small model (``generate``), scores it against the LLM's
answer (``metrics``, or an LLM ``judge``) and writes the migration plan. ``run.evaluate_calls`` scores one cluster's
variants the same way on calls the caller gives (refine's fresh traffic).
"""

from slmigrate.evaluate.run import EvaluateResult, evaluate, evaluate_calls, find_adapter

__all__ = ["EvaluateResult", "evaluate", "evaluate_calls", "find_adapter"]
