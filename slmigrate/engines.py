"""Where a stage's per-item heavy pass runs: "map this batch function over these items with N workers".

curate (presidio over distinct texts) and cluster (MiniLM over distinct texts) both have one expensive pass that
is a pure function of each item. ``map_batches`` runs such a pass

- ``local``: in this process (1 worker) or in N spawned worker processes on this machine;
- ``ray``: as a Ray Data ``map_batches`` over an actor pool (N actors of 1 CPU each) on a local Ray started for
  the purpose, or on an existing cluster given by address.

The function is given as a *factory*: a picklable callable that each worker calls once to load its model (spaCy
and presidio, or the embedder) and that returns ``fn(items) -> results``, one result per item. Results come back
in input order whatever the engine, so the order-dependent steps (dedup, splits, the clustering fit) stay on the
driver and give the same output as the local engine.

Ray is imported only here and only for ``engine="ray"``.
"""

from __future__ import annotations

import math
import os
import pickle
from collections.abc import Callable, Sequence
from typing import Any

from slmigrate import env
from slmigrate.errors import SlmigrateError
from slmigrate.progress import Advance

ENGINES = ("local", "ray")
BatchFn = Callable[[list[Any]], list[Any]]
Factory = Callable[[], BatchFn]

# Hub libraries on the workers must never try the network: the models are pip packages in the same Python.
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
               "TOKENIZERS_PARALLELISM": "false"}


