"""The SLM catalogue: enough real entries, shapes that reproduce published sizes, memory that follows the
documented formula, licences from the known set, and a source for every score."""

import json
import math

import pytest

from slmigrate import catalog
from slmigrate.cli import main
from slmigrate.errors import SlmigrateError

GIB = 2**30


def _independent_params(shape: dict) -> int:
    """docs/models.md's parameter formula, written out again so a slip in footprint.py cannot hide."""
    L, h, i, a, k, V = (shape[x] for x in ("layers", "hidden", "intermediate", "heads", "kv_heads", "vocab"))
    d = shape.get("head_dim") or h // a
    attn = h * a * d + 2 * h * k * d + a * d * h
    mlp = (3 if shape.get("gated_mlp", True) else 2) * h * i
    small = 2 * h + (a * d + 2 * k * d if shape.get("qkv_bias") else 0) + (2 * d if shape.get("qk_norm") else 0)
    emb = V * h * (1 if shape["tied_embeddings"] else 2)
    return L * (attn + mlp + small) + emb + h + shape.get("extra_params", 0)


def _independent_memory(shape: dict, tokens: int) -> dict[str, float]:
    L, h, i, a, k, V = (shape[x] for x in ("layers", "hidden", "intermediate", "heads", "kv_heads", "vocab"))
    d = shape.get("head_dim") or h // a
    gated = shape.get("gated_mlp", True)
    P = _independent_params(shape)
    lin = L * (h * a * d + 2 * h * k * d + a * d * h + (3 if gated else 2) * h * i)
    lora = L * 16 * (2 * (h + a * d) + 2 * (h + k * d) + (3 if gated else 2) * (h + i))
    act = lambda b: L * tokens * h * b + tokens * (17 * h + 3 * i) * b + 8 * tokens * V  # noqa: E731
    w4 = lin * 4.127 / 8 + 2 * (P - lin)
    return {
        "weights_bf16": 2 * P / GIB, "weights_4bit": w4 / GIB,
        "lora_gpu": (2 * P + 16 * lora + act(2) + GIB) / GIB,
        "qlora_gpu": (w4 + 16 * lora + act(2) + GIB) / GIB,
        "lora_cpu": (4 * P + 16 * lora + act(4) + 1.5 * GIB) / GIB,
        "serve_cpu": (4 * P + 2 * L * k * d * tokens * 4 + 1.5 * GIB) / GIB,
    }


@pytest.fixture(scope="module")
def entries():
    return catalog.load()


def test_catalogue_has_at_least_15_real_models(entries):
    assert len(entries) >= 15
    families = {e.family for e in entries.values()}
    assert {"SmolLM2", "Qwen2.5", "Qwen3", "Llama 3.2", "Gemma 3", "xLAM-2", "Granite 3.3"} <= families
    for e in entries.values():
        assert "/" in e.hub_id and e.context_window >= 2048 and e.architecture.endswith(("CausalLM", "Generation"))


@pytest.mark.parametrize("seq_len", [512, 4096])
def test_memory_figures_follow_the_formula(entries, seq_len):
    for e in entries.values():
        fp = e.footprint(seq_len)
        expected = _independent_memory(e.raw["shape"], seq_len)
        assert fp.params == e.params == _independent_params(e.raw["shape"]), e.name
        for key, want in expected.items():
            assert math.isclose(getattr(fp, key), want, rel_tol=1e-9), (e.name, key)
        # sanity of the ordering the selection relies on
        assert fp.weights_4bit < fp.weights_bf16 and fp.qlora_gpu < fp.lora_gpu < fp.lora_cpu, e.name


def test_shapes_reproduce_published_parameter_counts(entries):
    checked = 0
    for e in entries.values():
        pub = e.published_params
        if pub:
            assert pub["source"], e.name
            assert abs(e.params / pub["value"] - 1) < 0.02, (e.name, e.params, pub["value"])
            checked += 1
    assert checked >= 10
    # the offline SmolLM2 GGUF holds exactly this many weights
    assert entries["smollm2-135m-instruct"].params == 134_515_008


def test_licences_are_known_and_commercial_flags_consistent(entries):
    for e in entries.values():
        assert e.license in catalog.LICENSES, e.name
        assert e.commercial_use == catalog.LICENSES[e.license]["commercial"]
    assert not entries["qwen2.5-3b-instruct"].commercial_use  # Qwen Research licence
    assert not entries["xlam-2-1b-fc-r"].commercial_use  # CC-BY-NC-4.0
    assert entries["qwen2.5-7b-instruct"].permissive and not entries["llama-3.2-3b-instruct"].permissive


def test_every_score_names_its_source(entries):
    sourced = 0
    for e in entries.values():
        assert set(e.scores) == set(catalog.BENCHMARKS), e.name
        for bench, s in e.scores.items():
            if s is None:
                continue
            assert s["source"].startswith("https://"), (e.name, bench)
            assert 0 <= s["value"] <= 100, (e.name, bench)
            sourced += 1
    assert sourced >= 30


def test_workspace_catalog_overrides_and_adds(tmp_path):
    (tmp_path / "catalog.json").write_text(json.dumps({"models": [
        {"name": "qwen2.5-0.5b-instruct", "context_window": 131072,
         "scores": {"bfcl": {"value": 40.0, "source": "https://example.org/our-bfcl-run"}}},
        {"name": "tiny-test", "hub_id": "acme/tiny-test", "architecture": "LlamaForCausalLM",
         "shape": {"layers": 2, "hidden": 64, "intermediate": 128, "heads": 4, "kv_heads": 2, "vocab": 1000,
                   "tied_embeddings": True},
         "context_window": 2048, "license": "MIT", "native_tools": False, "scores": {}},
    ]}))
    entries = catalog.load(tmp_path)
    q = entries["qwen2.5-0.5b-instruct"]
    assert q.context_window == 131072 and q.score("bfcl") == 40.0 and q.score("ifeval") == 27.9
    assert q.origin == "workspace" and entries["tiny-test"].params > 0
    assert catalog.get("ACME/tiny-test", tmp_path).name == "tiny-test"


def test_bad_workspace_entries_are_clear_errors(tmp_path):
    (tmp_path / "catalog.json").write_text(json.dumps([{"name": "x", "hub_id": "a/x"}]))
    with pytest.raises(SlmigrateError, match="lacks"):
        catalog.load(tmp_path)
    (tmp_path / "catalog.json").write_text(json.dumps([{"name": "qwen3-4b", "license": "WTFPL-ish"}]))
    with pytest.raises(SlmigrateError, match="licence"):
        catalog.load(tmp_path)
    (tmp_path / "catalog.json").write_text(json.dumps([{"name": "qwen3-4b", "scores": {"mmlu": 70}}]))
    with pytest.raises(SlmigrateError, match="source"):
        catalog.load(tmp_path)
    with pytest.raises(SlmigrateError, match="not in the model catalogue"):
        catalog.get("no-such-model")


def test_models_list_cli_json(tmp_path, capsys):
    assert main(["models", "list", "--json", "--seq-len", "1024", "-w", str(tmp_path / "none")]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) >= 15 and rows == sorted(rows, key=lambda r: r["params"])
    first = rows[0]
    assert first["memory_gib"]["seq_len"] == 1024 and "lora_cpu" in first["memory_gib"]
    assert main(["models", "list", "-w", str(tmp_path / "none")]) == 0
    assert "smollm2-135m-instruct" in capsys.readouterr().out
