"""The workspace: one folder holding the store and every stage's artifacts (see ARCHITECTURE.md).

Stages share nothing but this folder. Each stage records a manifest (resolved config, input fingerprint,
counts, duration, library versions) so an unchanged re-run can be skipped and ``status`` can tell what is stale.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from slmigrate import artifacts, env
from slmigrate.errors import SlmigrateError
from slmigrate.record import now_iso
from slmigrate.store import Store

DB_NAME = "slmigrate.sqlite"
ARTIFACT_DIRS = ("curated", "clusters", "adapters", "evals", "reports")
# Pipeline order; a stage is stale when a stage before it changed after it ran.
STAGES = ("collect", "curate", "cluster", "select", "finetune", "evaluate", "refine", "report")


def resolve_root(path: str | Path | None) -> Path:
    return Path(path or env.get(env.WORKSPACE) or env.DEFAULT_WORKSPACE).expanduser()


def resolve_store(store: str | Path | None) -> str | None:
    """The store URL from --store or SLMIGRATE_STORE; None means the workspace's own SQLite file."""
    value = store if store not in (None, "") else env.get(env.STORE)
    return None if value is None else str(value)


@dataclass
class Workspace:
    root: Path
    # Where the calls and stage tables live: a postgresql:// URL, a sqlite:///PATH or a file path. None: the
    # default ROOT/slmigrate.sqlite. Artifacts (curated/, adapters/, ...) stay under root either way.
    store_url: str | None = None

    @classmethod
    def open(cls, path: str | Path | None = None, *, create: bool = True,
             store: str | Path | None = None) -> "Workspace":
        root = resolve_root(path)
        store_url = resolve_store(store)
        if root.exists() and not root.is_dir():
            raise SlmigrateError(f"workspace {root} is a file, expected a folder; pass --workspace DIR")
        if not create and store_url is None and not (root / DB_NAME).exists():
            raise SlmigrateError(
                f"no slmigrate workspace at {root}; run `slmigrate init` or `slmigrate collect import FILE` "
                "first, or pass --workspace DIR"
            )
        ws = cls(root, store_url)
        if create:
            ws.init()
        return ws

    def init(self) -> None:
        try:
            # Owner-only (0700): the folder holds logged prompts and answers; what is created inside a private
            # folder is out of others' reach whatever its own mode.
            self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
            for name in ARTIFACT_DIRS:
                (self.root / name).mkdir(mode=0o700, exist_ok=True)
        except OSError as exc:
            raise SlmigrateError(f"cannot create the workspace {self.root}: {exc.strerror}") from exc

    @cached_property
    def store(self) -> Store:
        return Store(self.store_url or self.root / DB_NAME)

    def path(self, *parts: str) -> Path:
        return self.root.joinpath(*parts)

    def relative(self, path: str | Path) -> str:
        """``path`` as stored in an artifact: relative to the workspace when inside it, so a workspace copied or
        moved elsewhere still finds its own files; absolute otherwise."""
        path = Path(path).resolve()
        try:
            return path.relative_to(self.root.resolve()).as_posix()
        except ValueError:
            return str(path)

    def resolve(self, stored: str | Path) -> Path:
        """The file an artifact names: a relative path is under the workspace. An absolute path from before
        paths were stored relative, pointing into the folder this workspace was copied from, is followed into
        this workspace by its ``adapters/...`` (or other artifact folder) part."""
        path = Path(stored)
        if not path.is_absolute():
            return self.root / path
        if not path.exists():
            parts = path.parts
            for i, part in enumerate(parts):
                if part in ARTIFACT_DIRS and (self.root.joinpath(*parts[i:])).exists():
                    return self.root.joinpath(*parts[i:])
        return path

    # --- the stages' artifacts (slmigrate/artifacts.py names the files and owns their shapes) ---
    def clusters(self) -> list[artifacts.ClusterInfo]:
        """The tasks ``slmigrate cluster`` found, largest first; a SlmigrateError before it has run."""
        return artifacts.clusters(self)

    def selection(self) -> artifacts.SelectionFile:
        """The models ``slmigrate select`` ranked and chose; a SlmigrateError before it has run."""
        found = artifacts.selection(self)
        assert found is not None  # required: raises instead
        return found

    def evaluation(self) -> artifacts.EvaluationFile | None:
        """The newest ``slmigrate evaluate`` results, or None before it has run."""
        return artifacts.evaluation(self, required=False)

    def probe(self) -> artifacts.ProbeFile | None:
        """The ``slmigrate probe`` measurements, or None before it has run."""
        return artifacts.probe(self)

    # --- manifests ---
    def write_manifest(
        self, stage: str, *, fingerprint: str, config: dict[str, Any] | None = None,
        counts: dict[str, Any] | None = None, started: float | None = None, extra: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        body = {
            "config": config or {},
            "counts": counts or {},
            "duration_s": None if started is None else round(time.time() - started, 3),
            "versions": library_versions(),
            **(extra or {}),
        }
        self.store.put_manifest(stage, fingerprint, body, now_iso())
        return self.store.get_manifest(stage) or body

    def manifest(self, stage: str) -> dict[str, Any] | None:
        return self.store.get_manifest(stage)

    def is_fresh(self, stage: str, fingerprint: str) -> bool:
        found = self.manifest(stage)
        return found is not None and found["fingerprint"] == fingerprint


def fingerprint_of(*parts: Any) -> str:
    """A stable hash of inputs and config, for "has anything changed since the stage last ran"."""
    text = json.dumps(parts, sort_keys=True, default=str, ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def library_versions() -> dict[str, str]:
    from importlib import metadata

    out = {}
    for name in ("slmigrate", "torch", "transformers", "peft", "datasets", "sentence-transformers",
                 "scikit-learn", "presidio-analyzer", "spacy"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out
