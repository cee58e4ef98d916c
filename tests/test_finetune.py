"""finetune: examples and masking, padding-free batches, resume equivalence, outputs; a real SmolLM2 run.

Unit tests use the tiny random Llama from tiny_model.py. The slow test trains the real SmolLM2-135M on one
narrow cluster from the examples generator and checks that exact match on held-out calls rises to >= 0.8.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import random
from pathlib import Path

import pytest

from slmigrate import chat_format
from slmigrate.config import FinetuneConfig
from slmigrate.curate.dataset import to_row, write_curated
from slmigrate.errors import SlmigrateError
from slmigrate.finetune import data as D
from slmigrate.finetune import finetune, loop
from slmigrate.record import CallRecord
from tiny_model import tiny_model_dir, tiny_tokenizer

ROOT = Path(__file__).resolve().parent.parent


# --- a workspace holding curated, clustered calls (the contract curate and cluster write) ------------------

def split_of(session: str) -> str:
    bucket = int(hashlib.sha256(session.encode()).hexdigest(), 16) % 10
    return "test" if bucket == 0 else "validation" if bucket == 1 else "train"


def fill_workspace(ws, calls: list[dict], cluster_of, split=None) -> dict[str, list[CallRecord]]:
    """Store ``calls`` (openai import shape), curate them unchanged with a session split, assign clusters."""
    split = split or (lambda r: split_of(r.session))
    records = []
    for c in calls:
        meta = c.get("metadata", {})
        records.append(CallRecord(request=c["request"], response=c["response"], input_id=c.get("id"),
                                  timestamp=c.get("timestamp"), session=meta.get("session") or c.get("id"),
                                  metadata=meta).finalise())
    ws.store.insert_calls(records)
    by_split: dict[str, list[CallRecord]] = {"train": [], "validation": [], "test": []}
    for r in records:
        by_split[split(r)].append(r)
    write_curated(ws, [to_row(r, s) for s, rs in by_split.items() for r in rs], {}, {})
    assignments = {r.id: cluster_of(r) for r in records}
    ws.store.set_clusters(assignments)
    ids = sorted({c for c in assignments.values() if c is not None})
    ws.path("clusters", "clusters.json").write_text(json.dumps(
        {"clusters": [{"id": i, "size": sum(v == i for v in assignments.values())} for i in ids]}))
    return by_split


def colour_calls(n: int, seed: int = 0, system: str = "Answer with the colour's hex code only.") -> list[dict]:
    """A narrow synthetic task: a colour name -> its hex code (for the tiny model's plumbing tests)."""
    colours = {"red": "#ff0000", "green": "#00ff00", "blue": "#0000ff", "black": "#000000", "white": "#ffffff"}
    rng = random.Random(seed)
    out = []
    for i in range(n):
        name = rng.choice(sorted(colours))
        extra = " please" * rng.randint(0, 12)  # varied lengths, so batching has padding to avoid
        out.append({
            "id": f"c{i}", "timestamp": f"2025-01-01T00:{i // 60:02d}:{i % 60:02d}Z",
            "request": {"model": "gpt-4o", "messages": [
                {"role": "system", "content": system}, {"role": "user", "content": f"Colour: {name}{extra}"}]},
            "response": {"model": "gpt-4o", "choices": [{"index": 0, "finish_reason": "stop",
                                                         "message": {"role": "assistant", "content": colours[name]}}]},
            "metadata": {"session": f"s{i}"},
        })
    return out


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The tiny model's matrices are too small to share between threads; on a busy 2-core box a second
    thread mostly spins and makes every step ~10x slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def tiny(tmp_path):
    return str(tiny_model_dir(tmp_path))


# --- examples, masking, batching -------------------------------------------------------------------------

def _call(messages, answer, tools=None, id_="x"):
    req = {"messages": messages, **({"tools": tools} if tools else {})}
    return CallRecord(request=req, response={"choices": [{"message": answer}]}, id=id_)


def test_examples_mask_everything_but_the_answer():
    tok = tiny_tokenizer()
    call = _call([{"role": "user", "content": "Colour: red"}], {"role": "assistant", "content": "#ff0000"})
    examples, report = D.build_examples(tok, [call], max_length=512)
    (ex,) = examples
    answer_ids = [t for t, lab in zip(ex.input_ids, ex.labels) if lab != D.IGNORE]
    assert tok.decode(answer_ids) == "#ff0000<|im_end|>\n"
    prompt_ids = ex.input_ids[: ex.labels.index(answer_ids[0])]
    assert tok.decode(prompt_ids).endswith("<|im_start|>assistant\n")
    assert all(lab == D.IGNORE for lab in ex.labels[: len(prompt_ids)])
    assert report.examples == 1 and report.answer_tokens == len(answer_ids)


def test_tool_call_answers_train_on_the_parseable_form():
    tok = tiny_tokenizer()
    answer = {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "refund", "arguments": '{"order": "#1"}'}}]}
    (ex,), _ = D.build_examples(tok, [_call([{"role": "user", "content": "refund #1"}], answer)], max_length=512)
    target = tok.decode([t for t, lab in zip(ex.input_ids, ex.labels) if lab != D.IGNORE])
    parsed = chat_format.parse_answer(target.replace("<|im_end|>", ""))
    assert parsed["tool_calls"][0]["function"] == {"name": "refund", "arguments": '{"order": "#1"}'}


