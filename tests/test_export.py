"""`slmigrate export vllm | merged`: a tiny random Llama with a LoRA adapter stands in for a migrated cluster."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
from tiny_model import tiny_model_dir

from slmigrate.chat_format import StaticPrompt
from slmigrate.errors import SlmigrateError

TOOLS = [{"type": "function", "function": {"name": "get_order", "parameters": {"type": "object"}}}]


def _migrated(ws, tmp_path: Path, static: StaticPrompt) -> Path:
    """One cluster (c01) with a trained-looking adapter that evaluation marked for migration."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = tiny_model_dir(tmp_path)
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    adapter = ws.path("adapters", "c01", "tiny")
    model.save_pretrained(adapter)
    static.save(adapter)
    evals = ws.path("evals")
    evals.mkdir(parents=True, exist_ok=True)
    (evals / "latest.json").write_text(json.dumps({"clusters": [{
        "cluster": "c01", "label": "order lookups", "kind": "tool_call", "primary_metric": "tool_exact",
        "adapter": str(adapter), "decision": {"migrate": True},
        "variants": {"finetuned": {"primary": 0.95, "efficiency": {"max_new_tokens": 16}}}}]}))
    return adapter


def test_vllm_command_serves_every_migrated_adapter(workspace, tmp_path):
    from slmigrate.serve.export import export_vllm

    with pytest.raises(SlmigrateError, match="slmigrate evaluate"):
        export_vllm(workspace)  # nothing evaluated yet: the error says what to run
    adapter = _migrated(workspace, tmp_path, StaticPrompt("You are the order desk. " * 4, tuple(TOOLS)))
    result = export_vllm(workspace, tmp_path / "deploy", port=8123)
    argv = shlex.split(result["command"])
    assert argv[:2] == ["vllm", "serve"] and "--enable-lora" in argv and argv[argv.index("--port") + 1] == "8123"
    assert argv[argv.index("--lora-modules") + 1] == f"c01={adapter.resolve()}"
    assert argv[argv.index("--max-lora-rank") + 1] == "8"  # rank 4 rounds up to a rank vLLM accepts
    (route,) = json.loads((tmp_path / "deploy" / "routing.json").read_text())["routes"]
    assert route["model"] == "c01" and route["static_tools"] == 1 and route["static_prefix_chars"] > 0
    assert (tmp_path / "deploy" / "vllm_serve.sh").stat().st_mode & 0o111


def test_merged_model_answers_like_the_adapter_and_keeps_the_static_prompt(workspace, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from slmigrate.evaluate import generate as G
    from slmigrate.serve.export import export_merged

    static = StaticPrompt("You are the order desk. " * 4, tuple(TOOLS))
    adapter = _migrated(workspace, tmp_path, static)
    result = export_merged(workspace, "c01", tmp_path / "merged")
    merged_dir = Path(result["path"])
    assert StaticPrompt.load(merged_dir) == static  # whatever serves it must drop the same parts
    with pytest.raises(SlmigrateError, match="no evaluated adapter"):
        export_merged(workspace, "c99")

    ids = torch.tensor([[1, 5, 9, 14, 3, 7]])
    peft_model, _, _ = G.load_model(json.loads((adapter / "adapter_config.json").read_text())
                                    ["base_model_name_or_path"], adapter=adapter, device="cpu")
    merged = AutoModelForCausalLM.from_pretrained(merged_dir)
    with torch.no_grad():
        want, got = peft_model(input_ids=ids).logits, merged(input_ids=ids).logits
    assert torch.allclose(want, got, atol=1e-4)  # folding the LoRA into the weights changes no answer
