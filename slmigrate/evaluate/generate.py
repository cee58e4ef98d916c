"""Batched greedy generation with the measurements evaluate, ``select --probe`` and the router need.

Prompts are sorted by length and batched with left padding (decoder-only models continue from the last
position, so padding must sit on the left), which keeps padding - wasted compute - small. Results come back
in the caller's order with, per call:

- ``latency_ms``: the wall time of the batch the call was in: what a caller of a batching server waits (at
  ``batch_size=1``, the call's own time: what a request to the router, which serves one at a time, waits);
- ``compute_ms``: the batch's wall time divided by its size: the machine time one call costs, for pricing;
- ``new_tokens``: generated tokens up to the first stop token.

and overall generated tokens/s and peak memory (``torch.cuda.max_memory_allocated`` on CUDA; on CPU the
process's resident set size, sampled while generating).
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from slmigrate.errors import SlmigrateError
from slmigrate.evaluate.greedy import AnswerLookup, decode
from slmigrate.evaluate.guide import Guide


@dataclass
class GenerationResult:
    texts: list[str]
    latency_ms: list[float]
    compute_ms: list[float]
    new_tokens: list[int]
    prompt_tokens: list[int]
    total_s: float
    tokens_per_s: float
    peak_memory_mb: float
    memory_kind: str  # cuda_max_allocated | rss
    device: str
    batch_size: int
    max_new_tokens: int
    truncated: int = 0  # answers that hit max_new_tokens without a stop token
    extra: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """The figures without the per-call lists."""
        d = asdict(self)
        for key in ("texts", "latency_ms", "compute_ms", "new_tokens", "prompt_tokens"):
            d.pop(key)
        d["calls"] = len(self.texts)
        return d


class _RssSampler:
    """Peak resident memory of this process while a block runs (the kernel's ru_maxrss never goes down, so it
    cannot tell one variant's peak from an earlier, bigger one)."""

    def __init__(self, interval: float = 0.02):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()
        self._page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

    def _read(self) -> int:
        try:
            with open("/proc/self/statm") as fh:
                return int(fh.read().split()[1]) * self._page
        except (OSError, ValueError, IndexError):
            import resource

            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._read())
            self._stop.wait(self.interval)

    def __enter__(self) -> "_RssSampler":
        self.peak = self._read()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._read())


def stop_token_ids(model: Any, tokenizer: Any) -> set[int]:
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), tokenizer):
        eos = getattr(source, "eos_token_id", None)
        if isinstance(eos, int):
            ids.add(eos)
        elif isinstance(eos, (list, tuple)):
            ids.update(int(i) for i in eos)
    return ids


def max_new_tokens_for(tokenizer: Any, references: Sequence[str], *, margin: float = 1.25, extra: int = 16,
                       floor: int = 16, cap: int = 1024) -> int:
    """Room for the longest reference answer plus a margin: enough to reproduce any of them, no more, so a
    model that rambles is cut off instead of running to an arbitrary large limit."""
    longest = max((len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in references if t), default=0)
    return int(min(cap, max(floor, math.ceil(longest * margin) + extra)))


