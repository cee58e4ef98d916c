"""Per-cluster fine-tuning (paper step S5): train a small model to answer one task the way the LLM did.

For each cluster, ``finetune_cluster`` reads top to bottom:

1. load   - resolve the model (``models.resolve``), build the cluster's examples from the curated train and
            validation splits (``data.build_examples``: chat template prompt, LLM answer, loss on the answer
            only), pick hyper-parameters by data size (``defaults``), load the base weights;
2. wrap   - LoRA / QLoRA adapters with peft (or every weight trainable for full fine-tuning);
3. train  - ``loop.train``: AdamW over length-grouped batches, checkpoints, resume, early stopping;
4. save   - ``adapters/<cluster>/<model>/``: the PEFT adapter folder (or the full model), the resolved config,
            the data fingerprint and report, metrics and a loss curve.

Which clusters and which model: ``--cluster`` ids, or ``--selected`` (the clusters ``slmigrate select`` chose
a model for), or every cluster with enough training calls. The model is ``--model``, else the cluster's
selected model, else SmolLM2-135M-Instruct (which trains on a CPU).
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from slmigrate import artifacts, chat_format, models
from slmigrate.config import FinetuneConfig
from slmigrate.errors import SlmigrateError
from slmigrate.finetune import loop
from slmigrate.finetune.data import (BuildReport, Example, build_examples, length_grouped_batches, padding_share,
                                   sample_calls)
from slmigrate.progress import Progress
from slmigrate.results import StageOutput
from slmigrate.workspace import Workspace, fingerprint_of

__all__ = ["FinetuneResult", "Trained", "defaults", "finetune", "finetune_cluster", "plan", "train_budgeted"]


# --- which clusters, which model -------------------------------------------------------------------------

def _cluster_ids(ws: Workspace) -> list[str]:
    """The cluster stage's task ids, else (a workspace clustered by other means) those in the stored assignments."""
    found = artifacts.clusters_file(ws, required=False)
    if found is not None:
        return [c["id"] for c in found["clusters"]]
    return sorted({c for c in ws.store.clusters_of().values() if c is not None})


def _selected_models(ws: Workspace) -> dict[str, str]:
    """Cluster id -> the model ``slmigrate select`` chose (empty when select has not run)."""
    found = artifacts.selection(ws, required=False)
    return {c["cluster"]: c["choice"] for c in (found or {"clusters": []})["clusters"] if c.get("choice")}


def plan(ws: Workspace, config: FinetuneConfig, clusters: Sequence[str] | None = None,
         selected: bool = False) -> list[tuple[str, str]]:
    """The (cluster, model name) pairs to train."""
    known = _cluster_ids(ws)
    if not known:
        raise SlmigrateError(f"no clusters in {ws.root}; run `slmigrate cluster` first")
    chosen = _selected_models(ws)
    if clusters:
        unknown = [c for c in clusters if str(c) not in known]
        if unknown:
            raise SlmigrateError(f"unknown cluster(s) {', '.join(map(str, unknown))}; known: {', '.join(known)} "
                                 "(see `slmigrate cluster --json`)")
        wanted = [str(c) for c in clusters]
    elif selected:
        if not chosen:
            raise SlmigrateError(f"no model selection in {ws.root}; run `slmigrate select` or pass --cluster ID")
        wanted = [c for c in known if c in chosen]
    else:
        wanted = known
    return [(c, config.model or chosen.get(c) or models.DEFAULT_MODEL) for c in wanted]


# --- hyper-parameters ------------------------------------------------------------------------------------

