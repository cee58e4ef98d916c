"""Benchmark: task discovery on the path users take, over every labelled log we have.

Each log goes through the CLI with defaults - ``slmigrate collect import`` -> ``slmigrate curate`` ->
``slmigrate cluster`` - with the ground truth stripped from the file first (the clusterer never sees metadata),
then each curated call's cluster (``calls list``'s ``cluster``; unclustered = one extra label) is scored against
the truth: adjusted Rand index (ARI), homogeneity over all curated calls and over the clustered ones, the number
of tasks, the largest task's share and the unclustered share.

| log | truth |
|---|---|
| tau2 (3,223 GPT-4.1 calls, shared/data) | role x domain x mode (7 classes) |
| tau-bench airline (2,454 GPT-4o agent turns) | next action: tool name or ``text`` |
| BFCL simple_python + multiple (600 questions) | the function called (nearly every question its own) |
| examples/agent_log.py (600 calls, seed 0) | task kind (5 + one-offs) |
| template-in-user-turn agent (tests/synthetic_agents.py) | prompt template (8) |
| ReAct-prompt agents (tests/synthetic_agents.py) | agent (each agent's job: its prompt and tools) |

The commands run in this process through ``slmigrate.cli.main`` (the same code as the ``slmigrate`` executable)
so that two caches can be shared between runs on a busy machine: the imported-and-curated workspace per (log,
--pii) is kept under the cache folder (``--fresh`` redoes it), and MiniLM's vectors are kept in a file keyed by
text (``--no-embed-cache`` embeds everything again). Neither changes a result: the workspace is what import and
curate would produce again, and a cached vector is the one MiniLM gave for that text. ``cluster --force`` always
re-clusters.

Usage:
  .venv/bin/python tests/benchmarks/discovery.py                        # every log, --pii placeholder (default)
  .venv/bin/python tests/benchmarks/discovery.py --logs tau2 --pii placeholder,off --workers-1
  .venv/bin/python tests/benchmarks/discovery.py --logs template,react,examples --json out.json
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import hashlib
import io
import json
import os
import pickle
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"
CACHE = Path(os.environ.get("SLMIGRATE_DISCOVERY_CACHE", "/tmp/slmigrate-discovery"))


# --- the logs: (input file written to the cache, extra import args, truth per input id) --------------------------

def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")


def _openai_rows(rows: list[dict[str, Any]], truth: Callable[[dict], str], folder: Path, name: str):
    """Rows with ``id``: the file without metadata, and the truth per id."""
    path = folder / f"{name}.jsonl"
    _write_jsonl(path, [{k: v for k, v in r.items() if k != "metadata"} for r in rows])
    return path, [], {str(r["id"]): truth(r) for r in rows}


def log_tau2(folder: Path):
    rows = [json.loads(line) for line in gzip.open(SHARED / "tau2-bench/tau2_gpt41_calls.openai.jsonl.gz", "rt")]
    return _openai_rows(rows, lambda r: f"{r['metadata']['role']}/{r['metadata']['domain']}/{r['metadata']['mode']}",
                        folder, "tau2")


def _next_action(message: dict[str, Any]) -> str:
    calls = message.get("tool_calls") or []
    return ((calls[0].get("function") or {}).get("name") or "?") if calls else "text"


def log_tau_bench(folder: Path):
    data = json.loads((SHARED / "tau-bench/gpt-4o-airline.json").read_text())
    path = folder / "tau_bench.json"
    # Only the trajectory and its key: reward and task info stay out of what the clusterer could see.
    path.write_text(json.dumps([{"task_id": t["task_id"], "trial": t["trial"], "traj": t["traj"]} for t in data]))
    truth = {}
    for t in data:
        for i, m in enumerate(t["traj"]):
            if m.get("role") == "assistant" and i > 0:
                truth[f"{t['task_id']}:{t['trial']}#{i}"] = _next_action(m)
    return path, ["--tools", str(SHARED / "tau-bench/airline_tools.derived.json")], truth


def log_bfcl(folder: Path):
    from slmigrate.collect import bfcl

    rows = [{"id": r.input_id, "model": r.model, "request": r.request, "response": r.response}
            for r in bfcl.load(SHARED / "bfcl")]
    return _openai_rows(rows, lambda r: _next_action(r["response"]["choices"][0]["message"]), folder, "bfcl")


def log_examples(folder: Path):
    sys.path.insert(0, str(ROOT / "examples"))
    import agent_log

    return _openai_rows(agent_log.generate(600, seed=0), lambda r: r["metadata"]["task"], folder, "examples")


def log_template(folder: Path):
    import synthetic_agents

    return _openai_rows(synthetic_agents.template_log(480, seed=0), lambda r: r["metadata"]["template"], folder,
                        "template")


def log_react(folder: Path):
    import synthetic_agents

    return _openai_rows(synthetic_agents.react_log(480, seed=0),
                        lambda r: r["metadata"]["agent"], folder, "react")


LOGS = {"tau2": log_tau2, "tau_bench": log_tau_bench, "bfcl": log_bfcl, "examples": log_examples,
        "template": log_template, "react": log_react}
TRUTH = {"tau2": "role x domain x mode", "tau_bench": "next action", "bfcl": "function called",
         "examples": "task kind", "template": "prompt template", "react": "agent"}


# --- MiniLM with its vectors kept on disk between runs ------------------------------------------------------------

_STORE: dict[str, np.ndarray] = {}
_STORE_FILE = CACHE / "minilm-vectors.pkl"


def _cached_embedder_class():
    from slmigrate.cluster.embed import MiniLMEmbedder

    class DiskCachedMiniLM(MiniLMEmbedder):
        """MiniLM whose vectors also live in ``_STORE`` (saved to the cache folder): a text embedded by an
        earlier run, here or in a worker process, is not embedded again."""

        def missing(self, texts):
            return [t for t in super().missing(texts) if t not in _STORE]

        def _encode_unique(self, texts, *, progress, desc):
            todo = [t for t in texts if t not in _STORE]
            if todo:
                for t, v in zip(todo, super()._encode_unique(todo, progress=progress, desc=desc)):
                    _STORE[t] = np.asarray(v, dtype=np.float32)
            return np.stack([_STORE[t] for t in texts])

        def __reduce__(self):
            # A worker process gets a plain MiniLM (this class is local to the benchmark); its vectors come back
            # through prime().
            return (MiniLMEmbedder, (), self.__getstate__())

        def prime(self, texts, vectors):
            super().prime(texts, vectors)
            for t, v in zip(texts, vectors):
                _STORE.setdefault(t, np.asarray(v, dtype=np.float32))

    return DiskCachedMiniLM


def _load_store() -> None:
    if _STORE_FILE.exists():
        _STORE.update(pickle.loads(_STORE_FILE.read_bytes()))


def _save_store() -> None:
    try:  # another run may have added vectors since this one loaded the file
        for text, vec in pickle.loads(_STORE_FILE.read_bytes()).items():
            _STORE.setdefault(text, vec)
    except (OSError, EOFError, pickle.UnpicklingError):
        pass
    tmp = _STORE_FILE.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_bytes(pickle.dumps(_STORE, protocol=pickle.HIGHEST_PROTOCOL))
    tmp.replace(_STORE_FILE)


# --- one run -------------------------------------------------------------------------------------------------------

def cli(*args: str) -> None:
    """``slmigrate ARGS`` in this process; its output is discarded, a non-zero exit is an error."""
    from slmigrate.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        code = main(list(args))
    if code not in (0, 2):  # 2: import skipped some records (reported)
        raise SystemExit(f"slmigrate {' '.join(args)} exited {code}:\n{out.getvalue()[-3000:]}")


def prepare(name: str, pii: str, fresh: bool) -> tuple[Path, dict[str, str]]:
    """The imported and curated workspace of ``name`` with ``--pii pii`` (cached), and the truth per input id."""
    folder = CACHE / "inputs"
    folder.mkdir(parents=True, exist_ok=True)
    path, import_args, truth = LOGS[name](folder)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    ws = CACHE / f"ws-{name}-{pii}-{digest}"
    done = ws / ".benchmark-ready"
    if fresh or not done.exists():
        import shutil

        shutil.rmtree(ws, ignore_errors=True)
        started = time.time()
        cli("collect", "import", str(path), *import_args, "--workspace", str(ws))
        cli("curate", "--pii", pii, "--workspace", str(ws))
        done.write_text(f"{time.time() - started:.1f}\n")
    return ws, truth


def score(name: str, ws_path: Path, truth: dict[str, str]) -> dict[str, Any]:
    from sklearn.metrics import adjusted_rand_score, homogeneity_score

    from slmigrate import artifacts
    from slmigrate.calls import list_calls
    from slmigrate.curate import dataset as curated
    from slmigrate.workspace import Workspace

    ws = Workspace(ws_path)
    kept = {i for part in curated.iter_batches(ws, ["id"]) for i in part["id"]}
    rows = [r for r in list_calls(ws, 0) if r["id"] in kept]
    labels = [truth[str(r["input_id"])] for r in rows]
    got = [r["cluster"] or "unclustered" for r in rows]
    clustered = [i for i, r in enumerate(rows) if r["cluster"]]
    body = artifacts.clusters_file(ws)
    sizes = Counter(r["cluster"] for r in rows if r["cluster"])
    n = len(rows)
    return {
        "log": name, "calls": n, "classes": len(set(labels)), "tasks": len(sizes),
        "largest_share": round(max(sizes.values()) / n, 3) if sizes else 0.0,
        "unclustered_share": round(1 - len(clustered) / n, 3) if n else 0.0,
        "ari": round(adjusted_rand_score(labels, got), 3),
        "homogeneity": round(homogeneity_score(labels, got), 3),
        "homogeneity_clustered": round(homogeneity_score([labels[i] for i in clustered],
                                                         [got[i] for i in clustered]), 3) if clustered else 0.0,
        "labels": [c["label"] for c in body["clusters"]][:12],
        "warning": body.get("warning"),
        "_assignment": {r["input_id"]: r["cluster"] for r in rows},
    }


def run_one(name: str, pii: str, fresh: bool, workers: int | None, embed_cache: bool) -> dict[str, Any]:
    ws, truth = prepare(name, pii, fresh)
    args = ["cluster", "--force", "--workspace", str(ws)] + (["--workers", str(workers)] if workers else [])
    started = time.time()
    if embed_cache:
        import slmigrate.cluster.run as run_module

        original = run_module.get_embedder
        cls = _cached_embedder_class()
        run_module.get_embedder = lambda name="minilm", **kw: cls(**kw) if name == "minilm" else original(name, **kw)
        try:
            cli(*args)
        finally:
            run_module.get_embedder = original
            _save_store()
    else:
        cli(*args)
    result = score(name, ws, truth)
    result.update(pii=pii, workers=workers or "default", cluster_s=round(time.time() - started, 1))
    return result


def markdown(results: list[dict[str, Any]]) -> str:
    lines = ["| log (truth) | --pii | calls | classes | tasks | largest | unclustered | ARI | homogeneity | "
             "homog. clustered | cluster s |", "|---" * 11 + "|"]
    for r in results:
        lines.append(f"| {r['log']} ({TRUTH[r['log']]}) | {r['pii']} | {r['calls']:,} | {r['classes']} | "
                     f"{r['tasks']} | {r['largest_share']:.0%} | {r['unclustered_share']:.0%} | **{r['ari']:.3f}** "
                     f"| {r['homogeneity']:.3f} | {r['homogeneity_clustered']:.3f} | {r['cluster_s']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--logs", default=",".join(LOGS), help=f"comma-separated, from {', '.join(LOGS)}")
    parser.add_argument("--pii", default="placeholder", help="curate --pii modes, comma-separated")
    parser.add_argument("--workers-1", action="store_true",
                        help="also cluster with --workers 1, embedding every text afresh in this one process, and "
                        "report whether the partition is identical")
    parser.add_argument("--fresh", action="store_true", help="import and curate again")
    parser.add_argument("--no-embed-cache", action="store_true", help="embed every text again")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    CACHE.mkdir(parents=True, exist_ok=True)
    if not args.no_embed_cache:
        _load_store()
    results = []
    for name in args.logs.split(","):
        for pii in args.pii.split(","):
            r = run_one(name, pii, args.fresh, None, not args.no_embed_cache)
            print(json.dumps({k: v for k, v in r.items() if not k.startswith("_")}), flush=True)
            if args.workers_1:
                # In one process, every text embedded afresh (the cached vectors came from worker processes).
                one = run_one(name, pii, False, 1, False)
                r["same_with_workers_1"] = one["_assignment"] == r["_assignment"]
                print(f"{name} --pii {pii}: --workers 1 identical: {r['same_with_workers_1']}", flush=True)
            results.append(r)
        by_pii = {r["pii"]: r for r in results if r["log"] == name}
        if "off" in by_pii and len(by_pii) > 1:
            # Scrubbing on or off must give the same tasks: the partitions compared over the calls both kept.
            from sklearn.metrics import adjusted_rand_score

            off = by_pii["off"]["_assignment"]
            for pii, r in by_pii.items():
                if pii != "off":
                    common = sorted(set(off) & set(r["_assignment"]))
                    r["ari_vs_pii_off"] = round(adjusted_rand_score(
                        [off[i] or "-" for i in common], [r["_assignment"][i] or "-" for i in common]), 3)
                    print(f"{name}: --pii {pii} vs off: {r['tasks']} vs {by_pii['off']['tasks']} tasks, ARI between "
                          f"the partitions {r['ari_vs_pii_off']}", flush=True)
    print(markdown(results))
    if args.json:
        Path(args.json).write_text(json.dumps([{k: v for k, v in r.items() if not k.startswith("_")}
                                               for r in results], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