def test_too_long_calls_are_cut_or_counted():
    tok = tiny_tokenizer()
    history = []
    for i in range(10):
        history += [{"role": "user", "content": f"old question {i} " + "x" * 50},
                    {"role": "assistant", "content": "old answer"}]
    long_call = _call([{"role": "system", "content": "SYS"}] + history + [{"role": "user", "content": "now?"}],
                      {"role": "assistant", "content": "ok"}, id_="long")
    huge_answer = _call([{"role": "user", "content": "hi"}], {"role": "assistant", "content": "y" * 400}, id_="huge")
    failed = CallRecord(request={"messages": [{"role": "user", "content": "hi"}]}, response=None, id="failed")
    examples, report = D.build_examples(tok, [long_call, huge_answer, failed], max_length=300)
    assert [e.call_id for e in examples] == ["long"] and len(examples[0]) <= 300
    assert report.prompts_cut == 1 and report.messages_dropped > 0
    assert report.too_long == 1 and report.no_answer == 1 and report.dropped_ids == ["huge"]


def test_length_grouped_batches_cover_everything_once_with_little_padding():
    rng = random.Random(0)
    examples = [D.Example(str(i), [1] * n, [1] * n) for i, n in enumerate(rng.randint(20, 400) for _ in range(300))]
    batches = D.length_grouped_batches(examples, 2048, seed=0, epoch=0)
    assert sorted(i for b in batches for i in b) == list(range(300))
    for b in batches:
        assert len(b) == 1 or max(len(examples[i]) for i in b) * len(b) <= 2048
    grouped = D.padding_share(examples, batches)
    order = list(range(300))
    rng.shuffle(order)
    random_batches = [order[i:i + 8] for i in range(0, 300, 8)]
    assert grouped < 0.05 < D.padding_share(examples, random_batches)
    # reproducible per (seed, epoch), different across epochs
    assert batches == D.length_grouped_batches(examples, 2048, seed=0, epoch=0)
    assert batches != D.length_grouped_batches(examples, 2048, seed=0, epoch=1)


def test_a_sample_of_training_calls_is_seeded_nested_and_keeps_the_order():
    calls = [_call([{"role": "user", "content": str(i)}], {"content": "a"}, id_=f"id{i:03d}") for i in range(100)]
    small, large = D.sample_calls(calls, 20, seed=0), D.sample_calls(calls, 50, seed=0)
    assert len(small) == 20 and len(large) == 50
    assert {c.id for c in small} < {c.id for c in large}  # a learning curve's points add data, not redraw it
    assert [c.id for c in large] == sorted(c.id for c in large)  # the calls' own order
    assert [c.id for c in D.sample_calls(calls[::-1], 20, seed=0)] == [c.id for c in small][::-1]
    assert {c.id for c in D.sample_calls(calls, 20, seed=1)} != {c.id for c in small}
    assert D.sample_calls(calls, None, seed=0) == calls == D.sample_calls(calls, 100, seed=0)


