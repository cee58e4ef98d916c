"""Which cluster does a live request belong to? The cluster stage's saved model, applied to the request alone."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from slmigrate.record import CallRecord
from slmigrate.workspace import Workspace


def request_assigner(ws: Workspace, embedder: Any = None, *,
                     fast: bool = True) -> Callable[[dict[str, Any]], tuple[str | None, None]]:
    """``assign(request) -> (cluster id or None, distance)``.

    A request has no answer yet. First the signature fast path (``ClusterModel.fast_assign``: system prompt,
    tool names and response format that the clustered calls tie to exactly one cluster; no embedding at all);
    otherwise ``ClusterModel.assign`` compares only the request blocks (system prompt, tools, latest turn)
    against each cluster's request radius: outside every radius means "not confident", and the request goes to
    the LLM. The model reports no distance, so the second value is None. ``fast=False`` always embeds.
    """
    from slmigrate.cluster.model import ClusterModel
    from slmigrate.cluster.embed import ROUTER_CACHE, cache_size_from_env, get_embedder

    model = ClusterModel.load(ws, embedder=embedder)
    if embedder is None:
        # A router runs for weeks and sees a new latest turn in most requests: keep its cache small and bounded.
        model._embedder = get_embedder(model.embedder_name, cache_size=cache_size_from_env(ROUTER_CACHE))

    def assign(request: dict[str, Any]) -> tuple[str | None, None]:
        return model.assign_many([CallRecord(request=request)], fast=fast)[0], None

    assign.model = model  # type: ignore[attr-defined]  # for benchmarks and tests: which table, which embedder
    return assign
