"""Gate calibration: how often the decided 95% lower bound overstates the agreement on calls never seen.

``evaluate`` migrates a task when the lower bound of its test-split score reaches the threshold. That bound is
only worth something if the test split stands for the calls the task will get later. This benchmark measures
it over many splits of one curated log:

1. import + curate once, through the library (``collect.importer.import_calls`` / ``collect.bfcl.load``, then
   ``curate.curate`` with its real ``SplitPlanner``: session-disjoint and entity-aware);
2. per split seed, re-split the curated calls with that same planner (``seed`` changed, nothing else), or with a
   naive call-level split of the same per-task shares, as a contrast;
3. per task, a real learner that trains in milliseconds and leaks the way a fine-tune does - the probe's
   nearest-neighbour student (``probe.nearest`` / ``probe.neighbour_probe``: answer with the recorded answer of
   the most similar train call) - learns from the train side; the lower bound comes from the test side with
   ``stats.estimate``, the interval ``evaluate`` decides on (Wilson / bootstrap / Hoeffding, seeded with
   ``[evaluate] seed``);
4. "fresh" agreement: the same student answers calls the splits never saw, curated the same way - for the
   examples log, a log of another generator seed (new customers); for BFCL, questions set aside before import.

Reported per dataset, task and split kind: the share of splits where lower bound > fresh agreement, with its own
Wilson interval. A calibrated 95% two-sided bound overshoots in about 2.5% of splits (aim: at most 5%).

Usage: .venv/bin/python tests/benchmarks/gate_calibration.py [--splits 200] [--calls 1200] [--fresh-calls 3000]
           [--bfcl ../shared/data/bfcl] [--bfcl-fresh-share 0.3] [--pii placeholder|off] [--json out.json]
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any
from unittest import mock

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from slmigrate import probe as P  # noqa: E402
from slmigrate.cluster.views import output_kind  # noqa: E402
from slmigrate.config import CurateConfig, EvaluateConfig  # noqa: E402
from slmigrate.curate import dataset as curated  # noqa: E402
from slmigrate.curate import run as curate_run  # noqa: E402
from slmigrate.evaluate import metrics as M  # noqa: E402
from slmigrate.stats import wilson  # noqa: E402
from slmigrate.workspace import Workspace  # noqa: E402


# --- import + curate once ----------------------------------------------------------------------------------------

class _Recorded(curate_run.SplitPlanner):
    """curate's own planner, kept after the run so its sessions and entity links can be re-split by seed (the PII
    values it links by are gone from the scrubbed calls: re-adding curated calls would lose those links)."""

    made: list[curate_run.SplitPlanner] = []

    def __init__(self, config: CurateConfig):
        super().__init__(config)
        _Recorded.made.append(self)


def curate_once(ws: Workspace, config: CurateConfig) -> tuple[list[curated.CuratedCall], curate_run.SplitPlanner]:
    _Recorded.made.clear()
    with mock.patch.object(curate_run, "SplitPlanner", _Recorded):
        curate_run.curate(ws, config, force=True)
    calls = curated.load_curated(ws)
    planner = _Recorded.made[-1]
    # The recorded planner must give back exactly the split curate wrote, or re-splitting it proves nothing.
    assert planned(planner, calls, config.seed) == [c.split for c in calls], "planner does not reproduce curate"
    return calls, planner


def examples_log(path: Path, calls: int, seed: int) -> Path:
    spec = importlib.util.spec_from_file_location("agent_log", ROOT / "examples" / "agent_log.py")
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    module.write(path, calls, seed)
    return path


def curated_examples(tmp: Path, calls: int, seed: int, config: CurateConfig):
    from slmigrate.collect.importer import import_calls

    ws = Workspace.open(tmp / f"examples-{seed}")
    import_calls(ws, [examples_log(tmp / f"examples-{seed}.jsonl", calls, seed)], workers=0)
    return curate_once(ws, config)


def curated_bfcl(tmp: Path, root: str, fresh_share: float, config: CurateConfig):
    """(curated calls, planner, curated fresh calls): the fresh questions are set aside by a hash of their id
    before anything is imported, and curated in a workspace of their own."""
    from slmigrate.collect import bfcl

    records = bfcl.load(root)
    aside = {r.id for r in records
             if int(hashlib.sha256(f"fresh:{r.input_id}".encode()).hexdigest()[:8], 16) / 0xFFFFFFFF < fresh_share}
    out = []
    for name, part in (("bfcl", [r for r in records if r.id not in aside]),
                       ("bfcl-fresh", [r for r in records if r.id in aside])):
        ws = Workspace.open(tmp / name)
        ws.store.insert_calls(part)
        out.append(curate_once(ws, config))
    (calls, planner), (fresh, _) = out
    return calls, planner, fresh


# --- splits -------------------------------------------------------------------------------------------------------

def planned(planner: curate_run.SplitPlanner, calls: list[curated.CuratedCall], seed: int) -> list[str]:
    """curate's split of ``calls`` with ``seed``: the same planner (sessions, entity links, per-task test share)."""
    planner.config = planner.config.model_copy(update={"seed": seed})
    by_session, _ = planner.assign()
    return [by_session[curate_run.session_key(c)] for c in calls]