def test_collate_pads_without_labels_or_attention():
    a, b = D.Example("a", [5, 6, 7], [-100, 6, 7]), D.Example("b", [8], [8])
    batch = D.collate([a, b], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_answer_only_head_gives_the_models_own_loss_and_gradients():
    import torch
    from peft import LoraConfig, get_peft_model

    from tiny_model import tiny_model

    tok = tiny_tokenizer()
    model = get_peft_model(tiny_model(tok), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    for p in model.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.02)  # lora_B starts at zero; make every gradient non-trivial
    batch = D.collate([D.Example("a", [5, 6, 7, 8, 9], [-100, -100, 7, 8, 9]), D.Example("b", [1, 2, 3], [-100, 2, 3])],
                      tok.pad_token_id)
    settings = loop.LoopSettings(1, 1e-3, 0, 0.0, 512, 1, 1, 1, 0, "cpu", tok.pad_token_id)
    ours = loop._forward_loss(model, batch, settings)
    ours.backward()
    ours_grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad()
    reference = model(**batch).loss
    reference.backward()
    assert ours.item() == pytest.approx(reference.item(), abs=1e-6)
    for a, b in zip(ours_grads, (p.grad for p in model.parameters() if p.requires_grad)):
        assert torch.allclose(a, b, atol=1e-6)


def test_frozen_bottom_cache_gives_the_same_loss_and_gradients():
    """LoRA on the top layer only: cached bottom-layer states must reproduce the plain forward exactly."""
    import torch
    from peft import LoraConfig, get_peft_model

    from tiny_model import tiny_model

    tok = tiny_tokenizer()
    model = get_peft_model(tiny_model(tok, layers=3), LoraConfig(r=4, target_modules=["q_proj", "down_proj"],
                                                                 layers_to_transform=[2], lora_dropout=0.0))
    for p in model.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.02)
    examples = [D.Example("a", [5, 6, 7, 8, 9], [-100, -100, 7, 8, 9]), D.Example("b", [1, 2, 3], [-100, 2, 3])]
    batch = D.collate(examples, tok.pad_token_id)
    settings = loop.LoopSettings(1, 1e-3, 0, 0.0, 512, 1, 1, 1, 0, "cpu", tok.pad_token_id)
    frozen = loop.FrozenBottom.of(model)
    assert frozen is not None and frozen.split == 2  # layers 0 and 1 hold no trainable weight
    frozen.fill(examples, settings)
    cached = loop._forward_loss(model, batch, settings, frozen, examples)
    cached.backward()
    cached_grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad()
    plain = loop._forward_loss(model, batch, settings)
    plain.backward()
    assert cached.item() == pytest.approx(plain.item(), abs=1e-5)
    for a, b in zip(cached_grads, (p.grad for p in model.parameters() if p.requires_grad)):
        assert torch.allclose(a, b, atol=1e-5)
    # Every layer trainable: nothing to cache.
    full = get_peft_model(tiny_model(tok, layers=3), LoraConfig(r=4, target_modules=["q_proj"]))
    assert loop.FrozenBottom.of(full) is None


def test_lora_layers_adapts_only_the_top_layers(workspace, tiny):
    from safetensors.torch import load_file

    fill_workspace(workspace, colour_calls(40), lambda r: "colours")
    res = finetune(workspace, _config(tiny, lora_layers=1, max_steps=4)).adapters[0]
    assert res["frozen_layers"] == 1  # the tiny model has 2 layers: the bottom one ran once per example
    weights = load_file(str(Path(res["path"]) / "adapter_model.safetensors"))
    assert weights and all(".layers.1." in name for name in weights)
    assert res["final_train_loss"] is not None and res["tokens_per_second"] > 0


def test_defaults_scale_with_data():
    small = loop_defaults(50)
    big = loop_defaults(20000)
    assert small["epochs"] > big["epochs"] and small["lora_r"] < big["lora_r"]
    assert small["lora_alpha"] == 2 * small["lora_r"]