def defaults(config: FinetuneConfig, n_train: int, n_params: int, device: str,
             steps_per_epoch: int) -> dict[str, Any]:
    """Resolved hyper-parameters: the config's values, and defaults by data and model size where unset.

    Small data needs more passes and a small rank (it cannot fill a large one); tiny models take a higher
    LoRA learning rate than 7B ones; full fine-tuning moves every weight, so it uses a far lower rate.
    """
    epochs = config.epochs or (5 if n_train < 100 else 3 if n_train <= 1000 else 2 if n_train <= 5000 else 1)
    rank = config.lora_r or (8 if n_train < 500 else 16 if n_train < 5000 else 32)
    if config.method == "full":
        lr = config.lr or (5e-5 if n_params < 1e9 else 1e-5)
    else:
        lr = config.lr or (1e-3 if n_params < 1e9 else 2e-4)
    total = config.max_steps or max(1, math.ceil(epochs * steps_per_epoch))
    return {
        "epochs": epochs if not config.max_steps else round(total / max(steps_per_epoch, 1), 3),
        "total_steps": total, "steps_per_epoch": steps_per_epoch, "lr": lr,
        "lora_r": rank, "lora_alpha": config.lora_alpha or 2 * rank, "lora_dropout": config.lora_dropout,
        "target_modules": config.target_modules,
        "batch_tokens": batch_tokens(config, device),
        "warmup_steps": math.ceil(config.warmup_ratio * total),
        "eval_every": config.eval_every or max(1, steps_per_epoch // 2),
        "dtype": "bfloat16" if device == "cuda" else "float32",
    }


def batch_tokens(config: FinetuneConfig, device: str) -> int:
    return config.batch_tokens or (16384 if device == "cuda" else 4096)


# --- one cluster: load, wrap, train, save ----------------------------------------------------------------

@dataclass
class _Loaded:
    """Step 1's result: the model's files, its tokenizer and the examples built with it."""

    resolved: models.ResolvedModel
    tokenizer: Any
    static: chat_format.StaticPrompt
    train: list[Example]
    val: list[Example]
    train_report: BuildReport
    val_report: BuildReport
    device: str


def _load(model_name: str, train_calls: Sequence[Any], val_calls: Sequence[Any],
          config: FinetuneConfig) -> _Loaded:
    device = models.pick_device(config.device)
    if config.method == "qlora" and device != "cuda":
        raise SlmigrateError("--method qlora needs a CUDA GPU (bitsandbytes 4-bit NF4); use --method lora on a "
                             "CPU, or run on a machine with a GPU")
    resolved = models.resolve(model_name)
    tokenizer = models.load_tokenizer(resolved.path)
    train_calls = sample_calls(train_calls, config.max_examples, config.seed)
    static = chat_format.StaticPrompt.of(train_calls) if config.prune_static_prefix else chat_format.StaticPrompt()
    train, train_report = build_examples(tokenizer, train_calls, max_length=config.max_length, static=static)
    val, val_report = build_examples(tokenizer, val_calls, max_length=config.max_length, static=static)
    return _Loaded(resolved, tokenizer, static, train, val, train_report, val_report, device)


def _settings(config: FinetuneConfig, hp: dict[str, Any], loaded: _Loaded) -> loop.LoopSettings:
    return loop.LoopSettings(
        total_steps=hp["total_steps"], lr=hp["lr"], warmup_steps=hp["warmup_steps"],
        weight_decay=config.weight_decay, batch_tokens=hp["batch_tokens"],
        checkpoint_every=config.checkpoint_every, eval_every=hp["eval_every"], patience=config.patience,
        seed=config.seed, device=loaded.device, pad_id=loaded.tokenizer.pad_token_id, bf16=loaded.device == "cuda",
        stop_when_exact=config.stop_when_exact,
    )


def finetune_cluster(ws: Workspace, cluster: str, model_name: str, train_calls: Sequence[Any],
                     val_calls: Sequence[Any], config: FinetuneConfig, *, resume: bool = False,
                     force: bool = False, progress: Progress | None = None, stop_after: int | None = None,
                     init_adapter: str | Path | None = None) -> dict[str, Any]:
    import torch

    started = time.time()
    # 1. load: the model's files, the examples, the hyper-parameters, the base weights.
    loop.distributed()  # under `accelerate launch`: join the process group, pick this rank's GPU before loading
    loaded = _load(model_name, train_calls, val_calls, config)
    resolved, tokenizer, static, train, val = loaded.resolved, loaded.tokenizer, loaded.static, loaded.train, loaded.val
    out = ws.path("adapters", cluster, resolved.slug)
    if len(train) < config.min_examples:
        return {"cluster": cluster, "model": resolved.slug, "status": "skipped",
                "reason": f"{len(train)} training examples, fewer than min_examples={config.min_examples}"}
    base = _load_base(resolved.path, config, loaded.device)
    n_params = sum(p.numel() for p in base.parameters())
    per_epoch = loop.steps_per_epoch(train, batch_tokens(config, loaded.device), config.seed)
    hp = defaults(config, len(train), n_params, loaded.device, per_epoch)
    fingerprint = fingerprint_of(_examples_digest(train), _examples_digest(val), config.model_dump(), hp,
                                 str(resolved.path), str(init_adapter or ""))
    if not force and not resume and _finished(out, fingerprint):
        # The stored path is workspace-relative (a copied workspace still holds it); callers get it usable.
        return {**json.loads((out / "metrics.json").read_text()), "path": str(out), "status": "fresh"}
    checkpoints = out / "checkpoints"
    _check_resume(checkpoints, fingerprint, resume)

    # 2. wrap: adapters on every linear projection (LoRA/QLoRA), or all weights trainable (full).
    torch.manual_seed(config.seed)
    model = _wrap(base, config, hp, init_adapter)

    # 3. train.
    settings = _settings(config, hp, loaded)
    if loop.is_main_process():  # under `accelerate launch` only rank 0 writes (docs/finetune.md, Several GPUs)
        checkpoints.mkdir(parents=True, exist_ok=True)
        (checkpoints / "FINGERPRINT").write_text(fingerprint + "\n")
    history, best = loop.train(model, train, val, settings, checkpoints, resume=resume, progress=progress,
                               stop_after=stop_after, label=f"{cluster} / {resolved.slug}")
    if history.interrupted:
        return {"cluster": cluster, "model": resolved.slug, "status": "interrupted",
                "step": history.steps[-1] if history.steps else 0, "checkpoints": str(checkpoints)}
    if best is not None:
        loop.load_trainable(model, best)  # the weights with the lowest validation loss, not merely the last

    # 4. save: the adapter (or model) folder and what it was trained on, with how it went.
    if not loop.is_main_process():
        return {"cluster": cluster, "model": resolved.slug, "status": "trained", "saved_by": "rank 0"}
    metrics = _save(out, model, tokenizer, resolved, config, hp, history, fingerprint, static,
                    train, loaded.train_report, loaded.val_report, started, cluster, ws.relative(out))
    shutil.rmtree(checkpoints, ignore_errors=True)  # finished: nothing left to resume
    return {**metrics, "status": "trained"}


@dataclass
class Trained:
    """A model trained in memory by ``train_budgeted``: nothing of it is written to the workspace."""

    model: Any
    tokenizer: Any
    static: chat_format.StaticPrompt
    steps: int
    examples: int
    final_train_loss: float | None
    seconds: float


def train_budgeted(model_name: str, train_calls: Sequence[Any], val_calls: Sequence[Any],
                   config: FinetuneConfig, max_steps: int, *, progress: Progress | None = None) -> Trained | None:
    """Steps 1-3 of ``finetune_cluster`` capped at ``max_steps``, kept in memory (the probe's LoRA estimate).

    The same loading, example building, hyper-parameters and loop as a real fine-tune, so the estimate measures
    what ``finetune`` would train, only shorter; None when there are fewer than ``min_examples`` examples.
    """
    import tempfile

    import torch

    started = time.time()
    loaded = _load(model_name, train_calls, val_calls, config)
    if len(loaded.train) < config.min_examples:
        return None
    base = _load_base(loaded.resolved.path, config, loaded.device)
    n_params = sum(p.numel() for p in base.parameters())
    per_epoch = loop.steps_per_epoch(loaded.train, batch_tokens(config, loaded.device), config.seed)
    hp = defaults(config, len(loaded.train), n_params, loaded.device, per_epoch)
    hp["total_steps"] = min(hp["total_steps"], max_steps)
    hp["warmup_steps"] = min(hp["warmup_steps"], hp["total_steps"] // 4)
    torch.manual_seed(config.seed)
    model = _wrap(base, config, hp)
    with tempfile.TemporaryDirectory(prefix="slmigrate-probe-") as checkpoints:
        history, best = loop.train(model, loaded.train, loaded.val, _settings(config, hp, loaded),
                                   Path(checkpoints), progress=progress, label=f"probe / {loaded.resolved.slug}")
    if best is not None:
        loop.load_trainable(model, best)
    model.eval()
    return Trained(model, loaded.tokenizer, loaded.static, history.steps[-1] if history.steps else 0,
                   len(loaded.train), history.train_loss[-1] if history.train_loss else None,
                   round(time.time() - started, 1))


def _load_base(path: Path, config: FinetuneConfig, device: str):
    import torch
    from transformers import AutoModelForCausalLM

    if config.method == "qlora":
        from transformers import BitsAndBytesConfig

        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=torch.bfloat16)
        model = AutoModelForCausalLM.from_pretrained(str(path), quantization_config=quant, dtype=torch.bfloat16,
                                                     device_map={"": 0})
    else:
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).to(device)
    model.config.use_cache = False  # the KV cache only serves generation; training never reads it
    return model


