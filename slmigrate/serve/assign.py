"""Which cluster does a live request belong to? The cluster stage's saved model, applied to the request alone."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from slmigrate.record import CallRecord
from slmigrate.workspace import Workspace


def request_assigner(ws: Workspace, embedder: Any = None) -> Callable[[dict[str, Any]], tuple[str | None, None]]:
    """``assign(request) -> (cluster id or None, distance)``.

    A request has no answer yet, so ``ClusterModel.assign`` compares only the request blocks (system prompt,
    tools, latest turn) against each cluster's request radius: outside every radius means "not confident", and
    the request goes to the LLM. The model reports no distance, so the second value is None.
    """
    from slmigrate.cluster.model import ClusterModel

    model = ClusterModel.load(ws, embedder=embedder)

    def assign(request: dict[str, Any]) -> tuple[str | None, None]:
        return model.assign(CallRecord(request=request)), None

    return assign
