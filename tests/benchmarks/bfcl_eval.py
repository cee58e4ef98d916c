"""BFCL function calling: base vs fine-tuned SmolLM2-135M-Instruct, name and name+arguments accuracy.

The BFCL questions (simple_python + multiple) go into a fresh workspace as one tool-call cluster whose "LLM
answers" are the ground truth (``slmigrate.collect.bfcl``); slmigrate's own finetune (LoRA) trains on the train
split and evaluate scores base and fine-tuned on the held-out test split. Prints one JSON line.

    .venv/bin/python tests/benchmarks/bfcl_eval.py --limit 120 --epochs 2 --threads 1
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "bfcl"))
    parser.add_argument("--workspace", default="/tmp/slmigrate-bfcl-bench")
    parser.add_argument("--limit", type=int, default=120, help="questions used in all (train+val+test)")
    parser.add_argument("--epochs", type=float, default=2)
    parser.add_argument("--max-steps", type=int, default=None)
    parser.add_argument("--eval-limit", type=int, default=None, help="test calls evaluated")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--batch-size", type=int, default=8, help="evaluation batch size")
    parser.add_argument("--batch-tokens", type=int, default=1024, help="training tokens per step (memory)")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from slmigrate.collect import bfcl
    from slmigrate.config import EvaluateConfig, FinetuneConfig
    from slmigrate.evaluate.run import evaluate
    from slmigrate.finetune import finetune
    from slmigrate.workspace import Workspace

    shutil.rmtree(args.workspace, ignore_errors=True)
    ws = Workspace.open(args.workspace)
    t0 = time.time()
    info = bfcl.prepare(ws, args.data, limit=args.limit)
    ft = finetune(ws, FinetuneConfig(device=args.device, epochs=args.epochs, max_steps=args.max_steps,
                                     batch_tokens=args.batch_tokens))
    t1 = time.time()
    res = evaluate(ws, EvaluateConfig(device=args.device, batch_size=args.batch_size, embedder="none"),
                   variants=["base", "finetuned"], limit=args.eval_limit)
    t2 = time.time()
    (cluster,) = res.clusters
    out = {
        "benchmark": "bfcl_eval", "categories": list(bfcl.CATEGORIES), "questions": info["calls"],
        "splits": info["splits"], "test_calls": cluster["test_calls"], "threads": torch.get_num_threads(),
        "batch_tokens": args.batch_tokens,
        "finetune": {k: ft.adapters[0].get(k) for k in ("status", "examples", "steps", "epochs",
                                                            "best_val_loss", "tokens_per_second", "seconds")},
        "finetune_s": round(t1 - t0, 1), "evaluate_s": round(t2 - t1, 1),
    }
    for variant in ("base", "finetuned"):
        v = cluster["variants"][variant]
        out[variant] = {k: v["metrics"].get(k) for k in ("name_accuracy", "exact", "argument_f1", "valid_call",
                                                          "tool_choice")}
        out[variant]["tokens_per_s"] = v["efficiency"]["tokens_per_s"]
        out[variant]["latency_p50_ms"] = v["efficiency"]["latency_p50_ms"]
    out["decision"] = cluster["decision"]
    print(json.dumps(out))


if __name__ == "__main__":
    main()