def generate(model: Any, tokenizer: Any, prompts: Sequence[str | Sequence[int]], *, batch_size: int = 8,
             max_new_tokens: int = 128, progress: Callable[[int], None] | None = None,
             skip_special_tokens: bool = False, fast: bool = True,
             lookup: AnswerLookup | None = None,
             guides: Sequence[Guide | None] | None = None) -> GenerationResult:
    """Greedy completions of ``prompts`` (rendered text, or token ids), in the order given.

    Text prompts are tokenised without adding special tokens: a chat template already wrote them.
    ``progress`` is called with the number of prompts finished after each batch.

    At ``batch_size=1`` with ``fast`` (the default), each prompt goes through ``slmigrate.evaluate.greedy``
    (a plain KV-cache loop with drafts from the prompt and earlier answers: several times faster on a CPU; pass
    a model prepared with ``greedy.merged``). ``lookup`` holds the task's earlier answers across calls (the
    router keeps one per task); without it, the answers of this call feed each other's drafts.

    ``guides`` (one per prompt, None for free decoding) constrain tool calls to the request's schemas
    (:mod:`slmigrate.evaluate.guide`), in both loops.
    """
    import torch

    if batch_size < 1:
        raise SlmigrateError(f"batch size must be at least 1, got {batch_size}")
    if not prompts:
        return GenerationResult([], [], [], [], [], 0.0, 0.0, 0.0, "rss", str(getattr(model, "device", "cpu")),
                                batch_size, max_new_tokens)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    device = next(model.parameters()).device
    encoded = [list(p) if not isinstance(p, str) else tokenizer(p, add_special_tokens=False)["input_ids"]
               for p in prompts]
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))  # longest first: OOM shows at once
    stops = stop_token_ids(model, tokenizer)
    pad = tokenizer.pad_token_id
    n = len(encoded)
    texts: list[str] = [""] * n
    latency, compute, new_tokens = [0.0] * n, [0.0] * n, [0] * n
    truncated = 0
    on_cuda = device.type == "cuda"
    if on_cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    was_training = model.training
    model.eval()
    one_by_one = fast and batch_size == 1
    lookup = lookup if lookup is not None else AnswerLookup()
    extra = {"forwards": 0, "drafted": 0, "accepted": 0} if one_by_one else {}
    started = time.perf_counter()
    with _RssSampler() as rss, torch.inference_mode():
        # one of the two loops runs: one by one in the caller's order (earlier answers feed later drafts), or batched
        for i in range(n) if one_by_one else ():
            t0 = time.perf_counter()
            done = decode(model, encoded[i], max_new_tokens=max_new_tokens, stops=stops,
                          lookup=lookup.sequences(), guide=guides[i] if guides else None)
            if on_cuda:
                torch.cuda.synchronize(device)
            latency[i] = compute[i] = (time.perf_counter() - t0) * 1000
            lookup.add(done.with_stop())
            texts[i] = tokenizer.decode(done.tokens, skip_special_tokens=skip_special_tokens)
            new_tokens[i] = len(done.tokens)
            truncated += int(not done.stopped)
            for key in extra:
                extra[key] += getattr(done, key)
            if progress:
                progress(i + 1)
        for start in range(0, 0 if one_by_one else n, batch_size):
            idx = order[start:start + batch_size]
            width = max(len(encoded[i]) for i in idx)
            ids = torch.full((len(idx), width), pad, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for row, i in enumerate(idx):
                seq = encoded[i]
                if seq:
                    ids[row, width - len(seq):] = torch.tensor(seq, dtype=torch.long)
                    mask[row, width - len(seq):] = 1
            t0 = time.perf_counter()
            out = model.generate(
                input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                do_sample=False, num_beams=1, pad_token_id=pad,
                eos_token_id=sorted(stops) or None,
                # generation_config may carry sampling settings; greedy must not warn about or use them
                temperature=None, top_p=None, top_k=None,
                logits_processor=_guided([guides[i] for i in idx], width) if guides else None,
            )
            if on_cuda:
                torch.cuda.synchronize(device)
            batch_ms = (time.perf_counter() - t0) * 1000
            for row, i in enumerate(idx):
                gen = out[row, width:].tolist()
                cut = next((k for k, t in enumerate(gen) if t in stops), None)
                if cut is None:
                    truncated += int(len(gen) >= max_new_tokens)
                    cut = len(gen)
                texts[i] = tokenizer.decode(gen[:cut], skip_special_tokens=skip_special_tokens)
                new_tokens[i] = cut
                latency[i] = batch_ms
                compute[i] = batch_ms / len(idx)
            if progress:
                progress(min(start + batch_size, n))
    total = time.perf_counter() - started
    if was_training:
        model.train()
    if on_cuda:
        peak, kind = torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_allocated"
    else:
        peak, kind = rss.peak / 2**20, "rss"
    return GenerationResult(
        texts=texts, latency_ms=latency, compute_ms=compute, new_tokens=new_tokens,
        prompt_tokens=[len(e) for e in encoded], total_s=total,
        tokens_per_s=sum(new_tokens) / total if total > 0 else 0.0, peak_memory_mb=peak, memory_kind=kind,
        device=device.type, batch_size=batch_size, max_new_tokens=max_new_tokens, truncated=truncated,
        extra=extra,
    )


def guides_for(model: Any, tokenizer: Any, requests: Sequence[dict[str, Any]]) -> list[Guide | None] | None:
    """One tool-call guide per request (None where it offers no tools); None when no request has one."""
    stops = stop_token_ids(model, tokenizer)
    guides = [Guide.for_request(tokenizer, r, stops) for r in requests]
    return guides if any(g is not None for g in guides) else None


def _guided(guides: Sequence[Guide | None], width: int) -> Any:
    """A logits processor list applying each row's guide (rows are left-padded to ``width`` prompt tokens)."""
    from transformers import LogitsProcessor, LogitsProcessorList

    class _Guides(LogitsProcessor):
        def __call__(self, input_ids, scores):
            fed = input_ids.shape[1] - width  # tokens generated so far
            for row, guide in enumerate(guides):
                if guide is None:
                    continue
                if fed:
                    guide.advance(int(input_ids[row, -1]))
                guide.mask(scores[row])
            return scores

    return LogitsProcessorList([_Guides()]) if any(g is not None for g in guides) else None


def load_model(model: str | Path | None = None, adapter: str | Path | None = None, *, device: str = "auto"):
    """``(model, tokenizer, resolved)`` for a base model, optionally with a PEFT adapter on top."""
    from slmigrate import models

    loaded, tokenizer, resolved = models.load(model, device=device)
    if adapter is not None:
        loaded = attach_adapter(loaded, adapter)
    return loaded, tokenizer, resolved


def attach_adapter(model: Any, adapter: str | Path) -> Any:
    """Wrap ``model`` with the PEFT adapter in ``adapter`` (note: peft injects its layers into ``model``)."""
    from peft import PeftModel

    path = Path(adapter)
    if not (path / "adapter_config.json").exists():
        raise SlmigrateError(f"{path} is not a PEFT adapter folder (no adapter_config.json); run "
                             "`slmigrate finetune` for this cluster first")
    wrapped = PeftModel.from_pretrained(model, str(path))
    wrapped.eval()
    return wrapped
