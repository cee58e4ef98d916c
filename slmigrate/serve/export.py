"""Hand the specialists to production serving: a vLLM multi-LoRA launch, or an adapter merged into full weights.

``export_vllm`` writes the ``vllm serve BASE --enable-lora --lora-modules name=path ...`` command for every
migrated cluster plus a routing table (cluster -> LoRA module name) so that production can serve the adapters
with vLLM while ``slmigrate serve`` (or the agent itself) routes. ``export_merged`` folds one cluster's LoRA into
its base model and saves plain safetensors that any runtime loads without peft.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

from slmigrate.errors import SlmigrateError
from slmigrate.serve.deployment import load_deployments
from slmigrate.workspace import Workspace


def export_vllm(ws: Workspace, out: str | Path | None = None, *, port: int = 8000) -> dict[str, Any]:
    deployments = load_deployments(ws)
    if not deployments:
        raise SlmigrateError("no migrated cluster with an adapter; run `slmigrate finetune` and `slmigrate evaluate` "
                             "first (a cluster migrates when its fine-tuned model passes the threshold)")
    bases = sorted({d.base_model or "?" for d in deployments})
    if len(bases) > 1:
        # One vLLM server serves LoRAs of one base model; several bases need several servers.
        raise SlmigrateError(f"the migrated adapters use {len(bases)} base models ({', '.join(bases)}); vLLM serves "
                             "one base per server: export per base with `--cluster`, or fine-tune on one model")
    max_rank = 8
    for d in deployments:
        cfg = json.loads((d.adapter / "adapter_config.json").read_text())
        max_rank = max(max_rank, int(cfg.get("r", 8)))
    modules = [f"{d.name}={d.adapter.resolve()}" for d in deployments]
    command = ["vllm", "serve", bases[0], "--port", str(port), "--enable-lora",
               "--max-loras", str(len(deployments)), "--max-lora-rank", str(_vllm_rank(max_rank)),
               "--lora-modules", *modules]
    table = {"base_model": bases[0], "routes": [
        {"cluster": d.cluster, "label": d.label, "model": d.name, "kind": d.kind, "adapter": str(d.adapter.resolve()),
         "static_prefix_chars": len(d.static.prefix), "static_tools": len(d.static.tools)} for d in deployments]}
    result = {"command": " ".join(shlex.quote(c) for c in command), "argv": command, "routing": table}
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "vllm_serve.sh").write_text("#!/bin/sh\n# Serve every migrated cluster's adapter with vLLM.\n"
                                           f"exec {result['command']}\n")
        (out / "vllm_serve.sh").chmod(0o755)
        (out / "routing.json").write_text(json.dumps(table, indent=2) + "\n")
        result["files"] = [str(out / "vllm_serve.sh"), str(out / "routing.json")]
    return result


def _vllm_rank(rank: int) -> int:
    # vLLM accepts these LoRA ranks only; round up to the next.
    for allowed in (8, 16, 32, 64, 128, 256, 320, 512):
        if rank <= allowed:
            return allowed
    return rank


def export_merged(ws: Workspace, cluster: str, out: str | Path | None = None) -> dict[str, Any]:
    from slmigrate.evaluate import generate as G

    found = [d for d in load_deployments(ws, include_failed=True) if d.cluster == cluster]
    if not found:
        raise SlmigrateError(f"no evaluated adapter for cluster {cluster!r}; run `slmigrate finetune --cluster "
                             f"{cluster}` and `slmigrate evaluate --cluster {cluster}` first")
    d = found[0]
    model, tokenizer, _ = G.load_model(d.base_model, adapter=d.adapter, device="cpu")
    merged = model.merge_and_unload()
    target = Path(out) if out else ws.path("exports", "merged", d.name)
    target.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(str(target), safe_serialization=True)
    tokenizer.save_pretrained(str(target))
    d.static.save(target)  # whatever serves the merged model must drop the same static prompt parts
    return {"cluster": cluster, "path": str(target), "base_model": d.base_model,
            "parameters": sum(p.numel() for p in merged.parameters())}