def loop_defaults(n):
    from slmigrate.finetune import defaults

    return defaults(FinetuneConfig(), n, 135_000_000, "cpu", steps_per_epoch=max(1, n // 16))


# --- the whole stage on the tiny model -------------------------------------------------------------------

def _config(tiny, **kw):
    base = dict(model=tiny, device="cpu", max_steps=12, batch_tokens=512, checkpoint_every=4, eval_every=4,
                lr=5e-3, seed=3, patience=100)
    return FinetuneConfig(**{**base, **kw})


def test_finetune_writes_a_loadable_adapter_and_its_records(workspace, tiny):
    fill_workspace(workspace, colour_calls(80), lambda r: "colours")
    result = finetune(workspace, _config(tiny))
    (res,) = result.adapters
    assert res["status"] == "trained" and res["steps"] == 12
    out = Path(res["path"])
    assert out == workspace.path("adapters", "colours", "tiny-llama")
    for name in ("adapter_config.json", "adapter_model.safetensors", "finetune_config.json", "data.json",
                 "metrics.json", "loss.png"):
        assert (out / name).exists(), name
    assert not (out / "checkpoints").exists()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["path"] == "adapters/colours/tiny-llama"  # stored relative: the workspace can move
    assert metrics["tokens_per_second"] > 0 and metrics["padding_share"] < 0.1
    assert metrics["history"]["train_loss"][-1] < metrics["history"]["train_loss"][0]
    assert len(metrics["history"]["val_loss"]) == 3

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter_cfg = json.loads((out / "adapter_config.json").read_text())
    assert adapter_cfg["base_model_name_or_path"] == str(Path(tiny).resolve())
    assert {"q_proj", "v_proj", "down_proj"} <= set(adapter_cfg["target_modules"])  # all linear layers
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny), str(out))
    assert any("lora_A" in n for n, _ in loaded.named_parameters())

    manifest = workspace.manifest("finetune")
    assert manifest["counts"]["trained"] == 1
    again = finetune(workspace, _config(tiny))
    assert again.adapters[0]["status"] == "fresh"  # unchanged data and config: nothing to redo


def test_max_examples_trains_on_a_sample_and_retrains_when_it_changes(workspace, tiny):
    by_split = fill_workspace(workspace, colour_calls(80), lambda r: "colours")
    (res,) = finetune(workspace, _config(tiny, max_steps=2, max_examples=10)).adapters
    assert res["status"] == "trained" and res["examples"] == 10 < len(by_split["train"])
    (res,) = finetune(workspace, _config(tiny, max_steps=2, max_examples=20)).adapters
    assert res["status"] == "trained" and res["examples"] == 20


def test_resume_after_interruption_matches_an_uninterrupted_run(tmp_path, tiny):
    from slmigrate.workspace import Workspace

    def adapter_weights(ws):
        from safetensors.torch import load_file

        return load_file(str(ws.path("adapters", "colours", "tiny-llama", "adapter_model.safetensors")))

    runs = {}
    for name in ("straight", "interrupted"):
        ws = Workspace.open(tmp_path / name)
        fill_workspace(ws, colour_calls(80), lambda r: "colours")
        cfg = _config(tiny, lora_dropout=0.1)  # dropout draws random numbers: the RNG state must resume too
        if name == "interrupted":
            first = finetune(ws, cfg, stop_after=6)
            assert first.adapters[0]["status"] == "interrupted"
            assert first.adapters[0]["step"] == 6
            result = finetune(ws, cfg, resume=True)
            assert result.adapters[0]["resumed_from"] == 6
        else:
            result = finetune(ws, cfg)
        runs[name] = (adapter_weights(ws), result.adapters[0])
    (a, ra), (b, rb) = runs["straight"], runs["interrupted"]
    assert ra["history"]["train_loss"] == rb["history"]["train_loss"]
    # Tolerance: CPU float32 kernels are deterministic run to run; allow rounding noise only.
    for key in a:
        assert (a[key] - b[key]).abs().max().item() < 1e-6, key


def test_resume_without_checkpoint_or_with_changed_data_is_a_user_error(workspace, tiny):
    fill_workspace(workspace, colour_calls(40), lambda r: "colours")
    with pytest.raises(SlmigrateError, match="no checkpoint"):
        finetune(workspace, _config(tiny), resume=True)
    finetune(workspace, _config(tiny), stop_after=5)
    with pytest.raises(SlmigrateError, match="changed since the checkpoint"):
        finetune(workspace, _config(tiny, lr=1e-3), resume=True)