def _wrap(model, config: FinetuneConfig, hp: dict[str, Any], init_adapter: str | Path | None = None):
    if config.method == "full":
        if config.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if config.method == "qlora":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=config.gradient_checkpointing)
    elif config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()  # frozen embeddings would otherwise cut the gradient path
    if init_adapter is not None:
        # Warm start (refine): continue from the cluster's current adapter, keeping its rank and targets.
        from peft import PeftModel

        hp["warm_start"] = str(init_adapter)
        return PeftModel.from_pretrained(model, str(init_adapter), is_trainable=True)
    targets = hp["target_modules"]
    if targets == "all-linear":
        targets = linear_module_names(model)
        hp["target_modules"] = targets
    extra: dict[str, Any] = {}
    layers = model.config.num_hidden_layers
    if config.lora_layers and config.lora_layers < layers:
        # The top layers only: the answer format and copying live mostly there, and a frozen bottom needs no
        # backward pass (and is computed once per example by loop.FrozenBottom).
        extra["layers_to_transform"] = list(range(layers - config.lora_layers, layers))
        hp["lora_layers"] = config.lora_layers
    lora = LoraConfig(r=hp["lora_r"], lora_alpha=hp["lora_alpha"], lora_dropout=hp["lora_dropout"],
                      target_modules=targets, bias="none", task_type="CAUSAL_LM", **extra)
    return get_peft_model(model, lora)


