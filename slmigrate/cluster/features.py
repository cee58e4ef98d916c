"""From task views to vectors: one embedded block per part of the view, weighted and concatenated.

Each block is L2-normalised and multiplied by the square root of its weight, so the squared Euclidean distance
between two calls is the weighted sum of their per-part squared chord distances (2 - 2 cos). The weights are what
``--granularity`` changes: coarse clusters are driven by the instructions and tools (which job), fine clusters
also by the answer's shape (which step of the job: which tool, JSON or a reply).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from slmigrate.cluster.views import OUTPUT_KINDS, TaskView
from slmigrate.cluster.embed import Embedder
from slmigrate.progress import Progress

BLOCKS = ("system", "tools", "turn", "answer", "shape")
# Blocks the router can compute before the model answers (assign() on a request without a response).
REQUEST_BLOCKS = ("system", "tools", "turn")

WEIGHTS = {
    # Coarse: which job (instructions and tools); the answer's shape barely counts, so one agent's tool calls
    # and its replies to the user stay one task. Fine: the answer's shape splits a job into its steps.
    "coarse": {"system": 0.55, "tools": 0.25, "turn": 0.15, "answer": 0.05, "shape": 0.0},
    "fine": {"system": 0.25, "tools": 0.1, "turn": 0.2, "answer": 0.35, "shape": 0.1},
}


def shape_vector(view: TaskView) -> np.ndarray:
    """Structural features: the output kind (one-hot)."""
    vec = np.zeros(len(OUTPUT_KINDS), dtype=np.float32)
    vec[OUTPUT_KINDS.index(view.kind)] = 1.0
    return vec


@dataclass
class Layout:
    """Where each block sits in the concatenated vector, and its weight."""

    dims: dict[str, int]
    weights: dict[str, float]

    def slices(self) -> dict[str, slice]:
        out, start = {}, 0
        for name in BLOCKS:
            out[name] = slice(start, start + self.dims[name])
            start += self.dims[name]
        return out

    @property
    def width(self) -> int:
        return sum(self.dims.values())

    def request_mask(self) -> np.ndarray:
        mask = np.zeros(self.width, dtype=bool)
        for name, sl in self.slices().items():
            if name in REQUEST_BLOCKS:
                mask[sl] = True
        return mask


def featurize(views: list[TaskView], embedder: Embedder, weights: dict[str, float], *,
              progress: Progress | None = None) -> tuple[np.ndarray, Layout]:
    """Vectors for ``views`` (which should already be distinct), shape (len(views), layout.width)."""
    # System prompts: embed the distinct chunks once, then average per distinct prompt.
    prompts = list(dict.fromkeys(v.system_chunks for v in views))
    chunks = list(dict.fromkeys(c for p in prompts for c in p))
    chunk_vecs = embedder.encode(chunks, progress=progress, desc="embedding system prompts")
    chunk_row = {c: i for i, c in enumerate(chunks)}
    prompt_vec = {}
    for p in prompts:
        mean = chunk_vecs[[chunk_row[c] for c in p]].mean(axis=0)
        prompt_vec[p] = mean / max(float(np.linalg.norm(mean)), 1e-12)
    system = np.stack([prompt_vec[v.system_chunks] for v in views]) if views else np.zeros((0, embedder.dim))
    tools = embedder.encode([v.tools for v in views], progress=progress, desc="embedding tool lists")
    answer = embedder.encode([v.answer for v in views], progress=progress, desc="embedding answer shapes")
    turn = embedder.encode([v.turn for v in views], progress=progress, desc="embedding turns")
    shape = np.stack([shape_vector(v) for v in views]) if views else np.zeros((0, len(OUTPUT_KINDS)))
    blocks = {"system": system, "tools": tools, "turn": turn, "answer": answer, "shape": shape}
    layout = Layout(dims={k: blocks[k].shape[1] for k in BLOCKS}, weights=dict(weights))
    matrix = np.concatenate([np.sqrt(weights[k]) * blocks[k].astype(np.float32) for k in BLOCKS], axis=1)
    return matrix.astype(np.float32), layout