def test_early_stopping_keeps_the_best_validation_weights(workspace, tiny):
    fill_workspace(workspace, colour_calls(80), lambda r: "colours")
    # A learning rate this high diverges after a few steps, so validation loss stops improving.
    res = finetune(workspace, _config(tiny, lr=0.5, max_steps=40, eval_every=2, patience=2)).adapters[0]
    assert res["stopped_early"] and res["steps"] < 40
    assert res["best_val_loss"] == pytest.approx(min(res["history"]["val_loss"]), abs=1e-4)


class _Bigram:
    """Models small enough to reason about: logits for token t+1 from token t alone (no config: the loop's
    plain full-logits path)."""

    @staticmethod
    def output(logits, labels):
        import torch.nn.functional as F

        from slmigrate.finetune.data import IGNORE

        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                               ignore_index=IGNORE)
        return type("Out", (), {"loss": loss, "logits": logits})()


def _settings(**kw):
    from slmigrate.finetune import loop

    base = dict(total_steps=1, lr=0.1, warmup_steps=0, weight_decay=0, batch_tokens=64, checkpoint_every=1000,
                eval_every=1, patience=100, seed=0, device="cpu", pad_id=0)
    return loop.LoopSettings(**{**base, **kw})


def test_validation_counts_the_answers_greedy_decoding_would_reproduce():
    import torch

    from slmigrate.finetune import loop
    from slmigrate.finetune.data import IGNORE, Example

    class NextIsPlusOne(torch.nn.Module):
        def forward(self, input_ids, attention_mask, labels):
            return _Bigram.output(torch.nn.functional.one_hot((input_ids + 1) % 16, 16).float() * 10, labels)

    examples = [Example("right", [5, 6, 7, 8], [IGNORE, IGNORE, 7, 8]),
                Example("last token wrong", [5, 6, 7, 9], [IGNORE, IGNORE, 7, 9]),
                Example("right, shorter", [1, 2, 3], [IGNORE, 2, 3])]
    loss, exact = loop.validation_loss(NextIsPlusOne(), examples, _settings())
    assert exact == pytest.approx(2 / 3) and loss > 0


def test_stop_when_exact_ends_training_once_validation_answers_are_reproduced(tmp_path):
    import torch

    from slmigrate.finetune import loop

    Table = _successor_table()

    data = _successor_examples()
    train, val = data * 3, data[8:]
    for stop in (True, False):
        torch.manual_seed(0)
        history, best = loop.train(Table(), train, val, _settings(total_steps=60, lr=0.5, stop_when_exact=stop),
                                   tmp_path / str(stop))
        if stop:
            assert history.stop_reason == "exact" and history.stopped_early and history.steps[-1] < 60
            # it stops at the first run of EXACT_EVALS all-exact validations, not at the first all-exact one
            streaks = [i for i in range(len(history.val_exact)) if history.val_exact[i:i + loop.EXACT_EVALS] ==
                       [1.0] * loop.EXACT_EVALS]
            assert streaks == [len(history.val_exact) - loop.EXACT_EVALS], history.val_exact
            assert history.best_step == history.steps[-1] and best is not None
        else:  # without the option the same run trains on past its first fully-exact validation
            assert history.steps[-1] == 60 and history.stop_reason is None and 1.0 in history.val_exact


def test_static_prefix_pruning_reports_the_saving(workspace, tiny):
    system = "You are the colour desk of ACME Paints. " * 4 + "Answer with the hex code only."
    calls = colour_calls(60, system=system)
    for i, c in enumerate(calls):
        c["request"]["messages"][0]["content"] += f" Ticket {i}."
    fill_workspace(workspace, calls, lambda r: "colours")
    res = finetune(workspace, _config(tiny, prune_static_prefix=True, max_steps=2)).adapters[0]
    out = Path(res["path"])
    prefix = (out / "static_prefix.txt").read_text()
    assert prefix.startswith("You are the colour desk") and prefix.endswith("Ticket ")  # the number varies
    assert not (out / "static_tools.json").exists()  # these calls offer no tools
    data = json.loads((out / "data.json").read_text())
    assert data["static_prefix"]["tokens_per_call"] > 100 and res["prefix_tokens_saved"] > 0
    assert 0.3 < data["static_prefix"]["share_of_prompt_tokens"] < 1


