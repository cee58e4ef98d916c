"""A compact batch-1 greedy decoder for small models on a CPU: what evaluate and the router run per request.

Batch-1 decoding of a ~100M-parameter model on a CPU is bound by memory bandwidth: every new token reads all
the weights once. Three things make it cheaper without changing what greedy decoding answers:

- **one forward per step, nothing else**: a KV cache, logits for the last position only (the prefill would
  otherwise multiply every prompt position by the 49k-word output matrix), argmax; none of HF ``generate``'s
  per-step logits processors, stopping criteria and bookkeeping;
- **merged LoRA** (:func:`merged`): an unmerged PEFT adapter runs two extra small matmuls per adapted layer
  per token; a merged copy runs the plain model;
- **draft-and-verify from text already seen** (prompt lookup): extraction and labelling answers copy spans of
  the prompt (names, order ids) and repeat fixed scaffolding (JSON keys, punctuation) seen in earlier answers
  of the same task. When the last ``ngram`` tokens occurred before in the prompt, the answer so far or a
  ``lookup`` sequence, the tokens that followed them there are proposed and checked in **one** forward pass:
  a proposed token is kept only while it equals the argmax the model gives at that position, and the first
  mismatch is replaced by the model's own token. Accepted tokens are exactly those one-token-at-a-time greedy
  decoding would choose (up to floating-point summation order: a batched matmul may round differently, which
  can flip a near-tie; ``tests/benchmarks/generate_speed.py`` counts the answers that differ). An earlier
  answer is searched at the *same* occurrence (:func:`draft`), and its stop token is drafted too, so a
  finished answer costs no pass of its own.

A fourth is a choice of number format, not of decoding: on a CPU with native bfloat16 instructions
(:func:`cpu_bf16`) the served model runs in bfloat16, half the bytes read per token. evaluate scores the very
model the router serves, so the quality figure is that model's.
"""

from __future__ import annotations

import copy
import re
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from slmigrate.evaluate.guide import Guide


@dataclass
class Decoded:
    tokens: list[int]  # generated tokens, without the stop token
    stopped: bool  # a stop token ended it (else max_new_tokens did)
    forwards: int  # model forward passes (prefill included): the cost that matters on a CPU
    drafted: int  # proposed tokens
    accepted: int  # proposed tokens the model confirmed
    stop: int | None = None  # the stop token that ended it

    def with_stop(self) -> list[int]:
        """The tokens as an earlier answer for drafts: with its stop token, so the next answer's end is drafted."""
        return [*self.tokens, self.stop] if self.stop is not None else list(self.tokens)


def draft(history: Sequence[int], sources: Iterable[Sequence[int]], *, ngram: int = 3, k: int = 8,
          start: int = 0) -> list[int]:
    """Up to ``k`` tokens that followed the last ``ngram`` tokens of ``history`` where that n-gram occurred
    before; shorter n-grams (down to one token) are tried when the longer one never occurred. Empty when nothing
    matches. ``history[:start]`` is the prompt, ``history[start:]`` the answer so far. Searched in order:

    - the prompt, latest occurrence first: extraction and labelling answers copy its spans (names, ids);
    - each of ``sources`` (earlier answers of the task), then the answer so far, by count: when the n-gram
      occurs for the c-th time in this answer, the c-th occurrence there (else the last). Fixed-format answers
      repeat their separators, and the c-th separator is followed by the c-th key, not by the last one.

    The single-token fallback is what finds a value's continuation in the prompt once the model wrote its first
    word (the answer's quote mark before it makes every longer n-gram unlike anything in the prompt).

    Pure list logic, so the unit tests pin it down without a model.
    """
    sources = list(sources)
    for n in range(ngram, 0, -1):
        if len(history) < n:
            continue
        tail = list(history[-n:])
        for begin in range(min(start, len(history) - 1) - n, -1, -1):  # the prompt, latest first
            if list(history[begin:begin + n]) == tail:
                follow = list(history[begin + n:begin + n + k])
                if follow:
                    return follow
        seen = _count(history[start:], tail)
        for seq in (*sources, history[start:]):
            # occurrences with a continuation (so not the answer's own tail)
            hits = [b for b in range(len(seq) - n) if list(seq[b:b + n]) == tail]
            if hits:
                begin = hits[min(seen, len(hits)) - 1] if seen else hits[-1]
                return list(seq[begin + n:begin + n + k])
    return []


def _count(seq: Sequence[int], gram: list[int]) -> int:
    n = len(gram)
    return sum(1 for b in range(len(seq) - n + 1) if list(seq[b:b + n]) == gram)


