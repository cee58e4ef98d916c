"""Training throughput: slmigrate's finetune loop versus a plain transformers Trainer + peft, side by side.

Same model (SmolLM2-135M-Instruct by default), same examples (built once by slmigrate: chat template prompt,
answer-only labels), same LoRA settings, learning rate, schedule and epochs, same examples per step on average.
The difference measured is the batching: the Trainer's default padded batches (random order, each padded to
its longest example) against slmigrate's length-grouped token-budget batches. Tokens/s counts real
(non-padding) tokens only, so time spent on padding shows up as lost throughput.

The data is one coarse cluster of the examples generator's support-agent calls (all task kinds mixed), so
lengths vary as they do in a real cluster of agent calls. Runs alternate between the two to share the noise
of a busy machine; medians and the ratio are printed as one JSON line.

Usage: .venv/bin/python tests/benchmarks/finetune_speed.py [--examples 96] [--repeats 3] [--batch 8]
                                                           [--model NAME|PATH] [--threads N]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def load_calls(n: int):
    """``n`` calls from the examples generator, as CallRecords (a coarse, mixed-length cluster)."""
    from slmigrate.record import CallRecord

    spec = importlib.util.spec_from_file_location("agent_log", ROOT / "examples" / "agent_log.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    raw = [c for c in module.generate(calls=max(200, n * 2), seed=0) if c["metadata"]["task"] != "open_ended"]
    return [CallRecord(request=c["request"], response=c["response"], id=c["id"]) for c in raw[:n]]


def fresh_lora_model(path, cfg, hp):
    import torch
    from transformers import AutoModelForCausalLM

    from slmigrate.finetune import _wrap

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    model.config.use_cache = False
    torch.manual_seed(cfg.seed)
    return _wrap(model, cfg, dict(hp))


def run_slmigrate(path, examples, cfg, hp, pad_id) -> dict:
    from slmigrate.finetune import loop

    model = fresh_lora_model(path, cfg, hp)
    settings = loop.LoopSettings(
        total_steps=hp["total_steps"], lr=hp["lr"], warmup_steps=hp["warmup_steps"], weight_decay=0.0,
        batch_tokens=hp["batch_tokens"], checkpoint_every=10**9, eval_every=10**9, patience=10**9,
        seed=cfg.seed, device="cpu", pad_id=pad_id,
    )
    with tempfile.TemporaryDirectory() as tmp:
        history, _ = loop.train(model, examples, [], settings, Path(tmp))
    return {"tokens": history.tokens, "seconds": history.train_seconds, "steps": len(history.steps),
            "padding_share": 1 - history.tokens / history.padded_tokens}


def run_trainer(path, examples, cfg, hp, tokenizer, batch: int) -> dict:
    import datasets
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    model = fresh_lora_model(path, cfg, hp)
    ds = datasets.Dataset.from_dict({"input_ids": [e.input_ids for e in examples],
                                     "labels": [e.labels for e in examples]})
    collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
    padded = {"n": 0}

    def counting(features):
        out = collator(features)
        padded["n"] += out["input_ids"].numel()
        return out

    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=tmp, per_device_train_batch_size=batch, num_train_epochs=1, max_steps=hp["trainer_steps"],
            learning_rate=hp["lr"], lr_scheduler_type="linear", warmup_steps=hp["warmup_steps"], weight_decay=0.0,
            max_grad_norm=1.0, logging_strategy="no", save_strategy="no", report_to=[], use_cpu=True,
            dataloader_num_workers=0, seed=cfg.seed, disable_tqdm=True,
        )
        trainer = Trainer(model=model, args=args, train_dataset=ds, data_collator=counting)
        started = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - started
    tokens = sum(len(e) for e in examples)
    return {"tokens": tokens, "seconds": seconds, "steps": hp["trainer_steps"],
            "padding_share": 1 - tokens / padded["n"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8, help="Trainer examples per batch (slmigrate: same on average).")
    parser.add_argument("--model", default=None, help="Model name or folder (default SmolLM2-135M-Instruct).")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()

    import torch

    from slmigrate import models
    from slmigrate.config import FinetuneConfig
    from slmigrate.finetune import data as D
    from slmigrate.finetune import defaults, loop

    if args.threads:
        torch.set_num_threads(args.threads)
    resolved = models.resolve(args.model)
    tokenizer = models.load_tokenizer(resolved.path)
    examples, _ = D.build_examples(tokenizer, load_calls(args.examples), max_length=1024)
    mean_len = sum(len(e) for e in examples) / len(examples)
    # The same number of examples per step on average: a token budget of `batch` mean-length examples.
    cfg = FinetuneConfig(device="cpu", epochs=1, lr=1e-3, batch_tokens=int(args.batch * mean_len), seed=0)
    per_epoch = loop.steps_per_epoch(examples, cfg.batch_tokens, cfg.seed)
    hp = defaults(cfg, len(examples), 135_000_000, "cpu", per_epoch)
    hp["trainer_steps"] = -(-len(examples) // args.batch)

    results: dict[str, list[dict]] = {"slmigrate": [], "trainer": []}
    for _ in range(args.repeats):
        results["trainer"].append(run_trainer(resolved.path, examples, cfg, hp, tokenizer, args.batch))
        results["slmigrate"].append(run_slmigrate(resolved.path, examples, cfg, hp, tokenizer.pad_token_id))

    def med(name, key):
        return statistics.median(r[key] for r in results[name])

    tps = {name: statistics.median(r["tokens"] / r["seconds"] for r in runs) for name, runs in results.items()}
    print(json.dumps({
        "benchmark": "finetune_speed", "model": resolved.slug, "examples": len(examples),
        "mean_tokens_per_example": round(mean_len, 1), "repeats": args.repeats, "threads": torch.get_num_threads(),
        "trainer_batch": args.batch, "slmigrate_batch_tokens": cfg.batch_tokens,
        "steps": {"trainer": hp["trainer_steps"], "slmigrate": med("slmigrate", "steps")},
        "padding_share": {"trainer": round(med("trainer", "padding_share"), 4),
                          "slmigrate": round(med("slmigrate", "padding_share"), 4)},
        "tokens_per_second_median": {k: round(v, 1) for k, v in tps.items()},
        "seconds_median": {"trainer": round(med("trainer", "seconds"), 2),
                           "slmigrate": round(med("slmigrate", "seconds"), 2)},
        "speedup": round(tps["slmigrate"] / tps["trainer"], 3),
    }))


if __name__ == "__main__":
    main()
