"""Paper step S4: choose candidate small models per task (cluster).

For each cluster in ``clusters/clusters.json`` every catalogue model is either rejected, with the reason, or
scored and ranked:

1. hard filters - ``--max-params``; the licence policy (``permissive`` | ``commercial`` | ``any`` | SPDX list);
   the context window against the cluster's p95 prompt + p95 completion tokens; and the hardware: it must both
   fine-tune and serve at that sequence length in the memory given (``--cpu-only``: LoRA on fp32 weights in host
   RAM; ``--gpu-memory GB``: LoRA on bf16 weights, or QLoRA on 4-bit weights when LoRA does not fit). Memory
   comes from ``slmigrate.catalog.footprint``.
2. score = capability - size penalty. Capability is a weighted mean (0-100) of published benchmarks chosen by
   what the task's output needs (``WEIGHTS``); a benchmark a model has no published figure for counts as the
   lowest published figure in the catalogue, so a gap never helps. The size penalty, ``SIZE_PENALTY[kind]``
   points per doubling of parameters above 100M, stands for training/serving cost and latency: narrow outputs
   (labels, JSON) are learnable by small models after fine-tuning, so size costs them more.
3. the best ``--top`` stay as candidates; ``--probe N`` runs those whose weights are on this machine on N
   validation calls of the cluster, zero-shot and few-shot, scores them with the evaluate stage's primary
   metric, and blends the better of the two into the score (``PROBE_WEIGHT``).

The result is written to ``<workspace>/selection.json`` (schema in docs/select.md); finetune takes each
cluster's ``choice``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from slmigrate import artifacts
from slmigrate import catalog as cat
from slmigrate.artifacts import ClusterInfo, SelectionFile
from slmigrate.config import SelectConfig
from slmigrate.errors import SlmigrateError
from slmigrate.progress import Progress
from slmigrate.record import now_iso
from slmigrate.results import StageOutput
from slmigrate.workspace import Workspace, fingerprint_of

KINDS = ("tool_call", "json", "label", "text")
DEFAULT_SEQ_LEN = 2048
MIN_SEQ_LEN = 64

# What each kind of output needs, as weights over benchmarks; "tools" is native tool calling in the chat
# template (100 or 0).
WEIGHTS: dict[str, dict[str, float]] = {
    "tool_call": {"bfcl": 0.45, "tools": 0.15, "ifeval": 0.25, "mmlu": 0.15},
    "json": {"ifeval": 0.50, "humaneval": 0.20, "bfcl": 0.15, "mmlu": 0.15},
    "label": {"ifeval": 0.40, "mmlu": 0.40, "gsm8k": 0.20},
    "text": {"mmlu": 0.45, "ifeval": 0.30, "gsm8k": 0.25},
}
SIZE_PENALTY = {"tool_call": 6.0, "json": 10.0, "label": 12.0, "text": 4.0}
PROBE_WEIGHT = 0.5  # share of the final score taken by a measured probe result, when there is one
GIB_FMT = "{:.1f}"


# --- inputs ----------------------------------------------------------------------------------------------------

def load_clusters(ws: Workspace) -> list[ClusterInfo]:
    """The cluster stage's tasks; an error when there are none to pick a model for."""
    found = ws.clusters()
    if not found:
        raise SlmigrateError(f"the cluster stage found no recurring task in {ws.root}; run `slmigrate cluster` "
                             "on more calls (or with a smaller --min-size)")
    return found


def _num(*values: Any) -> float | None:
    for v in values:
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return float(v)
    return None


def cluster_needs(c: ClusterInfo) -> tuple[str, int, bool]:
    """(output kind, tokens a call needs: p95 prompt + p95 completion, whether the tokens were known)."""
    kind = c.get("output_kind", "text")
    kind = kind if kind in KINDS else "text"
    prompt = _num(c.get("prompt_tokens", {}).get("p95"))
    completion = _num(c.get("completion_tokens", {}).get("p95"))
    if prompt is None:  # a cluster file without token figures (bfcl.prepare's)
        return kind, DEFAULT_SEQ_LEN, False
    return kind, max(MIN_SEQ_LEN, int(math.ceil(prompt + (completion or 0)))), True


# --- policy ----------------------------------------------------------------------------------------------------