def usable_cpus() -> int:
    """CPU cores this process may run on (its affinity mask, which containers and `taskset` narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def check_engine(engine: str, address: str | None = None) -> None:
    if engine not in ENGINES:
        raise SlmigrateError(f"unknown engine {engine!r}; expected one of {', '.join(ENGINES)}")
    if address and engine != "ray":
        raise SlmigrateError(f"--ray-address {address} needs --engine ray (the engine is {engine!r})")


def map_batches(items: Sequence[Any], factory: Factory, *, engine: str = "local", workers: int | None = 1,
                address: str | None = None, batch_size: int = 64, progress: Advance | None = None) -> list[Any]:
    """``fn(batch)`` over ``items`` in batches of ``batch_size``, ``fn = factory()`` loaded once per worker.

    ``workers=None`` means one per CPU (of this machine, or of the Ray cluster). Returns one result per item, in
    the order of ``items``; ``progress(n)`` is told as results arrive.
    """
    check_engine(engine, address)
    items = list(items)
    if not items:
        return []
    if engine == "ray":
        return _ray_map(items, factory, workers, address, batch_size, progress)
    workers = workers or usable_cpus()
    batches = [items[i:i + batch_size] for i in range(0, len(items), batch_size)]
    if workers <= 1 or len(batches) < 2:
        fn = factory()
        out: list[Any] = []
        for batch in batches:
            out.extend(_checked(fn, batch))
            if progress:
                progress(len(batch))
        return out
    return _process_map(batches, factory, workers, progress)


def _checked(fn: BatchFn, batch: list[Any]) -> list[Any]:
    result = list(fn(batch))
    if len(result) != len(batch):  # a programming error in the batch function, never user input
        raise RuntimeError(f"batch function returned {len(result)} results for {len(batch)} items")
    return result


# --- local worker processes ---
_FN: BatchFn | None = None


def _init_process(factory: Factory) -> None:
    global _FN
    die_with_parent()
    env.quiet_libraries()
    _FN = factory()


def die_with_parent(poll_s: float = 0.5) -> None:
    """Make this worker process exit when the process that started it dies.

    A pool's workers are told to stop when the parent shuts the pool down, but a parent killed outright
    (``kill -9``, the OOM killer) tells them nothing: each presidio or MiniLM worker (~570 MB) would live on. A
    daemon thread notices the re-parenting (``getppid`` changes) and exits. Polling works wherever Python
    does; Linux's PR_SET_PDEATHSIG would be immediate but fires when the parent's *thread* that started the
    worker ends, which a pool does not promise.
    """
    import threading
    import time

    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        os._exit(1)

    threading.Thread(target=watch, name="slmigrate-die-with-parent", daemon=True).start()


def _run_process(batch: list[Any]) -> list[Any]:
    assert _FN is not None
    return _checked(_FN, batch)


def _process_map(batches: list[list[Any]], factory: Factory, workers: int, progress: Advance | None) -> list[Any]:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    # One thread per worker process: N processes x all-core BLAS pools would fight over the same cores. The
    # children read these at import, so set them around the pool's start only.
    saved = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", *OFFLINE_ENV)}
    os.environ.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **OFFLINE_ENV})
    try:
        ctx = multiprocessing.get_context("spawn")  # fork would copy a loaded torch/spaCy state of the parent
        out: list[Any] = []
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init_process,
                                 initargs=(factory,)) as pool:
            for batch, result in zip(batches, pool.map(_run_process, batches)):
                out.extend(result)
                if progress:
                    progress(len(batch))
        return out
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# --- Ray ---
def require_ray():
    try:
        import ray
        import ray.data  # noqa: F401  (the [data] extra: pyarrow, pandas)
    except ImportError as exc:
        raise SlmigrateError(
            f"--engine ray needs Ray Data, which is not installed ({exc.name}); install it with "
            "`pip install 'slmigrate[ray]'` (or `pip install 'ray[data]'`), or use --engine local"
        ) from exc
    return ray


def ray_init(workers: int | None, address: str | None = None):
    """Connect to the Ray cluster at ``address``, or start a local Ray with ``workers`` CPUs; reuses a Ray this
    process already started. Returns the ``ray`` module."""
    import logging

    ray = require_ray()
    if ray.is_initialized():
        return ray
    # Ray Data's execution summaries would bury the stage's report; errors still show.
    logging.getLogger("ray.data").setLevel(logging.ERROR)
    runtime_env = {"env_vars": dict(OFFLINE_ENV)}
    common = dict(runtime_env=runtime_env, log_to_driver=False, logging_level=logging.ERROR,
                  configure_logging=True)
    try:
        if address:
            ray.init(address=address, **common)
        else:
            # Ray starts its workers at niceness 15; the local engine's processes run at the user's priority, and so
            # should these: on a busy machine niced workers get a sliver of the CPU the same work gets locally.
            os.environ.setdefault("RAY_worker_niceness", "0")
            ray.init(num_cpus=workers or os.cpu_count() or 1, include_dashboard=False, **common)
    except ConnectionError as exc:
        raise SlmigrateError(f"cannot connect to the Ray cluster at {address}: {exc}; check --ray-address "
                             "(e.g. ray://head:10001 or auto) and that the cluster is up") from exc
    return ray


class _RayBatchActor:
    """One per Ray worker: loads the pass once, then maps pickled items to pickled results."""

    def __init__(self, factory: Factory) -> None:
        self.fn = factory()

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import numpy as np

        items = [pickle.loads(b) for b in batch["item"]]
        results = _checked(self.fn, items)
        out = np.empty(len(results), dtype=object)
        out[:] = [pickle.dumps(r, protocol=pickle.HIGHEST_PROTOCOL) for r in results]
        return {"i": batch["i"], "out": out}


def _ray_map(items: list[Any], factory: Factory, workers: int | None, address: str | None, batch_size: int,
             progress: Advance | None) -> list[Any]:
    ray = ray_init(workers, address)
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False  # the stage reports through its own progress callback
    ctx.verbose_progress = False
    ctx.print_on_execution_start = False
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    if workers is None:
        workers = cpus
    elif not address:
        # A local Ray started earlier in this process with fewer CPUs would never place the extra 1-CPU actors.
        workers = min(workers, cpus)
    # Items travel pickled: any Python value (texts, lists of texts) fits an Arrow binary column unchanged.
    rows = [{"i": i, "item": pickle.dumps(x, protocol=pickle.HIGHEST_PROTOCOL)} for i, x in enumerate(items)]
    # About one batch per block, capped so a huge input is not cut into thousands of tiny scheduling units.
    blocks = max(1, min(math.ceil(len(items) / batch_size), 32 * workers))
    ds = ray.data.from_items(rows, override_num_blocks=blocks)
    ds = ds.map_batches(_RayBatchActor, fn_constructor_args=(factory,), batch_size=batch_size,
                        batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=workers), num_cpus=1)
    out: list[Any] = [None] * len(items)
    done = 0
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for i, blob in zip(batch["i"], batch["out"]):
            out[int(i)] = pickle.loads(blob)
        done += len(batch["i"])
        if progress:
            progress(len(batch["i"]))
    if done != len(items):
        raise RuntimeError(f"Ray returned {done} results for {len(items)} items")
    return out