def naive(planner: curate_run.SplitPlanner, calls: list[curated.CuratedCall], seed: int) -> list[str]:
    """The contrast: every call on its own (a hash of its id), with the test share curate gives its task."""
    task_share = planner.shares()
    train, validation, test = planner.config.split
    out = []
    for c in calls:
        share = max(test, task_share.get(curate_run.task_key(c), test))
        u = int(hashlib.sha256(f"{seed}:{c.id}".encode()).hexdigest()[:16], 16) / 16**16
        out.append("test" if u < share else "train" if u < share + (1 - share) * train / (train + validation)
                   else "validation")
    return out


SPLITTERS: dict[str, Callable[..., list[str]]] = {"curate": planned, "naive": naive}


# --- the student and the bound ------------------------------------------------------------------------------------

def as_call(c: curated.CuratedCall) -> P._Call:
    choices = (c.response or {}).get("choices") or [{}]
    return P._Call(c.id, c.request, choices[0].get("message"), P.request_text(c.request), c.session or "")


def tasks_of(calls: list[curated.CuratedCall], key: Callable[[curated.CuratedCall], str]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for i, c in enumerate(calls):
        out.setdefault(key(c), []).append(i)
    return out


def task_kind(calls: list[P._Call]) -> str:
    """The task's output kind as the cluster stage sets it: the most common kind of its answers."""
    return Counter(output_kind(c.answer) for c in calls).most_common(1)[0][0]


def one_split(kind: str, metric: str, train: list[P._Call], test: list[P._Call], fresh: list[P._Call],
              seed: int) -> dict[str, Any] | None:
    """The student's lower bound on ``test`` and its agreement on ``fresh``, both learned from ``train``."""
    links = P.nearest(train, test + fresh)
    bound = P.neighbour_probe(kind, metric, train, test, links[:len(test)], seed)
    found = P.neighbour_probe(kind, metric, train, fresh, links[len(test):], seed)
    if bound.get("skipped") or found.get("skipped"):
        return None
    return {"low": bound["low"], "score": bound["score"], "n": bound["n"], "interval": bound["interval"],
            "fresh": found["score"], "fresh_n": found["n"]}


def calibrate(dataset: str, calls: list[curated.CuratedCall], planner: curate_run.SplitPlanner,
              fresh_calls: list[curated.CuratedCall], task: Callable[[curated.CuratedCall], str], splits: int,
              eval_seed: int) -> list[dict[str, Any]]:
    students = [as_call(c) for c in calls]
    fresh_students = [as_call(c) for c in fresh_calls]
    by_task = tasks_of(calls, task)
    fresh_by_task = tasks_of(fresh_calls, task)
    rows = []
    for name, split in SPLITTERS.items():
        per: dict[str, list[dict[str, Any]]] = {t: [] for t in by_task}
        for seed in range(splits):
            sides = split(planner, calls, seed)
            for t, idx in by_task.items():
                fresh = [fresh_students[i] for i in fresh_by_task.get(t, [])]
                kind = task_kind([students[i] for i in idx])
                metric = M.primary_metric(kind)
                got = one_split(kind, metric, [students[i] for i in idx if sides[i] == "train"],
                                [students[i] for i in idx if sides[i] == "test"], fresh, eval_seed)
                if got is not None:
                    per[t].append({**got, "kind": kind, "metric": metric})
        for t, found in sorted(per.items()):
            if not found:
                continue
            over = sum(f["low"] > f["fresh"] for f in found)
            rate_low, rate_high = wilson(over, len(found))
            rows.append({
                "dataset": dataset, "task": t, "split": name, "kind": found[0]["kind"], "metric": found[0]["metric"],
                "splits": len(found), "test_n_median": statistics.median(f["n"] for f in found),
                "fresh_n": found[0]["fresh_n"], "intervals": dict(Counter(f["interval"] for f in found)),
                "score_mean": round(statistics.mean(f["score"] for f in found), 4),
                "low_mean": round(statistics.mean(f["low"] for f in found), 4),
                "fresh_mean": round(statistics.mean(f["fresh"] for f in found), 4),
                "low_over_fresh": over, "rate": round(over / len(found), 4),
                "rate_interval": [round(rate_low, 4), round(rate_high, 4)],
                "score_over_fresh": round(sum(f["score"] > f["fresh"] for f in found) / len(found), 4),
            })
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| dataset | task (kind, metric) | split | splits | test n (median) | fresh n | test score | "
             "lower bound | fresh agreement | lower > fresh | (95% interval) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['dataset']} | {r['task']} ({r['kind']}, {r['metric']}) | {r['split']} | {r['splits']} | "
            f"{r['test_n_median']:g} | {r['fresh_n']} | {r['score_mean']:.3f} | {r['low_mean']:.3f} | "
            f"{r['fresh_mean']:.3f} | **{100 * r['rate']:.1f}%** ({r['low_over_fresh']}) | "
            f"{100 * r['rate_interval'][0]:.1f}-{100 * r['rate_interval'][1]:.1f}% |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog="Example: .venv/bin/python tests/benchmarks/gate_calibration.py "
                                            "--splits 200 --json /tmp/gate.json")
    parser.add_argument("--splits", type=int, default=200, help="split seeds per dataset (default 200)")
    parser.add_argument("--calls", type=int, default=1200, help="calls of the examples log (seed 0)")
    parser.add_argument("--fresh-calls", type=int, default=3000, help="calls of the fresh examples log (seed 1)")
    parser.add_argument("--bfcl", default=str(ROOT.parent / "shared" / "data" / "bfcl"),
                        help="BFCL folder (skipped when absent)")
    parser.add_argument("--bfcl-fresh-share", type=float, default=0.3, help="BFCL questions set aside as fresh")
    parser.add_argument("--pii", default="placeholder", choices=("placeholder", "synthetic", "off"))
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args(argv)

    started = time.time()
    # The task label is metadata the scrubber would otherwise treat as free text.
    config = CurateConfig(pii=args.pii, keep_metadata=["task", "category"], workers=1)
    eval_seed = EvaluateConfig().seed
    rows: list[dict[str, Any]] = []
    timings = {}
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.time()
        calls, planner = curated_examples(Path(tmp), args.calls, 0, config)
        fresh, _ = curated_examples(Path(tmp), args.fresh_calls, 1, config)
        timings["examples_curate_s"] = round(time.time() - t0, 1)
        t0 = time.time()
        rows += calibrate("examples", calls, planner, fresh, lambda c: c.metadata.get("task", "?"), args.splits,
                          eval_seed)
        timings["examples_splits_s"] = round(time.time() - t0, 1)
        if Path(args.bfcl).is_dir():
            t0 = time.time()
            calls, planner, fresh = curated_bfcl(Path(tmp), args.bfcl, args.bfcl_fresh_share, config)
            timings["bfcl_curate_s"] = round(time.time() - t0, 1)
            t0 = time.time()
            rows += calibrate("bfcl", calls, planner, fresh, lambda c: c.metadata.get("category", "?"),
                              args.splits, eval_seed)
            timings["bfcl_splits_s"] = round(time.time() - t0, 1)
    print(table(rows))
    summary = {"splits": args.splits, "calls": args.calls, "fresh_calls": args.fresh_calls, "pii": args.pii,
               "seconds": round(time.time() - started, 1), **timings}
    print(json.dumps(summary))
    if args.json:
        Path(args.json).write_text(json.dumps({"summary": summary, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