def license_filter(policy: str) -> tuple[Callable[[cat.ModelEntry], bool], str]:
    """A predicate over entries for ``--license`` and its description for reasons."""
    p = (policy or "permissive").strip()
    low = p.lower()
    if low == "any":
        return (lambda e: True), "any licence"
    if low == "permissive":
        return (lambda e: e.permissive), "permissive licences (" + ", ".join(
            k for k, v in cat.LICENSES.items() if v["permissive"]) + ")"
    if low == "commercial":
        return (lambda e: e.commercial_use), "licences allowing commercial use"
    wanted = {x.strip().lower() for x in p.split(",") if x.strip()}
    known = {k.lower(): k for k in cat.LICENSES}
    unknown = sorted(wanted - set(known))
    if unknown:
        raise SlmigrateError(f"--license {p!r}: unknown licence id(s) {', '.join(unknown)}; use permissive, "
                             f"commercial, any, or a comma-separated list of {', '.join(sorted(cat.LICENSES))}")
    return (lambda e: e.license.lower() in wanted), "licences " + ", ".join(known[w] for w in sorted(wanted))


def hardware(config: SelectConfig) -> dict[str, Any]:
    if config.cpu_only and config.gpu_memory_gb is not None:
        raise SlmigrateError("--cpu-only and --gpu-memory contradict each other; pass one of them")
    if config.gpu_memory_gb is not None:
        if config.gpu_memory_gb <= 0:
            raise SlmigrateError(f"--gpu-memory {config.gpu_memory_gb}: expected a positive number of GB")
        return {"device": "cuda", "memory_gib": float(config.gpu_memory_gb)}
    # No GPU named: plan for the CPU machine slmigrate always runs on (explicit --cpu-only or the default).
    return {"device": "cpu", "memory_gib": float(config.cpu_memory_gb)}


def fit(entry: cat.ModelEntry, seq_len: int, hw: dict[str, Any]) -> tuple[str | None, dict[str, float], str]:
    """(method or None, memory figures, one-line explanation) for training and serving on ``hw``."""
    fp = entry.footprint(seq_len)
    mem = hw["memory_gib"]
    at = f"at {seq_len:,} tokens"
    if hw["device"] == "cpu":
        need = {"train_gib": fp.lora_cpu, "serve_gib": fp.serve_cpu}
        if fp.lora_cpu <= mem and fp.serve_cpu <= mem:
            return "lora", need, f"LoRA fp32 on CPU needs {fp.lora_cpu:.1f} of {mem:g} GiB {at}"
        return None, need, (f"LoRA fp32 on CPU needs {fp.lora_cpu:.1f} GiB (serving {fp.serve_cpu:.1f}) "
                            f"> {mem:g} GiB {at}")
    if fp.lora_gpu <= mem and fp.serve_gpu_bf16 <= mem:
        need = {"train_gib": fp.lora_gpu, "serve_gib": fp.serve_gpu_bf16}
        return "lora", need, f"LoRA bf16 needs {fp.lora_gpu:.1f} of {mem:g} GiB GPU {at}"
    if fp.qlora_gpu <= mem and fp.serve_gpu_4bit <= mem:
        need = {"train_gib": fp.qlora_gpu, "serve_gib": fp.serve_gpu_4bit}
        return "qlora", need, (f"QLoRA 4-bit needs {fp.qlora_gpu:.1f} of {mem:g} GiB GPU {at} "
                               f"(LoRA bf16 would need {fp.lora_gpu:.1f})")
    need = {"train_gib": fp.qlora_gpu, "serve_gib": fp.serve_gpu_4bit}
    return None, need, f"even QLoRA 4-bit needs {fp.qlora_gpu:.1f} GiB > {mem:g} GiB GPU {at}"


def _floors(entries: list[cat.ModelEntry]) -> dict[str, float]:
    floors = {}
    for bench in cat.BENCHMARKS:
        vals = [e.score(bench) for e in entries if e.score(bench) is not None]
        floors[bench] = min(vals) if vals else 0.0
    return floors


def capability(entry: cat.ModelEntry, kind: str, floors: dict[str, float]) -> tuple[float, str]:
    """Weighted benchmark score for ``kind`` (0-100) and the evidence behind it, for the reason line."""
    total, parts = 0.0, []
    for bench, w in WEIGHTS[kind].items():
        if bench == "tools":
            total += w * (100.0 if entry.native_tools else 0.0)
            parts.append("native tools" if entry.native_tools else "no native tools")
            continue
        value = entry.score(bench)
        name = cat.BENCHMARK_NAMES[bench]
        if value is None:
            total += w * floors[bench]
            parts.append(f"{name} n/a")
        else:
            total += w * value
            parts.append(f"{name} {value:g}")
    return total, ", ".join(parts)


def size_penalty(entry: cat.ModelEntry, kind: str) -> float:
    return SIZE_PENALTY[kind] * max(0.0, math.log2(entry.params / 1e8))


def _params_text(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.0f}M"


# --- the stage -------------------------------------------------------------------------------------------------

