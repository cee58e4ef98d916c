"""Measured replaceability per task: how predictable the LLM's answers are from the task's own calls.

The cluster stage's replaceability is a hand-set prior (+0.3 for structured output, ...). This stage measures,
per cluster, on held-out calls (the curated validation and test splits, never the train split the answers are
taken from - the split is by session, so nothing leaks):

- ``neighbour``: answer each held-out call with the recorded answer of its most similar *train* call (TF-IDF
  cosine over the request's latest turns) and score it against the real answer with the evaluate stage's
  primary metric for the cluster's output kind. If copying a neighbour already agrees 90% of the time, a
  specialist trained on those calls will too; cheap enough for every call of an audit.
- ``fewshot``: the local small model (SmolLM2-135M by default) answers a small sample, shown the nearest train
  calls as worked examples; its compute time prices the small model for the headline.
- ``lora``: a budgeted LoRA fine-tune (``[probe] lora_steps`` steps on a sample of the train split, in memory,
  with ``[finetune]``'s settings) answers held-out calls as ``evaluate`` would: the estimate closest to what the
  trained specialist will score. It runs when CUDA is present, or on a CPU when asked (``probe --lora``, minutes
  per task); otherwise the result says why it did not run.

Each figure comes with a 95% interval: Wilson's for 0/1 metrics (exact match), a percentile bootstrap of the
mean for graded ones (ROUGE-L), or Hoeffding's bound for fewer than 30 graded scores (where a bootstrap of two
equal scores would claim certainty). A task counts as replaceable when the better probe reaches the evaluate
stage's threshold for its kind (the probe with the higher lower bound is the task's figure); the share of calls
and cost that could move is given with the interval from the tasks whose lower / upper bound reach it.

Writes ``probe/probe.json`` and the manifest ``probe``.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from slmigrate import artifacts
from slmigrate.evaluate import metrics as M
from slmigrate.config import Config
from slmigrate.errors import SlmigrateError
from slmigrate.progress import Progress
from slmigrate.results import StageOutput
from slmigrate.stats import estimate
from slmigrate.workspace import Workspace, fingerprint_of

METHOD_VERSION = "probe2"  # probe2: tasks without held-out calls are probed across their sessions
POOL_CAP = 5000  # train calls per task searched for neighbours: plenty for a task, bounded for huge logs
TURN_CHARS = 4000  # request text compared: the end of the conversation, where the task's input is


# --- the calls of each task ------------------------------------------------------------------------------------

@dataclass
class _Call:
    id: str
    request: dict[str, Any]
    answer: dict[str, Any]
    text: str  # what neighbours are found by
    session: str = ""  # a task without held-out calls is probed across its own sessions (``split_by_session``)

    @property
    def messages(self) -> list[dict[str, Any]]:  # what evaluate.with_examples reads of an example
        return list(self.request.get("messages") or [])

    @property
    def tools(self) -> list[dict[str, Any]]:  # with ``messages``, what fine-tuning's example builder reads
        return list(self.request.get("tools") or [])


def request_text(request: dict[str, Any]) -> str:
    """The end of the conversation as text: the turns that decide the answer, not the shared system prompt."""
    from slmigrate.usage import counted_text

    turns = [m for m in request.get("messages") or [] if isinstance(m, dict) and m.get("role") != "system"]
    return "\n".join(counted_text(m) for m in turns[-4:])[-TURN_CHARS:]


def _rank(call_id: str, seed: int) -> int:
    return int.from_bytes(hashlib.blake2b(f"{seed}:{call_id}".encode(), digest_size=8).digest(), "big")


class _Sample:
    """The ``cap`` calls with the smallest seeded hash of their id: a fixed random sample, whatever the order."""

    def __init__(self, cap: int):
        self.cap, self.heap = cap, []  # max-heap on rank via negation

    def offer(self, rank: int, make: Callable[[], _Call]) -> None:
        if len(self.heap) < self.cap:
            heapq.heappush(self.heap, (-rank, make()))
        elif -self.heap[0][0] > rank:
            heapq.heapreplace(self.heap, (-rank, make()))

    def calls(self) -> list[_Call]:
        return [c for _, c in sorted(self.heap, key=lambda rc: (-rc[0], rc[1].id))]


def _iter_rows(ws: Workspace) -> Iterator[dict[str, Any]]:
    from slmigrate.curate import dataset as curated

    for part in curated.iter_batches(ws, ["id", "session", "split", "request", "response"]):
        for i in range(len(part["id"])):
            yield {k: part[k][i] for k in part}


def task_calls(ws: Workspace, clusters: set[str], held_out_cap: int, seed: int
               ) -> tuple[dict[str, list[_Call]], dict[str, list[_Call]]]:
    """Per cluster: (train pool, held-out sample), calls with an answer only, in one pass over the dataset."""
    assigned = ws.store.clusters_of()
    pools = {c: _Sample(POOL_CAP) for c in clusters}
    held = {c: _Sample(held_out_cap) for c in clusters}
    for row in _iter_rows(ws):
        cid = assigned.get(row["id"])
        if cid not in pools:
            continue
        target = pools[cid] if row["split"] == "train" else held[cid]

        def make(row=row) -> _Call:
            request = json.loads(row["request"])
            choices = (json.loads(row["response"]) or {}).get("choices") or [{}]
            return _Call(row["id"], request, choices[0].get("message"), request_text(request), row["session"] or "")

        rank = _rank(row["id"], seed)
        if len(target.heap) >= target.cap and -target.heap[0][0] <= rank:
            continue  # not in the sample: skip parsing its JSON
        call = make()
        if call.answer is not None:
            target.offer(rank, lambda call=call: call)
    return ({c: s.calls() for c, s in pools.items()}, {c: s.calls() for c, s in held.items()})


def split_by_session(pool: list[_Call], seed: int) -> tuple[list[_Call], list[_Call]]:
    """(pool, queries) from a task's train calls alone, for a task whose sessions all landed in the train split
    (small tasks): a seeded third of its sessions is held out, so no query finds a call of its own session;
    ``([...], [])`` when the calls come from one session (nothing can be held out without leaking)."""
    sessions = sorted({c.session for c in pool}, key=lambda s: _rank(s, seed))
    if len(sessions) < 2:
        return pool, []
    held = set(sessions[:max(1, len(sessions) // 3)])
    return [c for c in pool if c.session not in held], [c for c in pool if c.session in held]


def nearest(pool: list[_Call], queries: list[_Call], k: int = 1) -> list[list[int]]:
    """Per query, the indices of its ``k`` most similar pool calls (TF-IDF cosine, fitted on the pool only)."""
    import numpy as np
    from sklearn.feature_extraction.text import TfidfVectorizer

    if not pool or not queries:
        return [[] for _ in queries]
    vec = TfidfVectorizer(sublinear_tf=True, token_pattern=r"(?u)\b\w+\b", max_features=50_000)
    try:
        p = vec.fit_transform([c.text for c in pool])
    except ValueError:  # no words anywhere: every pool call is as near as any other
        return [list(range(min(k, len(pool)))) for _ in queries]
    q = vec.transform([c.text for c in queries])
    out = []
    for start in range(0, len(queries), 256):
        sims = (q[start:start + 256] @ p.T).toarray()
        order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
        out.extend(order.tolist())
    return out


# --- the probes ------------------------------------------------------------------------------------------------

def _score(kind: str, metric: str, predictions: list[Any], queries: list[_Call]) -> list[float | None]:
    scores = M.score(kind, predictions, [q.answer for q in queries], M.MetricContext([q.request for q in queries]),
                     only=[metric])
    return scores.items.get(metric, [None] * len(queries))


def neighbour_probe(kind: str, metric: str, pool: list[_Call], queries: list[_Call], links: list[list[int]],
                    seed: int) -> dict[str, Any]:
    if not pool:
        return {"skipped": True, "reason": "no train calls with an answer in this task"}
    if not queries:
        return {"skipped": True, "reason": "no held-out (validation/test) calls with an answer in this task"}
    found = estimate(_score(kind, metric, [pool[ix[0]].answer for ix in links], queries), seed)
    return found or {"skipped": True, "reason": f"{metric} is out of scope for every held-out call"}


class _SmallModel:
    """The few-shot probe's model, loaded on first use and shared by every task."""

    def __init__(self, name: str | None):
        self.name, self.loaded = name, None

    def get(self):
        if self.loaded is None:
            from slmigrate.evaluate.generate import load_model

            self.loaded = load_model(self.name, device="auto")
        return self.loaded