def test_a_fixed_tool_list_is_pruned_with_the_prefix(workspace, tiny):
    tools = [{"type": "function", "function": {"name": f"paint_{n}", "description": "Mix a paint colour. " * 6,
                                               "parameters": {"type": "object", "properties": {}}}}
             for n in ("red", "green", "blue")]
    calls = colour_calls(40)
    for c in calls:
        c["request"]["tools"] = tools
    fill_workspace(workspace, calls, lambda r: "colours")
    res = finetune(workspace, _config(tiny, prune_static_prefix=True, max_steps=2)).adapters[0]
    out = Path(res["path"])
    assert [t["function"]["name"] for t in json.loads((out / "static_tools.json").read_text())] == \
        ["paint_red", "paint_green", "paint_blue"]
    data = json.loads((out / "data.json").read_text())
    assert data["static_prefix"]["tools"] == ["paint_red", "paint_green", "paint_blue"]
    assert data["static_prefix"]["share_of_prompt_tokens"] > 0.5  # the schemas were most of each prompt


def test_bad_requests_are_user_errors(workspace, tiny):
    fill_workspace(workspace, colour_calls(20), lambda r: "colours")
    with pytest.raises(SlmigrateError, match="unknown cluster"):
        finetune(workspace, _config(tiny), clusters=["nope"])
    with pytest.raises(SlmigrateError, match="select"):
        finetune(workspace, _config(tiny), selected=True)
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(SlmigrateError, match="qlora needs a CUDA GPU"):
            finetune(workspace, _config(tiny, method="qlora"))


def test_full_finetuning_saves_a_whole_model(workspace, tiny):
    fill_workspace(workspace, colour_calls(40), lambda r: "colours")
    res = finetune(workspace, _config(tiny, method="full", max_steps=3, lr=1e-3)).adapters[0]
    out = Path(res["path"])
    assert (out / "config.json").exists() and (out / "model.safetensors").exists()
    assert (out / "tokenizer.json").exists() and not (out / "adapter_config.json").exists()


