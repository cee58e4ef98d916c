"""Benchmark: `slmigrate cluster` time on the tau2 calls and on 10k / 100k generated calls, real MiniLM on CPU.

Each dataset is clustered with a fresh embedder (cold: every distinct text embedded) and then twice more with the
embedder's cache warm (the clustering itself); the JSON line reports the cold time, the median warm time, the
number of distinct task views and texts embedded, and the 100k/10k ratio.

The generated calls come from templates with slot values from small pools, like a real agent whose prompts and
tools repeat while the inputs vary; 0.5% are one-off requests made of random words. Digits are masked by the task
view, so order numbers and the like do not make texts distinct.

``--compare WORKSPACE`` instead runs `slmigrate cluster --force --workers 1` (the library call the command makes)
on a curated workspace - tau2 imported and curated with defaults, e.g. the one tests/benchmarks/discovery.py
caches - once per path and repeat, the paths alternating so the box's load hits them alike, each with a cold
embedder: ``torch`` (MiniLM through sentence-transformers, the path before ONNX Runtime), ``onnx`` (the default
when onnxruntime is installed) and, on request, ``onnx-turn160`` (the latest turn cut at 160 characters instead
of 320: a candidate that was measured and rejected, docs/benchmarks.md).
It reports each path's median seconds, ratio to torch, task count and the ARI of its partition against torch's.

Usage: .venv/bin/python tests/benchmarks/cluster_speed.py [--sizes 10000,100000] [--no-tau2]
       .venv/bin/python tests/benchmarks/cluster_speed.py --compare /tmp/slmigrate-discovery/ws-tau2-placeholder-*
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from slmigrate.cluster import cluster_calls  # noqa: E402
from slmigrate.config import ClusterConfig  # noqa: E402
from slmigrate.cluster.embed import MiniLMEmbedder  # noqa: E402
from slmigrate.record import CallRecord  # noqa: E402

PRODUCTS = [f"{a} {b}" for a in ("Trail", "Summit", "Canyon", "Harbor", "Glacier") for b in
            ("Backpack", "Jacket", "Tent", "Stove")]
ISSUES = ("arrived late", "is damaged", "is the wrong size", "was never delivered", "was charged twice",
          "is missing a part", "does not fit", "stopped working")
TASKS = {
    "triage": ("Classify the customer's message into one intent label. Answer with the label only.",
               ("My {p} order {n} {i}.", "Hello, the {p} {i}, order {n}.", "Order {n}: my {p} {i}!"),
               lambda p, i: "return_request", None),
    "extract": ("Extract product, issue and order number from the message as a JSON object.",
                ("My {p} order {n} {i}.", "Hi, order {n} - the {p} {i}.", "The {p} from order {n} {i}."),
                lambda p, i: json.dumps({"product": p, "issue": i, "order": "0"}), None),
    "route": ("Call exactly one support tool with arguments from the customer's message.",
              ("Please help: the {p} {i} (order {n}).", "Order {n} {p} {i}, what now?"),
              lambda p, i: ("open_ticket", {"product": p, "reason": i}), ["open_ticket", "refund", "track"]),
    "reply": ("Write a short, friendly reply to the customer acknowledging their problem.",
              ("The {p} I bought {i}. Order {n}.", "I'm upset: my {p} {i}."),
              lambda p, i: f"I'm sorry your {p} {i}. We'll sort it out today.", None),
    "sql": ("Write one SQLite query over orders(id, product, issue, created_at) answering the analyst.",
            ("How many {p} orders {i} last month?", "List orders where the {p} {i}."),
            lambda p, i: f"SELECT COUNT(*) FROM orders WHERE product = '{p}' AND issue = '{i}';", None),
    "summary": ("Summarise the support conversation in one sentence for the ticket.",
                ("Customer: my {p} {i}. Agent: I have opened a ticket for order {n}.",),
                lambda p, i: f"The customer's {p} {i}; a ticket was opened.", None),
}
WORDS = ("poem river budget hiring garden office lunch travel quarterly roadmap coffee printer holiday party "
         "speech slogan recipe museum weekend translation").split()


def _record(system, user, answer, tools=None):
    request = {"model": "gpt-4o", "messages": [{"role": "system", "content": system},
                                               {"role": "user", "content": user}]}
    if tools:
        request["tools"] = [{"type": "function", "function": {"name": t, "parameters": {}}} for t in tools]
    if isinstance(answer, tuple):
        message = {"role": "assistant", "content": None, "tool_calls": [{"id": "c", "type": "function", "function": {
            "name": answer[0], "arguments": json.dumps(answer[1])}}]}
    else:
        message = {"role": "assistant", "content": answer}
    usage = {"prompt_tokens": len(system + user) // 4, "completion_tokens": max(1, len(str(answer)) // 4)}
    return CallRecord(request=request, response={"choices": [{"index": 0, "message": message}], "usage": usage})


def generate(n: int, seed: int = 0) -> list[CallRecord]:
    rng = random.Random(seed)
    names = list(TASKS)
    calls = []
    for k in range(n):
        if rng.random() < 0.005:
            words = " ".join(rng.sample(WORDS, 6))
            calls.append(_record("You are a helpful assistant.", f"Help me with {words}.", f"Sure: {words}."))
            continue
        system, templates, answer, tools = TASKS[names[rng.randrange(len(names))]]
        p, i = rng.choice(PRODUCTS), rng.choice(ISSUES)
        user = rng.choice(templates).format(p=p, i=i, n=rng.randint(10000, 99999))
        calls.append(_record(system, user, answer(p, i), tools))
    for k, call in enumerate(calls):
        call.timestamp = f"2025-01-01T00:00:{k % 60:02d}.000Z"
        call.input_id = str(k)
        call.finalise()
    return calls


def load_tau2() -> list[CallRecord] | None:
    path = ROOT.parent / "shared" / "data" / "tau2-bench" / "tau2_gpt41_calls.openai.jsonl.gz"
    if not path.exists():
        return None
    return [CallRecord(request=r["request"], response=r["response"]).finalise()
            for r in (json.loads(line) for line in gzip.open(path, "rt"))]


def measure(calls: list[CallRecord], embedder: MiniLMEmbedder) -> dict:
    cfg = ClusterConfig(map=False)
    start = time.perf_counter()
    body, _, _, _ = cluster_calls(calls, cfg, embedder=embedder)
    cold = time.perf_counter() - start
    warm = []
    for _ in range(2):
        start = time.perf_counter()
        cluster_calls(calls, cfg, embedder=embedder)
        warm.append(time.perf_counter() - start)
    return {"calls": len(calls), "cold_s": round(cold, 2), "warm_median_s": round(statistics.median(warm), 2),
            "texts_embedded": embedder.cache_size, "clusters": len(body["clusters"]),
            "unclustered_share": body["unclustered"]["share"]}


class TorchMiniLM(MiniLMEmbedder):
    """MiniLM on torch even where onnxruntime is installed: the path before it."""

    def _session(self):
        return None


def compare(workspace: str, paths: list[str], repeats: int) -> dict:
    """Each path ``repeats`` times on the curated ``workspace``, alternating; see the module docstring."""
    from sklearn.metrics import adjusted_rand_score

    import slmigrate.cluster.views as views
    from slmigrate.calls import list_calls
    from slmigrate.cluster.run import cluster
    from slmigrate.config import Config
    from slmigrate.workspace import Workspace

    ws = Workspace(Path(workspace))
    config = Config()
    config.cluster.workers, config.cluster.map = 1, True
    default_turn = views.TURN_CHARS
    times: dict[str, list[float]] = {p: [] for p in paths}
    partition: dict[str, dict] = {}
    for _ in range(repeats):
        for path in paths:
            views.TURN_CHARS = 160 if path.endswith("turn160") else default_turn
            embedder = TorchMiniLM() if path == "torch" else MiniLMEmbedder()
            start = time.perf_counter()
            result = cluster(ws, config, force=True, embedder=embedder)
            times[path].append(time.perf_counter() - start)
            partition[path] = {r["id"]: r["cluster"] or "-" for r in list_calls(ws, 0)}
            print(json.dumps({"partial": path, "s": round(times[path][-1], 1), "tasks": len(result.clusters)}),
                  file=sys.stderr, flush=True)
    views.TURN_CHARS = default_turn
    base = paths[0]
    ids = sorted(partition[base])
    out = {"workspace": workspace, "calls": len(ids), "repeats": repeats}
    for path in paths:
        median = statistics.median(times[path])
        out[path] = {"median_s": round(median, 1), "runs_s": [round(t, 1) for t in times[path]],
                     "ratio_to_" + base: round(median / statistics.median(times[base]), 2),
                     "tasks": len(set(partition[path].values()) - {"-"}),
                     "ari_vs_" + base: round(adjusted_rand_score([partition[base][i] for i in ids],
                                                                 [partition[path][i] for i in ids]), 3)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,100000")
    parser.add_argument("--no-tau2", action="store_true")
    parser.add_argument("--compare", metavar="WORKSPACE", help="time the embedding paths on a curated workspace")
    parser.add_argument("--paths", default="torch,onnx", help="from torch, onnx, onnx-turn160")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if args.compare:
        print(json.dumps(compare(args.compare, args.paths.split(","), args.repeats)))
        return
    import torch

    out: dict = {"benchmark": "cluster_speed", "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count()}
    start = time.perf_counter()
    probe = MiniLMEmbedder()
    probe.encode(["warm up"])
    out["model_load_s"] = round(time.perf_counter() - start, 2)
    model = probe._model  # share the loaded weights, not the text cache: each dataset starts cold

    def fresh():
        emb = MiniLMEmbedder()
        emb._model = model
        return emb

    tau2 = None if args.no_tau2 else load_tau2()
    if tau2 is not None:
        out["tau2"] = measure(tau2, fresh())
        print(json.dumps({"partial": "tau2", **out["tau2"]}), file=sys.stderr, flush=True)
    for size in (int(s) for s in args.sizes.split(",") if s):
        start = time.perf_counter()
        calls = generate(size)
        gen = time.perf_counter() - start
        out[f"gen_{size}"] = {**measure(calls, fresh()), "generate_s": round(gen, 2)}
        print(json.dumps({"partial": size, **out[f"gen_{size}"]}), file=sys.stderr, flush=True)
    sizes = [int(s) for s in args.sizes.split(",") if s]
    if len(sizes) == 2:
        a, b = (out[f"gen_{s}"] for s in sizes)
        out["ratio_cold"] = round(b["cold_s"] / a["cold_s"], 2)
        out["ratio_warm"] = round(b["warm_median_s"] / a["warm_median_s"], 2)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