def rank_cluster(c: ClusterInfo, entries: list[cat.ModelEntry], config: SelectConfig, hw: dict[str, Any],
                 licence_ok: Callable[[cat.ModelEntry], bool], licence_text: str,
                 floors: dict[str, float]) -> dict[str, Any]:
    kind, seq_len, known = cluster_needs(c)
    ranked, rejected = [], []
    for e in entries:
        if config.max_params is not None and e.params > config.max_params:
            rejected.append({"name": e.name, "reason": f"{_params_text(e.params)} parameters > --max-params "
                                                       f"{_params_text(int(config.max_params))}"})
            continue
        if not licence_ok(e):
            use = "commercial use allowed" if e.commercial_use else "no commercial use"
            rejected.append({"name": e.name, "reason": f"licence {e.license} ({use}) is not among {licence_text}"})
            continue
        if e.context_window < seq_len:
            rejected.append({"name": e.name, "reason": f"context window {e.context_window:,} < p95 prompt + "
                                                       f"completion {seq_len:,} tokens"})
            continue
        method, need, fit_text = fit(e, seq_len, hw)
        if method is None:
            rejected.append({"name": e.name, "reason": fit_text})
            continue
        cap, evidence = capability(e, kind, floors)
        penalty = size_penalty(e, kind)
        ranked.append({
            "name": e.name, "hub_id": e.hub_id, "params": e.params, "license": e.license,
            "method": method, "device": hw["device"], "seq_len": seq_len,
            "train_memory_gib": round(need["train_gib"], 2), "serve_memory_gib": round(need["serve_gib"], 2),
            "capability": round(cap, 2), "size_penalty": round(penalty, 2), "score": round(cap - penalty, 2),
            "evidence": evidence, "fit": fit_text,
        })
    ranked.sort(key=lambda r: (-r["score"], r["params"], r["name"]))
    for i, r in enumerate(ranked, 1):
        r["rank"] = i
        r["reason"] = (f"{kind} task: {r['evidence']} (capability {r['capability']:.1f}); "
                       f"{_params_text(r['params'])} params, size penalty {r['size_penalty']:.1f}; {r['fit']}")
    top, rest = ranked[:config.top], ranked[config.top:]
    for r in rest:
        rejected.append({"name": r["name"], "reason": f"fits ({r['fit']}), but ranked {r['rank']} of "
                                                      f"{len(ranked)} (score {r['score']:.1f}) below --top "
                                                      f"{config.top}"})
    return {
        "cluster": c["id"], "label": c.get("label") or c.get("group"), "output_kind": kind,
        "size": c.get("size", c.get("calls")), "seq_len": seq_len, "tokens_known": known,
        "candidates": top, "rejected": rejected,
        "choice": top[0]["name"] if top else None, "choice_reason": None,
        "note": None if top else "no catalogue model passes the filters; loosen --license/--max-params or add "
                                 "memory",
        "_ranked": ranked,  # every model that passed, for the availability fallback; not saved
    }


def weights_available(name: str) -> str | None:
    """Where ``name``'s weights would come from: ``local`` (a folder, the model cache or the hub cache),
    ``builtin`` (an offline GGUF shipped in a package), ``hub`` (downloadable: the hub is switched on and
    answers), or None (needs a download this machine cannot make now). Nothing is loaded or downloaded here."""
    from slmigrate import models

    found = models.offline_weights(name)
    if found:
        return found
    return "hub" if models.hub_reachable() else None


def choose(c: dict[str, Any], weights_of: Callable[[str], str | None]) -> None:
    """Set the cluster's ``choice``: the best candidate whose weights can be had on this machine.

    Finetune trains the choice, so a top-ranked model whose weights are unobtainable (offline, not cached)
    must not be chosen over one that is; the better model stays listed with the reason.
    """
    ranked = c.pop("_ranked", [])
    for r in c["candidates"]:
        r["weights"] = weights_of(r["name"])
    usable = [r for r in c["candidates"] if r["weights"]]
    pick = usable[0] if usable else None
    if pick is None:
        for r in ranked:
            if r in c["candidates"]:
                continue
            r["weights"] = weights_of(r["name"])
            if r["weights"]:
                pick = dict(r, fallback=True)
                c["candidates"].append(pick)
                c["rejected"] = [x for x in c["rejected"] if x["name"] != pick["name"]]
                break
    if not c["candidates"]:
        c["choice"], c["choice_reason"] = None, None
        return
    top = c["candidates"][0]
    if pick is None:
        c["choice"] = top["name"]
        c["choice_reason"] = (f"no passing model's weights are on this machine and the hub is off or "
                              f"unreachable; `slmigrate models pull {top['name']}` on a connected machine first")
    elif pick is top:
        c["choice"] = top["name"]
        c["choice_reason"] = f"rank 1, weights {top['weights']}"
    else:
        c["choice"] = pick["name"]
        c["choice_reason"] = (f"{top['name']} ranks higher but its weights are not on this machine and the hub "
                              f"is off or unreachable; {pick['name']} (rank {pick['rank']}) is the best whose "
                              f"weights are ({pick['weights']})")