def fewshot_probe(kind: str, metric: str, pool: list[_Call], queries: list[_Call], links: list[list[int]],
                  cfg: Any, small: _SmallModel, seed: int) -> dict[str, Any]:
    from slmigrate.evaluate import run as E
    from slmigrate.evaluate.generate import generate, max_new_tokens_for

    model, tokenizer, resolved = small.get()
    requests = [E.with_examples(q.request, [pool[i] for i in ix[:cfg.fewshot_examples]])
                for q, ix in zip(queries, links)]
    prompts = [_fit(tokenizer, E.render(tokenizer, r, cfg.fewshot_prompt_tokens), cfg.fewshot_prompt_tokens)
               for r in requests]
    max_new = max_new_tokens_for(tokenizer, [E.answer_text(q.answer) for q in queries],
                                 cap=cfg.fewshot_max_new_tokens)
    gen, threads = _generate_one_thread(model, tokenizer, prompts, max_new) if gen_device(model) == "cpu" else \
        (generate(model, tokenizer, prompts, batch_size=1, max_new_tokens=max_new), None)
    found = estimate(_score(kind, metric, [E.parse(t) for t in gen.texts], queries), seed)
    if found is None:
        return {"skipped": True, "reason": f"{metric} is out of scope for every sampled call"}
    return {**found, "model": str(resolved.hub_id or resolved.path), "device": gen.device,
            "compute_ms_per_call": round(sum(gen.compute_ms) / len(gen.compute_ms), 1),
            "latency_p50_ms": round(sorted(gen.latency_ms)[len(gen.latency_ms) // 2], 1),
            "truncated": gen.truncated, "prompt_tokens_kept": cfg.fewshot_prompt_tokens, "cpu_threads": threads}


def gen_device(model: Any) -> str:
    return next(model.parameters()).device.type


def _generate_one_thread(model: Any, tokenizer: Any, prompts: list[list[int]], max_new: int):
    """Generate on one CPU thread. One call at a time on a 135M model gains little from a second thread, and on
    a machine busy with other work torch's threads spin-wait on each other: 64 new tokens after a 1,024-token
    prompt took 54 s on two threads and 9 s on one on the team's loaded 2-core box."""
    import torch

    from slmigrate.evaluate.generate import generate

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return generate(model, tokenizer, prompts, batch_size=1, max_new_tokens=max_new), 1
    finally:
        torch.set_num_threads(before)


def _fit(tokenizer: Any, text: str, budget: int) -> list[int]:
    """The prompt's token ids within ``budget``: rendering drops old turns but keeps the system prompt, which on
    agents is often thousands of tokens of policy; its middle goes too (head and tail stay), or one CPU call
    takes minutes."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) <= budget:
        return ids
    head = min(256, budget // 4)
    return ids[:head] + ids[len(ids) - (budget - head):]


def lora_skip_reason(mode: str) -> str | None:
    """Why the LoRA probe does not run here, or None when it does."""
    import torch

    if mode == "off":
        return 'turned off ([probe] lora = "off")'
    if mode == "auto" and not torch.cuda.is_available():
        return ("runs when a GPU is present; on this CPU with `slmigrate probe --lora` ([probe] lora = \"on\"), "
                "a few minutes per task")
    return None


def lora_probe(kind: str, metric: str, pool: list[_Call], queries: list[_Call], config: Config) -> dict[str, Any]:
    """Fine-tune the task's small model for a budget of steps on a sample of its train calls, in memory, and score
    its answers to held-out calls: the closest a probe gets to what ``finetune`` + ``evaluate`` will measure,
    through the same training (``finetune.train_budgeted``) and the same generation and scoring
    (``evaluate.evaluate_variant``)."""
    from slmigrate import finetune as F
    from slmigrate import models
    from slmigrate.evaluate import run as E
    from slmigrate.evaluate.generate import max_new_tokens_for

    cfg = config.probe
    if not queries:
        return {"skipped": True, "reason": "no held-out (validation/test) calls with an answer in this task"}
    train = pool[:cfg.lora_train_calls]
    val = pool[cfg.lora_train_calls:cfg.lora_train_calls + 16]  # early stopping and best weights, as finetune
    method = "qlora" if config.finetune.method == "qlora" else "lora"
    ft = config.finetune.model_copy(update={"method": method})
    name = cfg.model or config.finetune.model or models.DEFAULT_MODEL
    trained = F.train_budgeted(name, train, val, ft, cfg.lora_steps)
    if trained is None:
        return {"skipped": True, "reason": f"fewer than [finetune] min_examples = {ft.min_examples} train calls"}
    asked = queries[:cfg.lora_test_calls]
    max_new = max_new_tokens_for(trained.tokenizer, [E.answer_text(q.answer) for q in asked],
                                 cap=config.evaluate.max_new_tokens)
    ctx = M.MetricContext([q.request for q in asked])
    found = E.evaluate_variant(trained.model, trained.tokenizer, asked, kind, config=config.evaluate,
                               prices=config.prices, llm_cost=None, ctx=ctx, max_new_tokens=max_new,
                               static=trained.static)
    scores = [item.get(metric) for item in found["_items"]]
    figure = estimate(scores, cfg.seed)
    if figure is None:
        return {"skipped": True, "reason": f"{metric} is out of scope for every sampled call"}
    return {**figure, "model": name, "method": method, "steps": trained.steps, "train_calls": trained.examples,
            "train_seconds": trained.seconds, "final_train_loss": trained.final_train_loss,
            "latency_p50_ms": found["efficiency"].get("latency_p50_ms")}


def best(result: dict[str, Any]) -> dict[str, Any] | None:
    """The measured figure of a task: the probe with the higher lower bound (each is a floor a specialist can
    reach; ranking by the point score would let 2 lucky few-shot calls outvote 300 neighbour calls)."""
    found = [(name, result[name]) for name in ("neighbour", "fewshot", "lora") if not result[name].get("skipped")]
    if not found:
        return None
    name, figure = max(found, key=lambda nf: (nf[1]["low"], nf[1]["score"], nf[1]["n"]))
    return {"probe": name, **{k: figure[k] for k in ("score", "low", "high", "n", "interval")}}


def _shares(tasks: list[dict[str, Any]], total_calls: int, total_cost: float) -> dict[str, Any]:
    """Share of calls and cost in tasks whose measured score (its low / high bound) reaches the threshold."""
    out: dict[str, Any] = {}
    for key, bound in (("value", "score"), ("low", "low"), ("high", "high")):
        moving = [t for t in tasks if t["measured"] and t["measured"][bound] >= t["threshold"]]
        calls = sum(t["size"] for t in moving)
        cost = sum(t["cost_usd"] for t in moving)
        out.setdefault("calls_share", {})[key] = round(calls / total_calls, 4) if total_calls else 0.0
        out.setdefault("cost_share", {})[key] = round(cost / total_cost, 4) if total_cost > 0 else None
        out.setdefault("cost_usd", {})[key] = round(cost, 6)
        if key == "value":
            out["replaceable_clusters"] = [t["cluster"] for t in moving]
    return out


# --- the stage -------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ProbeResult(StageOutput):
    """``probe``'s result; ``to_dict()`` is probe.json's body with ``skipped``."""

    clusters: list[dict[str, Any]]
    overall: dict[str, Any]
    calls: int = 0
    cost_usd: float = 0.0
    skipped: bool = False  # the clusters and settings are unchanged: this is the stored probe


def probe(ws: Workspace, config: Config | None = None, *, progress: Progress | None = None,
          force: bool = False) -> ProbeResult:
    """Probe every cluster; skipped when the clusters and the probe's settings are unchanged.

    ``config`` is the whole config: the probe reads [probe] and [evaluate] (metrics, thresholds, model)."""
    from slmigrate.curate import dataset as curated
    from slmigrate.evaluate.run import cluster_kind

    config = config or Config()
    cfg = config.probe
    body = artifacts.clusters_file(ws, required=False)
    if body is None:
        raise SlmigrateError(f"no clusters in {ws.root}; run `slmigrate cluster` first, then `slmigrate probe`")
    # Clusters written without the cluster stage (`python -m slmigrate.collect.bfcl` makes one task by hand) have no
    # manifest: their file's text stands for them.
    clusters_manifest = ws.manifest("cluster")
    clusters_id = (clusters_manifest["fingerprint"] if clusters_manifest is not None
                   else fingerprint_of(artifacts.text(ws, artifacts.CLUSTERS)))
    import torch

    fingerprint = fingerprint_of(METHOD_VERSION, curated.current_version(ws), clusters_id,
                                 cfg.model_dump(), config.evaluate.primary, config.evaluate.threshold,
                                 torch.cuda.is_available(),
                                 # the LoRA probe trains with [finetune]'s settings and answers as evaluate does
                                 [config.finetune.model_dump(), config.evaluate.fingerprint_dump()]
                                 if lora_skip_reason(cfg.lora) is None else None)
    stored = ws.probe() if not force and ws.is_fresh("probe", fingerprint) else None
    if stored is not None:
        return ProbeResult.of({**stored, "skipped": True})
    started = time.time()
    known = {c["id"]: c for c in body["clusters"]}
    pools, held = task_calls(ws, set(known), cfg.neighbour_calls, cfg.seed)
    small = _SmallModel(cfg.model or config.evaluate.model)
    fewshot_left = cfg.fewshot_total if cfg.fewshot_calls else 0
    lora_skip = lora_skip_reason(cfg.lora)
    lora_left = cfg.lora_tasks
    tasks = []
    order = sorted(known, key=lambda c: (-int(known[c].get("size") or 0), c))  # biggest first get few-shot calls
    for n, cid in enumerate(order):
        info = known[cid]
        kind = cluster_kind(info)
        metric = M.primary_metric(kind, config.evaluate.primary)
        pool, queries = pools[cid], held[cid]
        held_out = "validation + test splits"
        if not queries:
            pool, queries = split_by_session(pool, cfg.seed)
            held_out = "a third of the task's train sessions (it has no validation or test calls)"
        links = nearest(pool, queries, k=max(1, cfg.fewshot_examples))
        result: dict[str, Any] = {
            "cluster": cid, "label": info.get("label"), "kind": kind, "metric": metric,
            "threshold": config.evaluate.threshold.get(kind, 0.9), "size": int(info.get("size") or 0),
            "cost_usd": float(info.get("cost_usd") or 0.0), "train_calls": len(pool), "held_out_calls": len(queries),
            "held_out": held_out,
            "prior": info.get("replaceability"),
            "neighbour": neighbour_probe(kind, metric, pool, queries, links, cfg.seed),
        }
        take = min(cfg.fewshot_calls, fewshot_left, len(queries))
        if not cfg.fewshot_calls:
            result["fewshot"] = {"skipped": True, "reason": "turned off (`--no-fewshot` or [probe] fewshot_calls = 0)"}
        elif not pool or not take:
            result["fewshot"] = {"skipped": True, "reason": "no train examples" if not pool else
                                 "no held-out calls" if not queries else
                                 f"the few-shot budget ([probe] fewshot_total = {cfg.fewshot_total}) went to "
                                 "bigger tasks"}
        else:
            result["fewshot"] = fewshot_probe(kind, metric, pool, queries[:take], links[:take], cfg, small,
                                              cfg.seed)
            fewshot_left -= take
        if lora_skip:
            result["lora"] = {"skipped": True, "reason": lora_skip}
        elif cfg.lora_clusters and cid not in cfg.lora_clusters:
            result["lora"] = {"skipped": True, "reason": "not among [probe] lora_clusters (`probe --cluster`)"}
        elif not lora_left:
            result["lora"] = {"skipped": True, "reason": f"the LoRA probe trains the {cfg.lora_tasks} biggest tasks "
                                                         "([probe] lora_tasks)"}
        else:
            result["lora"] = lora_probe(kind, metric, pool, queries, config)
            lora_left -= 1
        result["measured"] = best(result)
        result["replaceable"] = bool(result["measured"] and result["measured"]["score"] >= result["threshold"])
        tasks.append(result)
        if progress:
            progress("tasks", n + 1, len(order))
    out = {
        "method": {"version": METHOD_VERSION, "similarity": "TF-IDF cosine of the last 4 turns",
                   "held_out": "validation + test splits", "pool": "train split", "confidence": 0.95},
        "calls": int(body.get("calls") or 0), "cost_usd": float(body.get("cost_usd") or 0.0),
        "clusters": tasks, "overall": _shares(tasks, int(body.get("calls") or 0), float(body.get("cost_usd") or 0)),
        "duration_s": round(time.time() - started, 2),
    }
    artifacts.write_probe(ws, out)
    ws.write_manifest("probe", fingerprint=fingerprint, config=cfg.model_dump(), started=started,
                      counts={"clusters": len(tasks), "replaceable": len(out["overall"]["replaceable_clusters"]),
                              "fewshot_calls": cfg.fewshot_total - fewshot_left if cfg.fewshot_calls else 0})
    return ProbeResult.of({**out, "skipped": False})

