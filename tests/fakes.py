"""Test stand-ins that stay out of the package.

``HashEmbedder``: a deterministic bag-of-words embedding with the ``Embedder`` interface. Tests pass it as
``embedder=`` to the cluster and evaluate functions; tests/conftest.py also registers it as ``"hash"``
(``slmigrate.cluster.embed.register_embedder``) so a test's config file or CLI run can name it. Users cannot:
``get_embedder("hash")`` outside the test suite is an error listing the real embedders.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

import numpy as np

from slmigrate.cluster.embed import Embedder, register_embedder

_TOKEN = re.compile(r"[a-z0-9_]+")
# Word and bigram vectors the hash embedder keeps (~0.6 KB each): a million distinct turns bring millions of
# bigrams, so the table is dropped when full instead of growing with the log.
_MAX_WORDS = 100_000


class HashEmbedder(Embedder):
    """Deterministic bag-of-words embedding for tests: texts sharing words get similar vectors.

    Each word (and word bigram) adds a pseudo-random +-1 vector seeded by its hash, so the geometry behaves like
    a crude semantic embedding without any model or randomness between runs.
    """

    name = "hash"

    def __init__(self, dim: int = 128, *, cache_size: int | None = None) -> None:
        super().__init__(cache_size=cache_size)
        self.dim = dim
        self._words: dict[str, np.ndarray] = {}

    def _word_vector(self, word: str) -> np.ndarray:
        vec = self._words.get(word)
        if vec is None:
            if len(self._words) >= _MAX_WORDS:  # bounded: vectors are recomputed identically when needed again
                self._words.clear()
            seed = int.from_bytes(hashlib.sha256(word.encode("utf-8")).digest()[:8], "little")
            vec = np.random.default_rng(seed).choice((-1.0, 1.0), size=self.dim).astype(np.float32)
            self._words[word] = vec
        return vec

    def _encode_unique(self, texts: list[str], *, progress: Any, desc: str) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for row, text in enumerate(texts):
            words = _TOKEN.findall(text.lower())
            for token in words + [a + " " + b for a, b in zip(words, words[1:])]:
                out[row] += self._word_vector(token)
            if not words:
                out[row] += self._word_vector("<empty>")
        return out


def register() -> None:
    """Let config files and CLI runs in this process name the hash embedder (``embedder = "hash"``)."""
    register_embedder(HashEmbedder.name, HashEmbedder)