def test_cli_finetune_json(workspace, tiny, capsys):
    from slmigrate.cli import main

    fill_workspace(workspace, colour_calls(40), lambda r: "colours")
    code = main(["finetune", "--workspace", str(workspace.root), "--model", tiny, "--device", "cpu",
                 "--max-steps", "2", "--cluster", "colours", "--stop-when-exact", "--json"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert out["adapters"][0]["status"] == "trained"
    saved = json.loads((Path(out["adapters"][0]["path"]) / "finetune_config.json").read_text())
    assert saved["config"]["stop_when_exact"] is True  # the flag reaches the training settings


# --- GPU paths -------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_cuda_bf16_and_qlora_train(workspace, tiny, method):
    fill_workspace(workspace, colour_calls(80), lambda r: "colours")
    res = finetune(workspace, _config(tiny, device="cuda", method=method, max_steps=8, lr=1e-3)).adapters[0]
    assert res["status"] == "trained" and res["history"]["train_loss"][-1] < res["history"]["train_loss"][0]
    cfg = json.loads((Path(res["path"]) / "finetune_config.json").read_text())
    assert cfg["resolved"]["dtype"] == "bfloat16"


# --- the real thing: SmolLM2-135M learns a narrow task on a CPU ------------------------------------------

def _agent_log_calls(task: str, n_calls: int) -> list[dict]:
    spec = importlib.util.spec_from_file_location("agent_log", ROOT / "examples" / "agent_log.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return [c for c in module.generate(calls=n_calls, seed=0) if c["metadata"]["task"] == task]


def _exact_match(model, tokenizer, calls, prefix: str = "", max_new_tokens: int = 8) -> float:
    """Greedy answers for ``calls`` (rendered as serving would, prefix pruned) compared with the LLM's."""
    import torch

    model.eval()
    hits = 0
    for call in calls:
        text = chat_format.render_prompt(tokenizer, chat_format.prune_prefix(call.messages, prefix), call.tools).text
        inputs = tokenizer(text, return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        answer = chat_format.parse_answer(tokenizer.decode(out[0][inputs["input_ids"].shape[1]:],
                                                           skip_special_tokens=True))
        hits += answer["content"] == call.answer["content"]
    return hits / len(calls)


@pytest.mark.slow
def test_real_smollm2_learns_a_narrow_task(workspace):
    """Intent classification from the examples generator: a few minutes of LoRA on SmolLM2-135M lift exact
    match on held-out calls from the base model's score to >= 0.8.

    Sized for CI on two busy cores: 64 training calls, the shared system prompt pruned (it is the same in
    every call, so the specialist does not need it: half the tokens), 3 epochs, answers of <= 6 tokens.
    """
    from peft import PeftModel

    from slmigrate import models
    from tiny_model import smollm2_dir

    smollm2_dir()  # converted once per machine (skips when the offline weights are not installed)
    calls = _agent_log_calls("intent", 480)
    train_ids = {c["id"] for c in calls[:64]}
    val_ids = {c["id"] for c in calls[64:72]}
    fill_workspace(workspace, calls[:112], lambda r: "intent",
                   split=lambda r: "train" if r.input_id in train_ids else
                   "validation" if r.input_id in val_ids else "test")
    from slmigrate.curate.dataset import load_curated

    test = load_curated(workspace, "test")
    assert len(test) == 40

    base, tokenizer, _ = models.load(None)
    base_score = _exact_match(base, tokenizer, test)

    config = FinetuneConfig(device="cpu", epochs=3, lr=1e-3, batch_tokens=512, prune_static_prefix=True)
    res = finetune(workspace, config).adapters[0]
    assert res["status"] == "trained" and res["prefix_tokens_saved"] > 0
    prefix = (Path(res["path"]) / "static_prefix.txt").read_text()
    tuned = PeftModel.from_pretrained(base, res["path"])
    tuned_score = _exact_match(tuned, tokenizer, test, prefix)
    print(f"\nintent exact match on {len(test)} held-out calls: base {base_score:.3f} -> "
          f"fine-tuned {tuned_score:.3f} ({res['steps']} steps, {res['tokens_trained']} tokens, "
          f"{res['tokens_per_second']:.0f} tok/s, {res['seconds']:.0f} s training)")
    assert tuned_score >= 0.8 and tuned_score > base_score


def test_the_bar_ends_where_early_stopping_ended_training(tmp_path, capsys, monkeypatch):
    """Not frozen part-way (30/48 after an early stop): full at the last step, saying why it stopped."""
    monkeypatch.setenv("COLUMNS", "200")  # stderr is no terminal here: rich would fold the bar to 80 columns
    import torch

    from slmigrate.finetune import loop
    from slmigrate.progress import Bars

    Table = _successor_table()

    data = _successor_examples()
    torch.manual_seed(0)
    with Bars(transient=False) as bars:  # what the CLI hands the stage
        history, _ = loop.train(Table(), data * 3, data[8:],
                                _settings(total_steps=60, lr=0.5, stop_when_exact=True), tmp_path, progress=bars,
                                label="c1")
    last = history.steps[-1]
    assert history.stopped_early and last < 60
    err = capsys.readouterr().err
    assert f"{last}/{last}" in err and "/60" not in err
    assert "c1 (stopped early: every validation answer exact)" in err


def _successor_table():
    """A 16x16 next-token table (a tiny trainable model for the loop's tests)."""
    import torch

    class Table(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.table = torch.nn.Parameter(torch.zeros(16, 16))

        def forward(self, input_ids, attention_mask, labels):
            return _Bigram.output(self.table[input_ids], labels)

    return Table


def _successor_examples():
    """The task: after token a comes a + 3; the table learns it in a few steps of a high learning rate."""
    from slmigrate.finetune.data import IGNORE, Example

    return [Example(f"e{a}", [a, (a + 3) % 16], [IGNORE, (a + 3) % 16]) for a in range(12)]
