"""An LLM judge for free-text answers, through any OpenAI-compatible endpoint (the ``openai`` client).

Two modes:

- ``rubric``: the judge reads the task, the reference answer (the LLM's recorded one) and the candidate, and
  gives the candidate 1-5; the score is scaled to [0, 1].
- ``pairwise``: the judge picks the better of two answers, asked twice with the positions swapped, because
  judges favour one position; the candidate gets 1 for a win, 0.5 for a tie, 0 for a loss, averaged over both
  orders. 0.5 means "as good as the LLM".

Items whose verdict cannot be read get ``None`` (left out of the mean) rather than a guessed score.
"""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Sequence

from slmigrate.chat_format import message_text
from slmigrate.errors import SlmigrateError

MODES = ("rubric", "pairwise")

_RUBRIC = """You grade an AI assistant's answer against a reference answer written by a stronger model.

Conversation (latest turns):
{task}

Reference answer:
{reference}

Candidate answer:
{candidate}

Score the candidate from 1 to 5: 5 = as correct, complete and useful as the reference; 3 = partly correct or
missing important content; 1 = wrong, unhelpful or empty. Reply with JSON only: {{"score": <1-5>}}"""

_PAIRWISE = """Two AI assistants answered the same conversation. Decide which answer is better: more correct, more
complete, more useful. Length alone is not quality.

Conversation (latest turns):
{task}

Answer A:
{a}

Answer B:
{b}

Reply with JSON only: {{"winner": "A"}}, {{"winner": "B"}} or {{"winner": "tie"}}"""


def task_text(request: dict[str, Any] | None, max_chars: int = 4000) -> str:
    """The last few turns of the request, newest last, cut from the front to ``max_chars``."""
    lines = []
    for m in (request or {}).get("messages") or []:
        content = message_text(m)
        if m.get("tool_calls"):
            content += " [tool calls: " + ", ".join(
                (tc.get("function") or {}).get("name", "") for tc in m["tool_calls"]) + "]"
        lines.append(f"{m.get('role', '?')}: {content}")
    text = "\n".join(lines[-6:])
    return text[-max_chars:]


def _verdict(text: str, key: str) -> Any:
    m = re.search(r"\{.*\}", text or "", re.S)
    if m:
        try:
            return json.loads(m.group(0)).get(key)
        except (json.JSONDecodeError, AttributeError):
            pass
    m = re.search(rf'"?{key}"?\s*[:=]\s*"?([A-Za-z0-9]+)', text or "")
    return m.group(1) if m else None


class Judge:
    def __init__(self, base_url: str | None, model: str, mode: str = "rubric", *, api_key: str | None = None,
                 client: Any = None, workers: int = 4, timeout: float = 60.0):
        if mode not in MODES:
            raise SlmigrateError(f"unknown judge mode {mode!r}; expected one of {', '.join(MODES)}")
        if not model:
            raise SlmigrateError("a judge needs a model name; pass --judge-model NAME")
        if client is None:
            import openai

            # Local OpenAI-compatible servers (vLLM, llama.cpp, Ollama) accept any key; the real API reads
            # OPENAI_API_KEY through the client's own default when none is given.
            import os

            client = openai.OpenAI(base_url=base_url, api_key=api_key or os.environ.get("OPENAI_API_KEY") or "none",
                                   timeout=timeout, max_retries=2)
        self.client, self.model, self.mode, self.workers = client, model, mode, max(1, workers)
        self.calls = 0

    def _ask(self, prompt: str) -> str:
        self.calls += 1
        resp = self.client.chat.completions.create(
            model=self.model, temperature=0, max_tokens=50,
            messages=[{"role": "user", "content": prompt}],
        )
        return resp.choices[0].message.content or ""

    def _rubric(self, cand: str, ref: str, request: dict | None) -> float | None:
        value = _verdict(self._ask(_RUBRIC.format(task=task_text(request), reference=ref or "(empty)",
                                                  candidate=cand or "(empty)")), "score")
        try:
            s = float(value)
        except (TypeError, ValueError):
            return None
        return (min(5.0, max(1.0, s)) - 1) / 4 if 1 <= s <= 5 else None

    def _pairwise(self, cand: str, ref: str, request: dict | None) -> float | None:
        task = task_text(request)
        points = []
        for a, b, cand_is in ((cand, ref, "A"), (ref, cand, "B")):
            winner = str(_verdict(self._ask(_PAIRWISE.format(task=task, a=a or "(empty)", b=b or "(empty)")),
                                  "winner") or "").strip().upper()
            if winner not in ("A", "B", "TIE"):
                return None
            points.append(0.5 if winner == "TIE" else float(winner == cand_is))
        return sum(points) / 2

    def score(self, candidates: Sequence[str], references: Sequence[str],
              requests: Sequence[dict | None]) -> list[float | None]:
        one = self._rubric if self.mode == "rubric" else self._pairwise

        import openai

        errors: list[str] = []

        def run(i: int) -> float | None:
            try:
                return one(candidates[i], references[i], requests[i] if i < len(requests) else None)
            except openai.OpenAIError as exc:  # one failed item must not lose the whole evaluation
                errors.append(str(exc))
                return None

        with ThreadPoolExecutor(self.workers) as pool:
            out = list(pool.map(run, range(len(candidates))))
        if candidates and len(errors) == len(candidates):
            raise SlmigrateError(f"the judge endpoint failed on every item ({errors[0]}); check --judge URL, "
                                 "--judge-model and the API key (OPENAI_API_KEY)")
        return out