def decode(model: Any, prompt: Sequence[int], *, max_new_tokens: int, stops: set[int],
           lookup: Sequence[Sequence[int]] = (), ngram: int = 3, draft_tokens: int = 8,
           guide: Guide | None = None) -> Decoded:
    """Greedy continuation of one tokenised ``prompt`` (``draft_tokens=0`` turns drafting off).

    With a ``guide`` (:mod:`slmigrate.evaluate.guide`), every choice is the best token the request's tool
    schemas allow, and the tokens the grammar forces are drafted before any lookup draft."""
    import torch
    from transformers import DynamicCache

    device = next(model.parameters()).device
    cache = DynamicCache()
    kw = _cache_keyword(model)
    out: list[int] = []
    forwards = drafted = accepted = 0
    with torch.inference_mode():
        feed = torch.tensor([list(prompt)], dtype=torch.long, device=device)
        logits = model(input_ids=feed, **{kw: cache}, use_cache=True, logits_to_keep=1).logits[0]
        forwards += 1
        history = list(prompt)
        # Draft length adapts (as HF's assisted generation does): longer after a fully confirmed draft, shorter
        # after a rejected one, since a rejected token still costs its share of the forward pass.
        k = draft_tokens
        pick = guide.pick if guide is not None else (lambda row: int(row.argmax()))
        while len(out) < max_new_tokens:
            token = pick(logits[-1])
            if token in stops:
                return Decoded(out, True, forwards, drafted, accepted, token)
            out.append(token)
            history.append(token)
            if guide is not None:
                guide.advance(token)
            if len(out) >= max_new_tokens:
                break
            room = max_new_tokens - len(out)
            proposal = guide.forced(room) if guide is not None else []
            if not proposal and draft_tokens:
                proposal = draft(history, lookup, ngram=ngram, k=min(k, room), start=len(prompt))
            feed = torch.tensor([[token, *proposal]], dtype=torch.long, device=device)
            logits = model(input_ids=feed, **{kw: cache}, use_cache=True,
                           logits_to_keep=len(proposal) + 1).logits[0]
            forwards += 1
            if not proposal:
                continue
            drafted += len(proposal)
            n_ok = 0  # pick(logits[i]): the model's token after feed[i] (in the guide's state by then)
            while n_ok < len(proposal) and proposal[n_ok] not in stops and len(out) < max_new_tokens \
                    and pick(logits[n_ok]) == proposal[n_ok]:
                out.append(proposal[n_ok])
                history.append(proposal[n_ok])
                if guide is not None:
                    guide.advance(proposal[n_ok])
                n_ok += 1
            accepted += n_ok
            k = min(draft_tokens, k + 2) if n_ok == len(proposal) else max(1, k - 1)
            # keep the cache of the fed token and the confirmed draft; logits of the last confirmed position
            if n_ok < len(proposal):  # transformers 5 crops by a negative count: tokens to drop
                cache.crop(-(len(proposal) - n_ok))
            logits = logits[n_ok:n_ok + 1]
    return Decoded(out, False, forwards, drafted, accepted)


def _cache_keyword(model: Any) -> str:
    """``cache`` from transformers 5 on (``past_key_values`` is deprecated there), ``past_key_values`` before."""
    import inspect

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(inner.forward).parameters else "past_key_values"


def merged(model: Any) -> Any:
    """A plain model with the active LoRA adapter merged into a copy of the weights (``model`` unchanged); a
    model without an adapter comes back as it is. At 135M parameters the copy costs ~0.5 GB and saves the
    unmerged layers' extra matmuls on every token."""
    if not hasattr(model, "merge_and_unload"):
        return model
    active = getattr(model, "active_adapter", None)
    names = [active] if isinstance(active, str) else None
    copied = copy.deepcopy(model)
    plain = copied.merge_and_unload(adapter_names=names)
    plain.eval()
    return plain


def cpu_bf16() -> bool:
    """Whether a specialist runs in bfloat16 on this CPU: by default where the CPU has native bfloat16 dot
    products (``avx512_bf16`` or AMX on x86 Linux), where a bfloat16 step measured 1.5x faster than float32
    with the same answers (docs/benchmarks.md, generate_speed); elsewhere bfloat16 is emulated and can be
    slower than float32. ``SLMIGRATE_CPU_BF16=1`` / ``0`` decides instead."""
    from slmigrate import env

    forced = env.get(env.CPU_BF16)
    if forced is not None:
        return forced.strip().lower() not in ("0", "false", "no", "off")
    try:
        flags = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return False
    return bool(re.search(r"\b(avx512_bf16|amx_bf16)\b", flags))


def for_serving(model: Any) -> Any:
    """``model`` (a merged copy, changed in place) in the number format it is served in: bfloat16 on a CPU
    where :func:`cpu_bf16` says so, else as it is (a CUDA model keeps the dtype it was loaded in)."""
    import torch

    device = next(model.parameters()).device
    if device.type == "cpu" and cpu_bf16() and next(model.parameters()).dtype == torch.float32:
        model.to(torch.bfloat16)
    return model


class AnswerLookup:
    """The last few answers of one task, as token lists: the drafts' second source after the prompt, where a
    task's fixed scaffolding (JSON keys and punctuation, label words) is found before the model writes it."""

    def __init__(self, keep: int = 8):
        self._answers: deque[list[int]] = deque(maxlen=keep)

    def add(self, tokens: Sequence[int]) -> None:
        if tokens:
            self._answers.append(list(tokens))

    def sequences(self) -> list[list[int]]:
        return list(reversed(self._answers))  # latest first: the likeliest to share the current skeleton
