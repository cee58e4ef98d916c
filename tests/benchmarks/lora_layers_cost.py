"""CPU cost of LoRA training on every layer vs the top N layers with the frozen bottom cached.

Real SmolLM2-135M-Instruct (the built-in offline copy) on one task of the examples generator (default: the JSON
extraction task), one torch thread so CPU time is not inflated by idle-spinning threads on a shared box.
For each setting it runs ``--steps`` optimiser steps of ``slmigrate.finetune.loop.train`` and measures process
CPU time: the one-off pass over the frozen layers (top-N only) and the per-token cost of a step. It prints one
JSON line with both and the projected CPU seconds for ``--epochs`` epochs of the task's examples.

Usage: HF_HUB_OFFLINE=1 python tests/benchmarks/lora_layers_cost.py [--task extract] [--layers 8] [--steps 6]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "examples"))


def task_calls(task: str, calls: int, seed: int) -> list[SimpleNamespace]:
    import agent_log

    out = []
    for rec in agent_log.generate(calls=calls, seed=seed):
        if rec["metadata"]["task"] == task:
            req = rec["request"]
            out.append(SimpleNamespace(id=rec["id"], messages=req["messages"], tools=req.get("tools"),
                                       answer=rec["response"]["choices"][0]["message"]))
    return out


def measure(model_path, examples, layers: int | None, steps: int, pad_id: int) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from slmigrate.finetune import loop

    model = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=torch.float32)
    n = model.config.num_hidden_layers
    extra = {"layers_to_transform": list(range(n - layers, n))} if layers else {}
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, task_type="CAUSAL_LM",
                                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                             "up_proj", "down_proj"], **extra))
    s = loop.LoopSettings(total_steps=steps, lr=1e-3, warmup_steps=0, weight_decay=0.0, batch_tokens=1024,
                          checkpoint_every=10**6, eval_every=10**6, patience=3, seed=0, device="cpu",
                          pad_id=pad_id)
    fill_cpu = 0.0
    frozen = loop.FrozenBottom.of(model)
    if frozen is not None:
        began = time.process_time()
        frozen.fill(examples, s)
        fill_cpu = time.process_time() - began
    # The steps as loop.train runs them (same batches, same forward), timed apart from the one-off fill.
    began = time.process_time()
    tokens = 0
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    cache: dict = {}
    model.train()
    for step in range(steps):
        batch_examples, _ = loop.batch_at(examples, s, step, cache)
        batch = loop.collate(batch_examples, pad_id)
        loss = loop._forward_loss(model, batch, s, frozen, batch_examples)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tokens += int(batch["attention_mask"].sum())
    step_cpu = time.process_time() - began
    return {"layers": layers or n, "frozen_layers": frozen.split if frozen else 0, "fill_cpu_s": round(fill_cpu, 2),
            "step_tokens": tokens, "step_cpu_ms_per_token": round(1000 * step_cpu / tokens, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="extract")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--epochs", type=float, default=5)
    parser.add_argument("--calls", type=int, default=600)
    args = parser.parse_args()

    import torch

    from slmigrate import chat_format, models
    from slmigrate.finetune.data import build_examples

    torch.set_num_threads(1)
    resolved = models.resolve(models.DEFAULT_MODEL)
    tok = models.load_tokenizer(resolved.path)
    calls = task_calls(args.task, args.calls, 0)
    examples, _ = build_examples(tok, calls, max_length=2048, static=chat_format.StaticPrompt.of(calls))
    epoch_tokens = sum(len(e) for e in examples)
    rows = [measure(resolved.path, examples, None, args.steps, tok.pad_token_id),
            measure(resolved.path, examples, args.layers, args.steps, tok.pad_token_id)]
    for r in rows:
        step_cpu_s = args.epochs * epoch_tokens * r["step_cpu_ms_per_token"] / 1000
        r["projected_cpu_s"] = round(r["fill_cpu_s"] + step_cpu_s, 1)
    print(json.dumps({"task": args.task, "examples": len(examples), "epoch_tokens": epoch_tokens,
                      "epochs": args.epochs, "all_layers": rows[0], "top_layers": rows[1],
                      "step_cost_ratio": round(rows[0]["step_cpu_ms_per_token"] / rows[1]["step_cpu_ms_per_token"], 2),
                      "projected_ratio": round(rows[0]["projected_cpu_s"] / rows[1]["projected_cpu_s"], 2)}))


if __name__ == "__main__":
    main()