def linear_module_names(model) -> list[str]:
    """Short names of the model's linear layers except the output head (``q_proj``, ``down_proj``, ...).

    Short names rather than peft's full module paths keep adapter_config.json readable and what vLLM's
    ``--lora-modules`` expects; the output head stays frozen (adapting it is costly and rarely helps).
    """
    import torch

    names = {name.rsplit(".", 1)[-1] for name, module in model.named_modules()
             if isinstance(module, torch.nn.Linear) or type(module).__name__ == "Linear4bit"}
    return sorted(names - {"lm_head"})


def _examples_digest(examples: Sequence[Example]) -> str:
    h = hashlib.sha256()
    for e in examples:
        h.update(e.call_id.encode())
        h.update(json.dumps([e.input_ids, e.labels.count(-100)]).encode())
    return h.hexdigest()[:16]


def _finished(out: Path, fingerprint: str) -> bool:
    path = out / "metrics.json"
    return path.exists() and json.loads(path.read_text()).get("fingerprint") == fingerprint


def _check_resume(checkpoints: Path, fingerprint: str, resume: bool) -> None:
    marker = checkpoints / "FINGERPRINT"
    if not resume:
        shutil.rmtree(checkpoints, ignore_errors=True)  # a fresh run must not mix with an old one's state
        return
    if loop.latest_checkpoint(checkpoints) is None:
        raise SlmigrateError(f"--resume: no checkpoint in {checkpoints}; run without --resume to start afresh")
    if marker.exists() and marker.read_text().strip() != fingerprint:
        raise SlmigrateError(f"--resume: the data or settings changed since the checkpoint in {checkpoints}; "
                             "resume with the same options, or run without --resume to start afresh")


