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
  can flip a near-tie; ``tests/benchmarks/generate_speed.py`` counts the answers that differ).
"""

from __future__ import annotations

import copy
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass
class Decoded:
    tokens: list[int]  # generated tokens, without the stop token
    stopped: bool  # a stop token ended it (else max_new_tokens did)
    forwards: int  # model forward passes (prefill included): the cost that matters on a CPU
    drafted: int  # proposed tokens
    accepted: int  # proposed tokens the model confirmed


def draft(history: Sequence[int], sources: Iterable[Sequence[int]], *, ngram: int = 3, k: int = 8) -> list[int]:
    """Up to ``k`` tokens that followed the last ``ngram`` tokens of ``history`` where that n-gram occurred
    before: the latest earlier occurrence in ``history`` itself first, then in each of ``sources`` in order;
    shorter n-grams (down to 2 tokens) are tried when the longer one never occurred. Empty when nothing matches.

    Pure list logic, so the unit tests pin it down without a model.
    """
    for n in range(ngram, 1, -1):
        if len(history) < n:
            continue
        tail = list(history[-n:])
        # in history, skip the tail itself (it trivially matches); in a source, every position counts
        for seq, last in ((history, len(history) - n - 1), *((s, len(s) - n) for s in sources)):
            for start in range(last, -1, -1):
                if list(seq[start:start + n]) == tail:
                    follow = list(seq[start + n:start + n + k])
                    if follow:
                        return follow
    return []


def decode(model: Any, prompt: Sequence[int], *, max_new_tokens: int, stops: set[int],
           lookup: Sequence[Sequence[int]] = (), ngram: int = 3, draft_tokens: int = 8) -> Decoded:
    """Greedy continuation of one tokenised ``prompt`` (``draft_tokens=0`` turns drafting off)."""
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
        while len(out) < max_new_tokens:
            token = int(logits[-1].argmax())
            if token in stops:
                return Decoded(out, True, forwards, drafted, accepted)
            out.append(token)
            history.append(token)
            if len(out) >= max_new_tokens:
                break
            proposal = draft(history, lookup, ngram=ngram, k=min(k, max_new_tokens - len(out))) \
                if draft_tokens else []
            feed = torch.tensor([[token, *proposal]], dtype=torch.long, device=device)
            logits = model(input_ids=feed, **{kw: cache}, use_cache=True,
                           logits_to_keep=len(proposal) + 1).logits[0]
            forwards += 1
            if not proposal:
                continue
            drafted += len(proposal)
            choices = logits.argmax(-1).tolist()  # choices[i]: the model's token after feed[i]
            n_ok = 0
            while n_ok < len(proposal) and choices[n_ok] == proposal[n_ok] and proposal[n_ok] not in stops \
                    and len(out) < max_new_tokens:
                out.append(proposal[n_ok])
                history.append(proposal[n_ok])
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