@dataclass(frozen=True)
class SelectResult(StageOutput):
    """``select``'s result; ``to_dict()`` is selection.json's body with ``fresh``."""

    hardware: dict[str, Any]
    license_policy: str
    clusters: list[dict[str, Any]]
    probe: str | None = None  # how probe scores entered the ranking, when ``[select] probe`` is on
    fresh: bool = False  # nothing changed since the saved selection: this is it


def select(ws: Workspace, config: SelectConfig | None = None, *, progress: Progress | None = None,
           force: bool = False, probe_runner: Callable[..., dict[str, dict[str, Any]]] | None = None,
           weights_of: Callable[[str], str | None] | None = None) -> SelectResult:
    """Rank catalogue models per cluster, save ``selection.json`` and the ``select`` manifest, return it.

    ``progress`` hears of each cluster whose candidates were probed (``[select] probe``).

    ``weights_of`` (default ``weights_available``) says where a model's weights would come from; the choice
    is the best candidate that has some.
    """
    config = config or SelectConfig()
    started = time.time()
    clusters = load_clusters(ws)
    entries = list(cat.load(ws).values())
    hw = hardware(config)
    licence_ok, licence_text = license_filter(config.license)
    clusters_text = artifacts.text(ws, artifacts.CLUSTERS)
    # Which weights are obtainable decides the choice, so pulling a model later makes the selection stale.
    check = weights_of or weights_available
    weights = {e.name: check(e.name) for e in entries}
    fingerprint = fingerprint_of("select", clusters_text, config.model_dump(),
                                 [e.raw for e in entries], weights)
    cached = artifacts.selection(ws, required=False) if not force and ws.is_fresh("select", fingerprint) else None
    if cached is not None:
        return SelectResult.of({**cached, "fresh": True})
    floors = _floors(entries)
    per_cluster = [rank_cluster(c, entries, config, hw, licence_ok, licence_text, floors) for c in clusters]
    probe_note = None
    if config.probe:
        probe_note = _apply_probe(ws, per_cluster, config, probe_runner, progress)
    for c in per_cluster:
        choose(c, weights.get)
    result = {
        "version": 1,
        "created": now_iso(),
        "hardware": {**hw, "policy": "LoRA fp32 on CPU" if hw["device"] == "cpu"
                     else "LoRA bf16 on GPU, else QLoRA 4-bit"},
        "license_policy": licence_text,
        "config": config.model_dump(),
        "weights": WEIGHTS, "size_penalty": SIZE_PENALTY,
        "probe": probe_note,
        "clusters": per_cluster,
    }
    artifacts.write_selection(ws, result)
    chosen = sum(1 for c in per_cluster if c["choice"])
    ws.write_manifest("select", fingerprint=fingerprint, config=config.model_dump(),
                      counts={"clusters": len(per_cluster), "chosen": chosen, "catalogue": len(entries)},
                      started=started, extra={"artifact": artifacts.relative_name(artifacts.SELECTION)})
    result["fresh"] = False
    return SelectResult.of(result)


def load_selection(ws: Workspace) -> SelectionFile:
    """The saved selection (for finetune: ``clusters[i]["choice"]`` and ``candidates[0]``)."""
    return ws.selection()


def _apply_probe(ws: Workspace, per_cluster: list[dict[str, Any]], config: SelectConfig,
                 runner: Callable[..., dict[str, dict[str, Any]]] | None, progress: Progress | None = None) -> str:
    """Blend measured zero-/few-shot scores of locally available candidates into the ranking."""
    runner = runner or Prober(ws)
    measured_any = False
    for done, c in enumerate(per_cluster, 1):
        results = runner(ws, c, [r["name"] for r in c["candidates"]], config.probe) or {}
        for r in c["candidates"]:
            got = results.get(r["name"])
            if not got or got.get("skipped"):
                if got:
                    r["probe"] = got
                continue
            measured_any = True
            best = max(got.get("zero_shot") or 0.0, got.get("few_shot") or 0.0)  # primary metric, 0..1
            r["probe"] = got
            r["published_score"] = r["score"]
            r["score"] = round((1 - PROBE_WEIGHT) * r["score"] + PROBE_WEIGHT * 100.0 * best, 2)
            r["reason"] += (f"; probe on {got.get('calls')} calls ({got.get('metric')}): zero-shot "
                            f"{got.get('zero_shot') or 0.0:.2f}, few-shot {got.get('few_shot') or 0.0:.2f}")
        c["candidates"].sort(key=lambda r: (-r["score"], r["params"], r["name"]))
        for i, r in enumerate(c["candidates"], 1):
            r["rank"] = i
        if progress:
            progress("probing candidates", done, len(per_cluster))
    return ("probe scores blended into the ranking (score = 0.5 x published + 0.5 x 100 x best probe score)"
            if measured_any else "no candidate's weights are available locally; ranking from published figures")


