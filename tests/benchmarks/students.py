"""The two built-in offline students side by side: SmolLM2-135M-Instruct and Gemma 3 270M, on one demo task.

For each model, on the same calls of one task of the examples generator (default: the intent label), with the
same settings (lr 1e-3, the shared system prompt pruned): load time from the model cache; LoRA fine-tuning
(``finetune`` with ``max_steps``: first and last training loss, seconds per step, training tokens/s); then
greedy generation on the held-out calls with the adapter (exact match, ms per generated token, p50 ms per
answer). One JSON line per model, then one with the ratios. The machine is shared: compare the ratios.

Usage: .venv/bin/python tests/benchmarks/students.py [--task intent] [--train 48] [--test 16] [--steps 20]
                                                      [--batch-tokens 512]
                                                      [--models smollm2-135m-instruct,gemma-3-270m]
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
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def task_calls(task: str, n: int) -> list[dict]:
    spec = importlib.util.spec_from_file_location("agent_log", ROOT / "examples" / "agent_log.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return [c for c in module.generate(calls=n * 8, seed=0) if c["metadata"]["task"] == task][:n]


def run_model(name: str, calls: list[dict], n_train: int, steps: int, batch_tokens: int) -> dict:
    import torch

    from slmigrate import chat_format, models
    from slmigrate.config import FinetuneConfig
    from slmigrate.curate.dataset import load_curated
    from slmigrate.evaluate.generate import attach_adapter, generate, max_new_tokens_for
    from slmigrate.finetune import finetune
    from slmigrate.workspace import Workspace
    from test_finetune import fill_workspace

    models.pull(name)  # converted once, outside the timings
    t0 = time.perf_counter()
    model, tokenizer, _ = models.load(name)
    load_s = time.perf_counter() - t0
    n_params = sum(p.numel() for p in model.parameters())  # before peft adds the adapter's
    train_ids = {c["id"] for c in calls[:n_train]}
    with tempfile.TemporaryDirectory() as tmp:
        ws = Workspace.open(Path(tmp) / "ws")
        fill_workspace(ws, calls, lambda r: "task",
                       split=lambda r: "train" if r.input_id in train_ids else "test")
        test = load_curated(ws, "test")
        config = FinetuneConfig(model=name, device="cpu", max_steps=steps, stop_when_exact=False,
                                prune_static_prefix=True, batch_tokens=batch_tokens, lr=1e-3)
        res = finetune(ws, config).adapters[0]
        prefix = chat_format.StaticPrompt.load(res["path"])
        prompts = [chat_format.render_prompt(tokenizer, *prefix.apply(c.messages, c.tools)).text for c in test]
        refs = [chat_format.serialise_answer(c.answer) for c in test]
        tuned = attach_adapter(model, res["path"])
        max_new = max_new_tokens_for(tokenizer, refs)
        with torch.inference_mode():
            out = generate(tuned, tokenizer, prompts, batch_size=1, max_new_tokens=max_new,
                           skip_special_tokens=True)
    exact = sum(chat_format.parse_answer(t)["content"] == r for t, r in zip(out.texts, refs)) / len(refs)
    per_token = [lat / max(1, n) for lat, n in zip(out.latency_ms, out.new_tokens)]
    losses = res["history"]["train_loss"]
    return {
        "model": name, "params": n_params, "load_s": round(load_s, 1),
        "steps": res["steps"], "loss_first": round(losses[0], 3), "loss_last": round(losses[-1], 3),
        "s_per_step": round(res["seconds"] / max(1, res["steps"]), 2),
        "train_tokens_per_s": round(res["tokens_per_second"], 1),
        "test_calls": len(refs), "exact": round(exact, 3),
        "gen_ms_per_token_p50": round(statistics.median(per_token), 1),
        "answer_ms_p50": round(statistics.median(out.latency_ms), 1),
        "prompt_tokens_p50": statistics.median(out.prompt_tokens),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="intent")
    parser.add_argument("--train", type=int, default=48)
    parser.add_argument("--test", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-tokens", type=int, default=512)
    parser.add_argument("--models", default="smollm2-135m-instruct,gemma-3-270m")
    args = parser.parse_args(argv)
    calls = task_calls(args.task, args.train + args.test)
    rows = []
    for name in args.models.split(","):
        row = run_model(name, calls, args.train, args.steps, args.batch_tokens)
        print(json.dumps(row), flush=True)
        rows.append(row)
    if len(rows) == 2:
        a, b = rows
        print(json.dumps({"ratio": f"{b['model']} / {a['model']}",
                          "s_per_step": round(b["s_per_step"] / a["s_per_step"], 2),
                          "gen_ms_per_token": round(b["gen_ms_per_token_p50"] / a["gen_ms_per_token_p50"], 2),
                          "answer_ms": round(b["answer_ms_p50"] / a["answer_ms_p50"], 2)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
