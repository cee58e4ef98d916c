"""Agreement of the served small models on fresh RAW traffic, beside evaluate's test figure (train/serve skew).

evaluate measures a fine-tuned task on its curated test split: calls scrubbed the way its training calls were
(``[curate] pii``). The router serves raw traffic. This benchmark takes a workspace with trained adapters and
evaluations (e.g. a copy of the demo workspace), generates fresh calls with the examples generator under another
seed (``examples/agent_log.py --seed 99``), and sends the fresh requests of each trained task through the real
router app (uvicorn in this process, the real ``openai`` client, ``tests/stub_llm.py`` upstream answering with the
generator's own teacher answer) twice: with the router's pseudonymisation (``serve/pseudonym.py``: the request
scrubbed as curate scrubbed the training data, the answer mapped back) and without it. Per task it prints the
small model's agreement with the teacher over the calls the router sent to it (the task's primary metric; an
answer that failed validation and fell back to the LLM counts as a miss; a call the assigner placed elsewhere is
only counted under "routes") with its Wilson 95% interval, next to the evaluate figure and its interval, and
what pseudonymisation costs per request.

Every evaluated task with an adapter is deployed for the measurement, migrated or not ("force-routed": the
demo's tasks may stay on the LLM); the output says so. The workspace is only read: the router's call log and
shadow log go to a temporary folder.

    nice .venv/bin/python tests/benchmarks/fresh_traffic.py --workspace /tmp/demo-copy [--per-task 30] [--json]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "examples")]

RAW_EMAIL = re.compile(r"[\w.+-]+@(?!example\.com\b)[\w-]+\.[\w.]+")  # a generator e-mail, not a fake one


def task_of_clusters(ws: Any, clusters: list[str]) -> dict[str, str]:
    """Cluster -> the generator task (``metadata.task``) most of its calls have."""
    membership = ws.store.clusters_of()
    votes: dict[str, Counter[str]] = defaultdict(Counter)
    for call in ws.store.iter_calls():
        cid = membership.get(call.id)
        if cid in clusters:
            votes[cid][str(call.metadata.get("task"))] += 1
    return {cid: votes[cid].most_common(1)[0][0] for cid in clusters if votes[cid]}


def key_of(messages: list[dict[str, Any]]) -> str:
    return json.dumps(messages, sort_keys=True, ensure_ascii=False)


def evaluate_figure(result: dict[str, Any]) -> tuple[float, int, tuple[float, float]]:
    from slmigrate.stats import wilson

    n = int(result.get("test_calls") or 0)
    score = float(((result.get("variants") or {}).get("finetuned") or {}).get("primary") or 0.0)
    return score, n, wilson(round(score * n), n)


def run_mode(ws: Any, engine: Any, pseudonymiser: Any, stub_url: str, calls: dict[str, list[dict]],
             tmp: Path, seen: list[dict]) -> tuple[dict[str, Any], list[float]]:
    """Send every task's fresh calls through a router; per task the scores and route counts, and the
    pseudonymisation times (ms)."""
    import openai
    from stub_llm import ServerThread

    from slmigrate.collect.writer import RecordWriter
    from slmigrate.serve import RouterSettings, agreement_score, build_app
    from slmigrate.store import Store

    timings: list[float] = []
    if pseudonymiser is not None:
        inner = pseudonymiser.pseudonymise

        def timed(request, key=None):
            t0 = time.perf_counter()
            try:
                return inner(request, key)
            finally:
                timings.append((time.perf_counter() - t0) * 1000)

        pseudonymiser.pseudonymise = timed
    db = tmp / f"router-{len(list(tmp.iterdir()))}.sqlite"
    writer = RecordWriter(lambda: Store(db))
    settings = RouterSettings(upstream=stub_url, guard_sample=0, slm_timeout=600, shadow_log=tmp / "shadow.jsonl")
    app, router = build_app(ws, settings, writer=writer, engine=engine, pseudonymiser=pseudonymiser)
    out: dict[str, Any] = {}
    try:
        with ServerThread(app) as server:
            client = openai.OpenAI(base_url=server.base + "/v1", api_key="sk-bench", max_retries=0, timeout=900)
            for cid, records in calls.items():
                d = engine.deployments[cid]
                scores, routes = [], Counter()
                for record in records:
                    request = {k: v for k, v in record["request"].items() if k in ("model", "messages", "tools")}
                    before = len(seen)
                    answer = client.chat.completions.create(**request).model_dump(exclude_none=True)
                    message = answer["choices"][0]["message"]
                    by_slm = answer["model"].startswith("slmigrate/")
                    routed_here = by_slm and answer["model"] == f"slmigrate/{d.name}"
                    routes["slm" if routed_here else "slm, other task" if by_slm else
                           "fallback" if len(seen) > before else "llm (not assigned)"] += 1
                    if len(seen) == before:  # the assigner sent it elsewhere: not this small model's answer
                        continue
                    reference = record["response"]["choices"][0]["message"]
                    score = agreement_score(d.kind, message, reference, request, metric=d.metric) if by_slm else 0
                    scores.append(float(score or 0.0))
                out[cid] = {"scores": scores, "routes": dict(routes)}
        for cid, stats in router.metrics.snapshot()["clusters"].items():
            if cid in out:
                out[cid]["slm_p50_ms"] = stats["slm_latency_p50_ms"]
    finally:
        writer.close()
    return out, timings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     epilog="Example: nice .venv/bin/python tests/benchmarks/fresh_traffic.py "
                                            "--workspace /tmp/demo-copy --per-task 30")
    parser.add_argument("--workspace", required=True, type=Path, help="A workspace with adapters and evals/.")
    parser.add_argument("--seed", type=int, default=99, help="Generator seed of the fresh traffic (default 99).")
    parser.add_argument("--calls", type=int, default=600, help="Fresh calls to generate (default 600).")
    parser.add_argument("--per-task", type=int, default=30, help="Fresh calls sent per trained task (default 30).")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", action="store_true", help="One JSON object instead of the table.")
    args = parser.parse_args()

    import agent_log
    from stub_llm import StubLLM

    from slmigrate.serve.deployment import load_deployments
    from slmigrate.serve.engine import SlmEngine
    from slmigrate.serve.pseudonym import Pseudonymiser
    from slmigrate.stats import wilson
    from slmigrate.workspace import Workspace

    ws = Workspace(args.workspace.resolve())
    evaluation = {r["cluster"]: r for r in (ws.evaluation() or {}).get("clusters", [])}
    deployments = load_deployments(ws, include_failed=True)  # force-routed: migrated or not
    if not deployments:
        raise SystemExit(f"{ws.root}: no evaluated task with an adapter; run `slmigrate evaluate` there first")
    tasks = task_of_clusters(ws, [d.cluster for d in deployments])
    fresh = agent_log.generate(args.calls, seed=args.seed)
    calls = {cid: [r for r in fresh if r["metadata"]["task"] == task][:args.per_task] for cid, task in tasks.items()}
    teacher = {key_of(r["request"]["messages"]): r["response"] for r in fresh}

    pseudonymiser = Pseudonymiser.for_workspace(ws)
    if pseudonymiser is None:
        raise SystemExit(f"{ws.root}: curate ran without PII scrubbing; there is no skew to measure")
    t0 = time.perf_counter()
    pseudonymiser.warm()
    warm_s = time.perf_counter() - t0
    engine = SlmEngine(deployments, device=args.device)
    seen: list[dict] = []  # every request the small model was asked
    inner_answer = engine.answer

    def spy(cluster, request):
        seen.append(request)
        return inner_answer(cluster, request)

    engine.answer = spy  # type: ignore[method-assign]
    results: dict[str, Any] = {}
    started = time.time()
    with StubLLM(record=False, answer=lambda body: teacher.get(key_of(body.get("messages") or []))) as stub, \
            tempfile.TemporaryDirectory(prefix="fresh-traffic-") as tmp:
        for mode, p in (("pseudonymised", pseudonymiser), ("raw", None)):
            before = len(seen)
            per_task, timings = run_mode(ws, engine, p, stub.url, calls, Path(tmp), seen)
            asked = seen[before:]
            results[mode] = {"tasks": per_task, "pseudonymise_ms": timings,
                             "slm_asked": len(asked),
                             "slm_asked_with_raw_email": sum(bool(RAW_EMAIL.search(json.dumps(r["messages"])))
                                                             for r in asked)}
    report: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d", time.gmtime(started)), "workspace": str(ws.root), "seed": args.seed,
        "pii": pseudonymiser.mode, "force_routed": [d.cluster for d in deployments if not (
            evaluation.get(d.cluster, {}).get("decision") or {}).get("migrate")],
        "warm_s": round(warm_s, 2), "minutes": round((time.time() - started) / 60, 1), "tasks": {}}
    for d in deployments:
        cid = d.cluster
        score, n, (lo, hi) = evaluate_figure(evaluation[cid])
        row: dict[str, Any] = {"task": tasks.get(cid), "metric": d.metric,
                               "evaluate_test": {"score": round(score, 3), "n": n, "wilson95": [round(lo, 3),
                                                                                                round(hi, 3)]}}
        for mode in ("pseudonymised", "raw"):
            got = results[mode]["tasks"].get(cid) or {"scores": [], "routes": {}}
            k, m = sum(got["scores"]), len(got["scores"])
            flo, fhi = wilson(k, m)
            row[f"fresh_{mode}"] = {"score": round(k / m, 3) if m else None, "n": m,
                                    "wilson95": [round(flo, 3), round(fhi, 3)], "routes": got["routes"],
                                    "slm_p50_ms": got.get("slm_p50_ms")}
        report["tasks"][cid] = row
    ms = results["pseudonymised"]["pseudonymise_ms"]
    report["pseudonymise_ms"] = {"p50": round(statistics.median(ms), 1) if ms else None,
                                 "p90": round(sorted(ms)[int(0.9 * (len(ms) - 1))], 1) if ms else None, "n": len(ms)}
    report["slm_asked_with_raw_email"] = {m: f"{results[m]['slm_asked_with_raw_email']} of {results[m]['slm_asked']}"
                                          for m in results}
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(f"fresh traffic: examples/agent_log.py --seed {args.seed}, {args.per_task} calls per task, curate pii = "
          f"{report['pii']}; date {report['date']}; {report['minutes']} min")
    if report["force_routed"]:
        print(f"force-routed for the measurement (evaluate kept them on the LLM): {', '.join(report['force_routed'])}")
    fmt = "{:<6} {:<8} {:<11} {:>22} {:>28} {:>28}"
    print(fmt.format("task", "gen.task", "metric", "evaluate test (95%)", "fresh, pseudonymised (95%)",
                     "fresh, raw (95%)"))

    def cell(f: dict[str, Any]) -> str:
        if f["score"] is None:
            return "-"
        return f"{f['score']:.3f} [{f['wilson95'][0]:.2f}, {f['wilson95'][1]:.2f}] n={f['n']}"

    for cid, row in report["tasks"].items():
        print(fmt.format(cid, str(row["task"]), str(row["metric"]), cell(row["evaluate_test"]),
                         cell(row["fresh_pseudonymised"]), cell(row["fresh_raw"])))
        for mode in ("pseudonymised", "raw"):
            f = row[f"fresh_{mode}"]
            print(f"       {mode}: routes {f['routes']}, small-model answer p50 {f['slm_p50_ms']} ms")
    print(f"pseudonymisation per request: p50 {report['pseudonymise_ms']['p50']} ms, p90 "
          f"{report['pseudonymise_ms']['p90']} ms (n={report['pseudonymise_ms']['n']}); presidio+spaCy load "
          f"{report['warm_s']} s once")
    print(f"requests the small model was asked that held a raw e-mail: {report['slm_asked_with_raw_email']}")


if __name__ == "__main__":
    main()
