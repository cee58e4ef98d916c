"""What a stage returns: a frozen dataclass with the fields its callers read, and the JSON body behind it.

Every stage entry point has one shape, ``stage(workspace, config, *, progress=None, force=False, ...options)``,
and returns a ``StageOutput`` subclass defined beside it (``CurateResult``, ``ClusterResult``, ``SelectResult``,
``ProbeResult``, ``FinetuneResult``, ``EvaluateResult``, ``ReportResult``). Code reads the typed attributes;
``to_dict()`` gives the body the stage wrote or showed, key for key as before, so ``--json`` output and the
artifacts on disk keep their shape. A field the body lacks (an artifact written by an older version, a skipped
run) takes the field's default.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, Self


@dataclass(frozen=True)
class StageOutput:
    body: Mapping[str, Any] = field(kw_only=True, repr=False, compare=False)

    @classmethod
    def of(cls, body: Mapping[str, Any]) -> Self:
        """The result for ``body`` (a stage's JSON dict): its typed fields are read from the keys of that name."""
        values = {}
        for f in fields(cls):
            if f.name == "body":
                continue
            if f.name in body:
                values[f.name] = body[f.name]
            elif f.default is MISSING and f.default_factory is MISSING:
                raise KeyError(f"{cls.__name__}: the stage's body has no {f.name!r}")
        return cls(**values, body=dict(body))

    def to_dict(self) -> dict[str, Any]:
        """The body as the stage returned it before results were typed (``--json`` prints exactly this)."""
        return dict(self.body)
