"""Learning curves through the commands users run: one ``finetune`` + ``evaluate`` per setting, side by side.

Each point is a set of settings, e.g. ``"max_examples=87"`` or ``"max_examples=87 lora_dropout=0"`` (keys without a
section go to ``[finetune]``; ``evaluate.constrained=false`` goes to ``[evaluate]``; ``""`` is the defaults). For
each point a copy of an imported workspace (its calls, curated splits and clusters; no adapters, no evaluations)
runs the user's path with the point written to a config file:

    slmigrate -w COPY finetune -c POINT.toml --force --json
    slmigrate -w COPY evaluate -c POINT.toml --variants finetuned --force --json

and, with ``--bfcl DATA``, ``python -m slmigrate.collect.bfcl DATA -w COPY --score`` (BFCL's acceptance rule).
Per point and cluster: training examples, steps, best validation loss and its step, the fine-tuned primary metric
with its 95% interval, the decision; per point, the finetune process's wall seconds and peak RSS (``os.wait4``:
the process and what it waited for). Points run one after another, so on a quiet box their times and memory
compare; one JSON line per point, then a Markdown table for docs/.

Usage: HF_HUB_OFFLINE=1 python tests/benchmarks/learning_curve.py --workspace WS --point "max_examples=87" \\
           --point "max_examples=174" --point "" [--bfcl ../shared/data/bfcl] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# What ``finetune`` and ``evaluate`` write: left out of each copy so every point trains and scores afresh.
OUTPUTS = {"adapters", "evals", "reports"}


def parse_point(text: str) -> dict[str, dict]:
    """``"max_examples=87 evaluate.constrained=false"`` -> ``{"finetune": {...}, "evaluate": {...}}``."""
    sections: dict[str, dict] = {}
    for item in text.split():
        key, _, raw = item.partition("=")
        section, _, name = key.rpartition(".")
        try:
            value = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw  # a bare word: a model name, a method
        sections.setdefault(section or "finetune", {})[name] = value
    return sections


def to_toml(sections: dict[str, dict]) -> str:
    lines = []
    for section, values in sections.items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {json.dumps(v) if not isinstance(v, bool) else str(v).lower()}" for k, v in values.items()]
    return "\n".join(lines) + "\n"


def run(args: list[str], log) -> tuple[dict, float, float]:
    """Run a command, return its JSON output, wall seconds and peak RSS in GB."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    started = time.perf_counter()
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=log, env=env, cwd=ROOT)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)  # Popen.wait() would not give the child's resource usage
    proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed with exit code {proc.returncode}; see {log.name}")
    return json.loads(out), seconds, usage.ru_maxrss / 1024 ** 2


def copy_workspace(source: Path, dest: Path) -> None:
    shutil.copytree(source, dest, ignore=lambda folder, names: OUTPUTS if Path(folder) == source else set())


def measure(point: str, source: Path, folder: Path, bfcl: str | None) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    ws, config = folder / "ws", folder / "point.toml"
    shutil.rmtree(ws, ignore_errors=True)
    copy_workspace(source, ws)
    config.write_text(to_toml(parse_point(point)))
    cli = [sys.executable, "-m", "slmigrate", "-w", str(ws)]
    with open(folder / "log.txt", "w") as log:
        ft, ft_s, ft_gb = run([*cli, "finetune", "-c", str(config), "--force", "--json"], log)
        ev, ev_s, ev_gb = run([*cli, "evaluate", "-c", str(config), "--variants", "finetuned", "--force", "--json"],
                              log)
        scored = run([sys.executable, "-m", "slmigrate.collect.bfcl", bfcl, "-w", str(ws), "--score"], log)[0] \
            if bfcl else None
    adapters = {a["cluster"]: a for a in ft["adapters"]}
    clusters = []
    for c in ev["clusters"]:
        a, v = adapters.get(c["cluster"], {}), c["variants"]["finetuned"]
        ci = v["intervals"].get(c["primary_metric"], {})
        clusters.append({
            "cluster": c["cluster"], "examples": a.get("examples"), "steps": a.get("steps"),
            "best_val_loss": a.get("best_val_loss"), "best_step": a.get("best_step"), "metric": c["primary_metric"],
            "value": v["primary"], "low": ci.get("low"), "high": ci.get("high"), "n": ci.get("n"),
            "outcome": c["decision"]["outcome"], "latency_p50_ms": v["efficiency"].get("latency_p50_ms"),
        })
    if scored:
        accepted = scored["variants"]["finetuned"]["accepted"]
        clusters[0]["bfcl_accepted"] = {"value": accepted["value"], "interval": accepted["interval"]}
    return {"point": point or "defaults", "finetune_s": round(ft_s, 1), "finetune_peak_rss_gb": round(ft_gb, 2),
            "evaluate_s": round(ev_s, 1), "evaluate_peak_rss_gb": round(ev_gb, 2), "clusters": clusters}


def table(rows: list[dict]) -> str:
    head = ("| point | cluster | examples | steps | best val loss (step) | fine-tuned | 95% interval | decision "
            "| finetune | peak RSS |\n|---|---|---:|---:|---|---:|---|---|---:|---:|")
    lines = [head]
    for r in rows:
        for c in r["clusters"]:
            loss = f"{c['best_val_loss']:.3f} ({c['best_step']})" if c["best_val_loss"] is not None else "-"
            extra = ""
            if "bfcl_accepted" in c:
                lo, hi = c["bfcl_accepted"]["interval"]
                extra = f"; BFCL rule {c['bfcl_accepted']['value']:.3f} ({lo:.3f}-{hi:.3f})"
            lines.append(f"| `{r['point']}` | {c['cluster']} | {c['examples']} | {c['steps']} | {loss} "
                         f"| {c['metric']} {c['value']:.3f}{extra} | {c['low']:.3f}-{c['high']:.3f} (n={c['n']}) "
                         f"| {c['outcome']} | {r['finetune_s'] / 60:.1f} min | {r['finetune_peak_rss_gb']:.1f} GB |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workspace", required=True, help="an imported, curated and clustered workspace")
    parser.add_argument("--point", action="append", required=True,
                        help='settings of one point, e.g. "max_examples=87 lora_dropout=0" ("" = the defaults)')
    parser.add_argument("--bfcl", default=None, help="BFCL data folder: also score by BFCL's acceptance rule")
    parser.add_argument("--keep", default=None, help="folder for the points' workspaces (default: a temporary one)")
    args = parser.parse_args()

    source = Path(args.workspace).resolve()
    keep = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="slmigrate-curve-"))
    rows = []
    for i, point in enumerate(args.point):
        print(f"[{i + 1}/{len(args.point)}] {point or 'defaults'} ...", file=sys.stderr, flush=True)
        row = measure(point, source, keep / f"point{i}", args.bfcl)
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(json.dumps({"benchmark": "learning_curve", "workspace": str(source), "points": args.point,
                      "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"), "cpus": os.cpu_count()}))
    print(table(rows))
    if not args.keep:
        shutil.rmtree(keep, ignore_errors=True)


if __name__ == "__main__":
    main()