def _save(out: Path, model, tokenizer, resolved: models.ResolvedModel, config: FinetuneConfig,
          hp: dict[str, Any], history: loop.History, fingerprint: str, static: chat_format.StaticPrompt,
          train: Sequence[Example],
          train_report: BuildReport, val_report: BuildReport, started: float, cluster: str,
          stored_path: str) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    base_ref = resolved.hub_id or str(resolved.path)
    if config.method == "full":
        model.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
    else:
        # The hub id (not this machine's cache path) names the base, so vLLM and evaluate find it anywhere.
        model.peft_config["default"].base_model_name_or_path = base_ref
        model.save_pretrained(out, safe_serialization=True)
    static.save(out)
    (out / "finetune_config.json").write_text(json.dumps(
        {"cluster": cluster, "config": config.model_dump(), "resolved": hp, "model": resolved.to_dict()},
        indent=2, default=str) + "\n")
    batches = length_grouped_batches(train, hp["batch_tokens"], seed=config.seed, epoch=0)
    prompt_tokens = train_report.prompt_tokens + train_report.prefix_tokens_saved
    data = {
        "fingerprint": fingerprint, "train": train_report.to_dict(), "validation": val_report.to_dict(),
        "padding_share": round(padding_share(train, batches), 4),
        "static_prefix": {
            "chars": len(static.prefix),
            "tokens_per_call": chat_format.count_tokens(tokenizer, static.prefix) if static.prefix else 0,
            "tools": [(t.get("function") or t).get("name") for t in static.tools],
            "prompt_tokens_saved": train_report.prefix_tokens_saved,
            "share_of_prompt_tokens": round(train_report.prefix_tokens_saved / prompt_tokens, 4)
            if prompt_tokens else 0.0,
        },
    }
    (out / "data.json").write_text(json.dumps(data, indent=2) + "\n")
    metrics = {
        "cluster": cluster, "model": resolved.slug, "base_model": base_ref, "method": config.method,
        "path": str(out), "fingerprint": fingerprint, "examples": len(train),
        "validation_examples": val_report.examples, "steps": history.steps[-1] if history.steps else 0,
        "total_steps": hp["total_steps"],
        # Epochs actually trained (early stopping may end before the planned hp["epochs"]).
        "epochs": round((history.steps[-1] if history.steps else 0) / max(hp["steps_per_epoch"], 1), 3),
        "final_train_loss": history.train_loss[-1] if history.train_loss else None,
        "best_val_loss": history.best_val_loss, "best_step": history.best_step,
        "stopped_early": history.stopped_early, "stop_reason": history.stop_reason,
        "best_val_exact": (history.val_exact[history.val_steps.index(history.best_step)]
                           if history.best_step in history.val_steps
                           and len(history.val_exact) == len(history.val_steps) else None),
        "resumed_from": history.resumed_from,
        "tokens_trained": history.tokens, "tokens_per_second": round(history.tokens_per_second, 1),
        "frozen_layers": history.frozen_layers,
        "padding_share": data["padding_share"], "prompts_cut": train_report.prompts_cut + val_report.prompts_cut,
        "too_long": train_report.too_long + val_report.too_long,
        "prefix_tokens_saved": train_report.prefix_tokens_saved, "seconds": round(time.time() - started, 1),
        "history": {"steps": history.steps, "train_loss": history.train_loss, "val_steps": history.val_steps,
                    "val_loss": history.val_loss, "val_exact": history.val_exact},
    }
    (out / "metrics.json").write_text(json.dumps({**metrics, "path": stored_path}, indent=2) + "\n")
    _plot(out / "loss.png", history, f"{cluster} / {resolved.slug} ({config.method})")
    return metrics


def _plot(path: Path, history: loop.History, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a training box
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(history.steps, history.train_loss, label="train", linewidth=1)
    if history.val_steps:
        ax.plot(history.val_steps, history.val_loss, "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (answer tokens)")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --- all clusters -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class FinetuneResult(StageOutput):
    """``finetune``'s result: one dict per cluster (its metrics.json with ``status``: trained, fresh, skipped or
    interrupted, and ``path``), how many of each, and the seconds taken."""

    adapters: list[dict[str, Any]]
    counts: dict[str, int]
    seconds: float


def finetune(ws: Workspace, config: FinetuneConfig | None = None, *, progress: Progress | None = None,
             force: bool = False, clusters: Sequence[str] | None = None, selected: bool = False,
             resume: bool = False, stop_after: int | None = None,
             init_adapters: dict[str, str] | None = None) -> FinetuneResult:
    """Fine-tune one model per cluster; returns one result per cluster and writes the ``finetune`` manifest.

    ``progress`` hears of each cluster's steps as ``("CLUSTER / MODEL", step, total steps, loss=..., tps=...)``;
    a run that stops early ends with a ``note`` (slmigrate.progress).

    ``init_adapters`` (cluster -> adapter folder) warm-starts those clusters from an existing adapter (refine).
    """
    from slmigrate.curate.dataset import load_curated

    config = config or FinetuneConfig()
    started = time.time()
    pairs = plan(ws, config, clusters, selected)
    train_calls, val_calls = load_curated(ws, "train"), load_curated(ws, "validation")
    membership = ws.store.clusters_of()
    results = []
    for cluster, model_name in pairs:
        train = [c for c in train_calls if membership.get(c.id) == cluster]
        val = [c for c in val_calls if membership.get(c.id) == cluster]
        results.append(finetune_cluster(ws, cluster, model_name, train, val, config, resume=resume, force=force,
                                        progress=progress, stop_after=stop_after,
                                        init_adapter=(init_adapters or {}).get(cluster)))
    counts = {s: sum(r["status"] == s for r in results) for s in ("trained", "fresh", "skipped", "interrupted")}
    if not counts["interrupted"] and loop.is_main_process():
        ws.write_manifest("finetune", fingerprint=fingerprint_of([r.get("fingerprint") for r in results]),
                          config=config.model_dump(), counts={"clusters": len(results), **counts}, started=started,
                          extra={"adapters": [r.get("path") for r in results if r.get("path")]})
    return FinetuneResult.of({"adapters": results, "counts": counts, "seconds": round(time.time() - started, 1)})
