"""The embedder interface: normalised rows, each distinct text encoded once, real MiniLM offline."""

import os
import pickle
import subprocess
import sys

import numpy as np
import pytest

from fakes import HashEmbedder
from slmigrate.cluster.embed import Embedder, MiniLMEmbedder, get_embedder, register_embedder
from slmigrate.errors import SlmigrateError


class CountingEmbedder(HashEmbedder):
    def __init__(self):
        super().__init__(dim=32)
        self.seen: list[str] = []

    def _encode_unique(self, texts, *, progress, desc):
        self.seen.extend(texts)
        return super()._encode_unique(texts, progress=progress, desc=desc)


def test_hash_embedder_is_normalised_and_deterministic():
    a = HashEmbedder().encode(["cancel my order", "cancel my order please", "write a haiku about rain"])
    b = HashEmbedder().encode(["cancel my order", "cancel my order please", "write a haiku about rain"])
    assert a.shape == (3, 128) and a.dtype == np.float32
    assert np.allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-5)
    assert np.array_equal(a, b)
    # Shared words make vectors closer: a crude but real semantic signal for unit tests.
    assert a[0] @ a[1] > a[0] @ a[2] + 0.3


def test_an_embedder_goes_to_a_worker_without_its_cache_or_model():
    embedder = HashEmbedder()
    rows = embedder.encode(["cancel my order", "where is my parcel"])
    copy = pickle.loads(pickle.dumps(embedder))
    assert embedder.cache_size == 2 and copy.cache_size == 0 and copy.cache_max == embedder.cache_max
    assert np.array_equal(copy.encode(["cancel my order", "where is my parcel"]), rows)
    minilm = MiniLMEmbedder(max_seq_length=64)
    minilm._model, minilm._onnx = "a loaded model", "an onnxruntime session"  # the worker loads its own
    copy = pickle.loads(pickle.dumps(minilm))
    assert copy._model is None and copy._onnx is None and copy.max_seq_length == 64


def test_each_distinct_text_is_encoded_once():
    emb = CountingEmbedder()
    out = emb.encode(["x y", "x y", "z", "x y"])
    assert emb.seen == ["x y", "z"]
    assert np.array_equal(out[0], out[1]) and np.array_equal(out[0], out[3])
    emb.encode(["z", "new text"])
    assert emb.seen == ["x y", "z", "new text"]
    assert emb.cache_size == 3


def test_empty_input_and_unknown_name():
    assert HashEmbedder(dim=8).encode([]).shape == (0, 8)
    with pytest.raises(SlmigrateError, match="unknown embedder 'word2vec'; valid embedders: minilm"):
        get_embedder("word2vec")
    assert isinstance(get_embedder("hash"), Embedder)  # registered by tests/conftest.py


def test_the_test_embedder_is_no_user_option(tmp_path):
    """Without the test suite's registration, "hash" is an unknown embedder: the CLI says which ones exist."""
    from conftest import ROOT

    code = ("from slmigrate.cluster.embed import get_embedder\n"
            "try:\n    get_embedder('hash')\nexcept Exception as exc:\n    print(type(exc).__name__, exc)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, check=True).stdout
    assert out.startswith("SlmigrateError unknown embedder 'hash'; valid embedders: minilm"), out
    from slmigrate.cluster import embed

    assert not hasattr(embed, "HashEmbedder")
    # A registered name can be taken back, and built-in names are not replaceable.
    register_embedder("tmp", HashEmbedder)
    assert get_embedder("tmp", dim=4).dim == 4
    register_embedder("tmp", None)
    with pytest.raises(SlmigrateError, match="unknown embedder 'tmp'"):
        get_embedder("tmp")
    with pytest.raises(ValueError):
        register_embedder("minilm", HashEmbedder)


@pytest.mark.slow
def test_minilm_offline_similarity():
    emb = get_embedder("minilm")
    vecs = emb.encode(["Where is my package?", "Has my order shipped yet?", "Write a poem about the sea."])
    assert vecs.shape == (3, 384)
    assert np.allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-4)
    assert vecs[0] @ vecs[1] > vecs[0] @ vecs[2] + 0.2


@pytest.mark.slow
def test_minilm_on_onnx_runtime_gives_the_torch_vectors(tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    monkeypatch.setenv("SLMIGRATE_MODEL_CACHE", str(tmp_path))
    texts = ["Where is my package?", "tools offered: book_reservation, cancel_reservation", "calls tool think()",
             "user: " + "my flight was cancelled and I need a refund for all three passengers " * 12,
             *[f"Classify ticket {i}: the printer on floor {i} is jammed again" for i in range(12)]]
    torch_run = MiniLMEmbedder(cache_size=0)
    torch_run._onnx = False  # torch, as without onnxruntime
    onnx_run = MiniLMEmbedder(cache_size=0)
    expected, got = torch_run.encode(texts), onnx_run.encode(texts)
    assert onnx_run._session() is not None and len(list(tmp_path.glob("*/model.onnx"))) == 1  # exported once, here
    assert np.abs(expected - got).max() < 1e-4
    assert np.abs(onnx_run.encode(texts[:2]) - expected[:2]).max() < 1e-4  # the router's few-texts path too