class Prober:
    """Runs candidates on a cluster's validation calls, zero-shot and with examples from its train calls.

    Only weights already on this machine are used (a local folder, the model cache, the hub cache, or the
    built-in offline SmolLM2 GGUF); nothing is downloaded. Scoring is the evaluate stage's primary metric for
    the cluster's output kind, through ``evaluate.evaluate_variant``.
    """

    def __init__(self, ws: Workspace, device: str = "auto"):
        self.ws, self.device = ws, device
        self._calls: tuple[dict[str, list[Any]], dict[str, list[Any]]] | None = None

    def _by_cluster(self) -> tuple[dict[str, list[Any]], dict[str, list[Any]]]:
        if self._calls is None:
            from slmigrate.curate.dataset import current_version, load_curated

            if not current_version(self.ws):
                raise SlmigrateError("--probe needs the curated calls; run `slmigrate curate` (and `slmigrate "
                                     "cluster`) first, or drop --probe")
            calls = load_curated(self.ws)
            assigned = self.ws.store.clusters_of([c.id for c in calls])
            probe: dict[str, list[Any]] = {}
            train: dict[str, list[Any]] = {}
            for c in sorted(calls, key=lambda c: c.id):
                cid = assigned.get(c.id)
                if cid is None or c.answer is None:
                    continue
                if c.split == "train":
                    train.setdefault(str(cid), []).append(c)
                elif c.split == "validation":  # the test split stays unseen until evaluate
                    probe.setdefault(str(cid), []).append(c)
            self._calls = (probe, train)
        return self._calls

    def __call__(self, ws: Workspace, cluster: dict[str, Any], names: list[str], n: int) -> dict[str, Any]:
        import gc

        from slmigrate.evaluate import run as E
        from slmigrate.evaluate import metrics as M
        from slmigrate import models
        from slmigrate.config import EvaluateConfig, PricesConfig
        from slmigrate.evaluate.generate import max_new_tokens_for

        probe, train = self._by_cluster()
        cid = str(cluster["cluster"])
        calls = probe.get(cid, [])[:n]
        if not calls:  # no validation calls: probe on train calls beyond the ones used as examples
            calls = train.get(cid, [])[3:3 + n]
        if not calls:
            return {name: {"skipped": True, "reason": "no curated calls in this cluster"} for name in names}
        kind = cluster["output_kind"]
        ecfg = EvaluateConfig(device=self.device)
        examples = E.icl_examples([c for c in train.get(cid, []) if c not in calls], ecfg.icl_examples, ecfg.seed)
        out: dict[str, Any] = {}
        for name in names:
            resolved = _local_weights(models, name)
            if resolved is None:
                out[name] = {"skipped": True, "reason": "weights not available locally"}
                continue
            model, tokenizer, _ = models.load(str(resolved), device=self.device)
            max_new = max_new_tokens_for(tokenizer, [E.answer_text(c.answer) for c in calls],
                                         cap=ecfg.max_new_tokens)
            ctx = M.MetricContext([c.request for c in calls])
            got: dict[str, Any] = {"calls": len(calls), "metric": M.primary_metric(kind, ecfg.primary)}
            for variant, shots in (("zero_shot", ()), ("few_shot", examples)):
                if variant == "few_shot" and not shots:
                    got[variant] = None
                    continue
                res = E.evaluate_variant(model, tokenizer, calls, kind, examples=shots, config=ecfg,
                                         prices=PricesConfig(), llm_cost=None, ctx=ctx, max_new_tokens=max_new)
                got[variant] = res["primary"]
            out[name] = got
            del model, tokenizer
            gc.collect()
        return out


def _local_weights(models: Any, name: str) -> Path | None:
    """The folder of ``name``'s weights when they are on this machine (converting a built-in GGUF is local)."""
    if models.offline_weights(name) is None:
        return None
    return models.resolve(name, pull=True).path
