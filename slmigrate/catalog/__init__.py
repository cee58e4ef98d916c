"""The small-model catalogue: what each candidate SLM is, what it may be used for, and what it costs to run.

The built-in entries live in ``models.json`` next to this file. A workspace may extend or correct them with
``<workspace>/catalog.json`` (same format, ``{"models": [...]}`` or a bare list): an entry whose ``name`` exists
updates that entry field by field (``shape`` and ``scores`` merge key by key), a new name adds a model and must
be complete. Parameters and memory are always computed from the shape (``slmigrate.catalog.footprint``).
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from slmigrate.errors import SlmigrateError
from slmigrate.catalog.footprint import DEFAULT_SEQ_LEN, Footprint, Shape, footprint, params

BUILTIN = Path(__file__).with_name("models.json")
WORKSPACE_FILE = "catalog.json"
BENCHMARKS = ("ifeval", "bfcl", "mmlu", "gsm8k", "humaneval")
BENCHMARK_NAMES = {"ifeval": "IFEval", "bfcl": "BFCL", "mmlu": "MMLU", "gsm8k": "GSM8K", "humaneval": "HumanEval"}

# Licences the catalogue may name. ``commercial``: the licence allows commercial use (possibly with conditions,
# e.g. Llama's 700M monthly-user cap); ``permissive``: an OSI-approved permissive licence with no use policy.
LICENSES: dict[str, dict[str, Any]] = {
    "Apache-2.0": {"commercial": True, "permissive": True, "url": "https://www.apache.org/licenses/LICENSE-2.0"},
    "MIT": {"commercial": True, "permissive": True, "url": "https://opensource.org/license/mit"},
    "BSD-3-Clause": {"commercial": True, "permissive": True, "url": "https://opensource.org/license/bsd-3-clause"},
    "LicenseRef-Llama-3.1-Community": {"commercial": True, "permissive": False,
                                       "url": "https://www.llama.com/llama3_1/license/"},
    "LicenseRef-Llama-3.2-Community": {"commercial": True, "permissive": False,
                                       "url": "https://www.llama.com/llama3_2/license/"},
    "LicenseRef-Gemma": {"commercial": True, "permissive": False, "url": "https://ai.google.dev/gemma/terms"},
    "LicenseRef-NVIDIA-Community-Model": {
        "commercial": True, "permissive": False,
        "url": "https://huggingface.co/nvidia/Nemotron-Mini-4B-Instruct/blob/main/nvidia-community-model-license-aug2024.pdf"},
    "LicenseRef-Qwen-Research": {"commercial": False, "permissive": False,
                                 "url": "https://huggingface.co/Qwen/Qwen2.5-3B-Instruct/blob/main/LICENSE"},
    "CC-BY-NC-4.0": {"commercial": False, "permissive": False,
                     "url": "https://creativecommons.org/licenses/by-nc/4.0/"},
}
REQUIRED = ("name", "hub_id", "architecture", "shape", "context_window", "license", "native_tools", "scores")


@dataclass
class ModelEntry:
    name: str
    hub_id: str
    architecture: str
    shape: Shape
    context_window: int
    license: str
    native_tools: bool
    scores: dict[str, dict[str, Any] | None]
    family: str = ""
    shape_source: str = ""
    published_params: dict[str, Any] | None = None
    notes: str = ""
    origin: str = "builtin"  # builtin | workspace
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def params(self) -> int:
        return params(self.shape)

    @property
    def commercial_use(self) -> bool:
        return bool(LICENSES.get(self.license, {}).get("commercial", False))

    @property
    def permissive(self) -> bool:
        return bool(LICENSES.get(self.license, {}).get("permissive", False))

    def score(self, benchmark: str) -> float | None:
        found = self.scores.get(benchmark)
        return None if found is None else float(found["value"])

    def footprint(self, seq_len: int = DEFAULT_SEQ_LEN, batch: int = 1) -> Footprint:
        return footprint(self.shape, seq_len, batch)

    def to_dict(self, seq_len: int = DEFAULT_SEQ_LEN) -> dict[str, Any]:
        return {
            "name": self.name, "hub_id": self.hub_id, "family": self.family, "architecture": self.architecture,
            "params": self.params, "shape": self.shape.to_dict(), "shape_source": self.shape_source,
            "context_window": self.context_window, "license": self.license,
            "commercial_use": self.commercial_use, "permissive": self.permissive,
            "native_tools": self.native_tools, "scores": self.scores, "published_params": self.published_params,
            "memory_gib": self.footprint(seq_len).to_dict(), "notes": self.notes, "origin": self.origin,
        }


def _validate(raw: dict[str, Any], where: str) -> ModelEntry:
    name = raw.get("name", "?")
    missing = [k for k in REQUIRED if k not in raw]
    if missing:
        raise SlmigrateError(f"catalogue entry {name!r} in {where} lacks {', '.join(missing)}; "
                             "a new model needs every field of docs/models.md's entry format")
    if raw["license"] not in LICENSES:
        raise SlmigrateError(f"catalogue entry {name!r} in {where} names licence {raw['license']!r}, which is not "
                             f"one of {', '.join(sorted(LICENSES))}; use an SPDX id from that list")
    try:
        shape = Shape.from_dict(raw["shape"])
    except TypeError as exc:
        raise SlmigrateError(f"catalogue entry {name!r} in {where} has a bad shape ({exc}); expected layers, "
                             "hidden, intermediate, heads, kv_heads, vocab, tied_embeddings [, head_dim, ...]") from exc
    scores = dict(raw["scores"] or {})
    for bench, value in scores.items():
        if bench not in BENCHMARKS:
            raise SlmigrateError(f"catalogue entry {name!r} in {where} scores unknown benchmark {bench!r}; "
                                 f"expected {', '.join(BENCHMARKS)}")
        if value is not None and (not isinstance(value, dict) or "value" not in value or not value.get("source")):
            raise SlmigrateError(f"catalogue entry {name!r} in {where}: score {bench} needs "
                                 "{\"value\": N, \"source\": URL} (or null when no published figure exists)")
    for bench in BENCHMARKS:
        scores.setdefault(bench, None)
    return ModelEntry(
        name=raw["name"], hub_id=raw["hub_id"], architecture=raw["architecture"], shape=shape,
        context_window=int(raw["context_window"]), license=raw["license"], native_tools=bool(raw["native_tools"]),
        scores=scores, family=raw.get("family", ""), shape_source=raw.get("shape_source", ""),
        published_params=raw.get("published_params"), notes=raw.get("notes", ""),
        origin=raw.get("_origin", "builtin"), raw=raw,
    )


def _read(path: Path) -> list[dict[str, Any]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SlmigrateError(f"cannot read the model catalogue {path}: {exc}; fix or remove the file") from exc
    models = data.get("models") if isinstance(data, dict) else data
    if not isinstance(models, list) or not all(isinstance(m, dict) and m.get("name") for m in models):
        raise SlmigrateError(f"model catalogue {path} must be a list of entries with a name, or "
                             '{"models": [...]}; see docs/models.md')
    return models


@lru_cache(maxsize=1)
def _builtin_raw() -> tuple[dict[str, Any], ...]:
    return tuple(_read(BUILTIN))


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in update.items():
        if key in ("shape", "scores") and isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = {**out[key], **value}
        else:
            out[key] = value
    return out


def load(workspace: Any = None) -> dict[str, ModelEntry]:
    """All catalogue entries by name: the built-ins, then ``<workspace>/catalog.json`` over them."""
    raw = {m["name"]: copy.deepcopy(m) for m in _builtin_raw()}
    extra = None
    if workspace is not None:
        # A Workspace, or its folder (str/Path: note Path has its own unrelated ``root`` attribute).
        folder = Path(workspace) if isinstance(workspace, (str, Path)) else Path(workspace.root)
        extra = folder / WORKSPACE_FILE
    if extra is not None and extra.exists():
        for m in _read(extra):
            merged = _merge(raw[m["name"]], m) if m["name"] in raw else copy.deepcopy(m)
            merged["_origin"] = "workspace"
            raw[m["name"]] = merged
    out = {}
    for name, m in raw.items():
        out[name] = _validate(m, str(extra) if m.get("_origin") == "workspace" else str(BUILTIN))
    return out


def get(name: str, workspace: Any = None) -> ModelEntry:
    """One entry by catalogue name or hub id (case-insensitive)."""
    entries = load(workspace)
    key = name.strip().lower()
    for entry in entries.values():
        if entry.name.lower() == key or entry.hub_id.lower() == key:
            return entry
    raise SlmigrateError(f"{name!r} is not in the model catalogue; `slmigrate models list` shows the names, "
                         f"or add it to {WORKSPACE_FILE} in the workspace")
