"""Benchmark: import, curate (--pii off) and cluster N generated calls; wall time and peak memory per stage.

Usage:
    .venv/bin/python tests/benchmarks/million_calls.py --calls 1000000 [--work /tmp/million] [--embedder minilm]
    .venv/bin/python tests/benchmarks/million_calls.py --calls 10000,100000     # several sizes, memory vs N
    .venv/bin/python tests/benchmarks/million_calls.py --calls 1000000 --stages cluster   # re-run one stage

For each N it writes N calls of examples/agent_log.py's Acme agent to a gzipped JSON Lines file, streaming (the
same records in the same order as ``agent_log.generate(N)``, written session by session, never a list of N), then
runs ``slmigrate collect import``, ``slmigrate curate --pii off`` and ``slmigrate cluster`` as subprocesses in a
fresh scratch workspace. Per stage it records wall time, the peak RSS of the command's own process (``wait4``'s
rusage, which also covers reaped children) and the peak summed RSS of its whole process tree (sampled every
0.2 s with psutil; catches import's worker processes running at the same time), in total and anonymous only
(without the memory-mapped dataset files' pages). Prints one JSON line per N and,
with several sizes, a last line with the memory ratios between the largest and smallest N.
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _agent_log():
    spec = importlib.util.spec_from_file_location("agent_log", ROOT / "examples" / "agent_log.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


BASE = 100_000  # above this many calls, copies of the first BASE are varied instead of generated (see below)


def write_calls(path: Path, n: int, seed: int = 0) -> int:
    """N calls in a gzipped JSON Lines file, streamed (never a list of N records).

    Up to BASE calls: exactly ``agent_log.generate(n, seed)``. Faker makes that generator slow (~300 calls/s on
    the loaded 2-core box, so ~1 h for a million), so beyond BASE the file is the first BASE calls, then copies
    of them made distinct: each copy gets new call ids and session ids, timestamps shifted past the previous
    copy, and two seeded words appended to the latest user message. The words keep the copies from being
    dropped as (near-)duplicates by curate, which masks numbers and ids but not words; the task mix, prompts,
    tools and answers are those of the generator.
    """
    if n <= BASE:
        return _generate(path, n, seed)
    base = path.parent / f"calls-{BASE}.jsonl.gz"
    if not base.exists():
        tmp = base.with_suffix(".tmp")
        _generate(tmp, BASE, seed)
        tmp.replace(base)
    import random
    from datetime import datetime, timedelta

    from faker import Faker

    fake = Faker("en_US")
    fake.seed_instance(seed)
    vocabulary = sorted(set(fake.words(3000)))
    rng = random.Random(seed)
    written = 0
    with gzip.open(path, "wt", encoding="utf-8", compresslevel=1, newline="\n") as out:
        copy = 0
        while written < n:
            with gzip.open(base, "rt", encoding="utf-8") as fh:
                for line in fh:
                    if written >= n:
                        break
                    if copy:
                        record = json.loads(line)
                        record["id"] = f"{record['id']}-{copy}"
                        meta = record["metadata"]
                        meta["session"] = f"{meta['session']}-{copy}"
                        at = datetime.fromisoformat(record["timestamp"].replace("Z", "+00:00"))
                        record["timestamp"] = (at + timedelta(days=120 * copy)).isoformat(
                            timespec="milliseconds").replace("+00:00", "Z")
                        last = next(m for m in reversed(record["request"]["messages"]) if m["role"] == "user")
                        last["content"] += f" ({rng.choice(vocabulary)} {rng.choice(vocabulary)})"
                        line = json.dumps(record, ensure_ascii=False) + "\n"
                    out.write(line)
                    written += 1
            copy += 1
    return written


def _generate(path: Path, n: int, seed: int = 0) -> int:
    """agent_log.generate(n, seed), streamed to ``path`` one session at a time."""
    written = 0
    with gzip.open(path, "wt", encoding="utf-8", compresslevel=1, newline="\n") as fh:
        for record in _agent_log().iter_records(n, seed):
            fh.write(json.dumps(record, ensure_ascii=False) + "\n")
            written += 1
    return written


def _tree_rss(proc) -> tuple[int, int]:
    """(RSS, anonymous RSS) summed over the process tree. Anonymous = RSS minus file-backed and shared pages:
    the stages read the curated Arrow files memory-mapped, and those file pages count in RSS although the kernel
    can drop them at any time; the anonymous part is the memory the process itself holds."""
    total = anon = 0
    try:
        procs = [proc] + proc.children(recursive=True)
    except Exception:  # the process just ended
        return 0, 0
    for p in procs:
        try:
            info = p.memory_info()
            total += info.rss
            anon += info.rss - getattr(info, "shared", 0)
        except Exception:
            pass
    return total, anon


def run_stage(args: list[str], log_path: Path) -> dict:
    """Run one command; wall time, exit code, peak RSS of the process and of its whole tree."""
    import psutil

    started = time.perf_counter()
    with open(log_path, "ab") as log:
        log.write(("\n$ " + " ".join(args) + "\n").encode())
        log.flush()
        popen = subprocess.Popen(args, stdout=log, stderr=log)
        peak_tree = peak_anon = 0
        stop = threading.Event()

        def sample() -> None:
            nonlocal peak_tree, peak_anon
            proc = psutil.Process(popen.pid)
            while not stop.is_set():
                rss, anon = _tree_rss(proc)
                peak_tree, peak_anon = max(peak_tree, rss), max(peak_anon, anon)
                stop.wait(0.2)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        _, status, usage = os.wait4(popen.pid, 0)
        popen.returncode = os.waitstatus_to_exitcode(status)
        stop.set()
        sampler.join()
    return {"rc": popen.returncode, "wall_s": round(time.perf_counter() - started, 1),
            "peak_rss_mb": round(usage.ru_maxrss / 1024, 1), "peak_tree_rss_mb": round(peak_tree / 2**20, 1),
            "peak_tree_anon_mb": round(peak_anon / 2**20, 1),
            "cpu_s": round(usage.ru_utime + usage.ru_stime, 1)}


STAGES = ("import", "curate", "cluster")
TESTS = Path(__file__).resolve().parents[1]


def _slmigrate(embedder: str) -> list[str]:
    """The CLI as a subprocess: ``-m slmigrate``, or for the test suite's hash embedder (no user option of the
    package) a prelude that registers it first (tests/fakes.py)."""
    if embedder != "hash":
        return ["-m", "slmigrate"]
    prelude = (f"import sys; sys.path.insert(0, {str(TESTS)!r}); import fakes; fakes.register(); "
               "from slmigrate.cli import main; sys.exit(main(sys.argv[1:]))")
    return ["-c", prelude]


def bench(n: int, work: Path, embedder: str, seed: int, stages_to_run: tuple[str, ...] = STAGES) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    data = work / f"calls-{n}.jsonl.gz"
    started = time.perf_counter()
    if not data.exists():
        tmp = data.with_suffix(".tmp")
        write_calls(tmp, n, seed)
        tmp.replace(data)
    gen_s = time.perf_counter() - started
    ws = work / f"ws-{n}"
    if "import" in stages_to_run:  # a fresh workspace; without import, the later stages re-run on the last one
        subprocess.run(["rm", "-rf", str(ws)], check=True)
    cli = [sys.executable, *_slmigrate(embedder), "--workspace", str(ws)]
    log = work / f"log-{n}.txt"
    config = work / f"slmigrate-{n}.toml"
    config.write_text(f'[cluster]\nembedder = "{embedder}"\n')
    stages = {}
    for name, args in (  # --force: a re-run (--stages without import) redoes the work it measures
        ("import", cli + ["collect", "import", str(data)]),
        ("curate", cli + ["curate", "--pii", "off", "--config", str(config), "--force"]),
        ("cluster", cli + ["cluster", "--config", str(config), "--json", "--force"]),
    ):
        if name not in stages_to_run:
            continue
        stages[name] = run_stage(args, log)
        stages[name]["calls_per_s"] = round(n / max(stages[name]["wall_s"], 1e-9), 1)
        # Each stage as it ends (stderr), so a long run that is stopped early still leaves its figures.
        print(json.dumps({"calls": n, "stage": name, **stages[name]}), file=sys.stderr, flush=True)
        if stages[name]["rc"] != 0:
            break
    out = {"bench": "million_calls", "calls": n, "embedder": embedder, "generate_s": round(gen_s, 1),
           "file_mb": round(data.stat().st_size / 2**20, 1), "stages": stages,
           "total_s": round(sum(s["wall_s"] for s in stages.values()), 1), "log": str(log)}
    from slmigrate import artifacts
    from slmigrate.workspace import Workspace

    body = artifacts.clusters_file(Workspace.open(ws, create=False), required=False) if ws.exists() else None
    if body is not None:
        out["clusters"] = len(body["clusters"])
        out["clustered_calls"] = body.get("clustered_calls")
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", default="1000000", help="Comma-separated call counts (default 1000000).")
    parser.add_argument("--work", default="/tmp/slmigrate-million", help="Scratch folder (files and workspaces).")
    parser.add_argument("--embedder", default="minilm", choices=("minilm", "hash"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stages", default=",".join(STAGES),
                        help="Comma-separated stages to run (default all). Without import, the others re-run on the "
                             "workspace the last run left (e.g. --stages cluster after changing the cluster code).")
    args = parser.parse_args()
    stages = tuple(s.strip() for s in args.stages.split(",") if s.strip())
    if unknown := set(stages) - set(STAGES):
        parser.error(f"--stages: unknown {sorted(unknown)}; choose from {', '.join(STAGES)}")
    results = []
    for n in [int(x) for x in args.calls.split(",")]:
        result = bench(n, Path(args.work), args.embedder, args.seed, stages)
        print(json.dumps(result), flush=True)
        results.append(result)
    if len(results) > 1:
        small, large = results[0], results[-1]
        ratios = {name: round(large["stages"][name]["peak_tree_rss_mb"] / small["stages"][name]["peak_tree_rss_mb"], 2)
                  for name in large["stages"] if name in small["stages"]}
        print(json.dumps({"bench": "million_calls", "calls_ratio": large["calls"] / small["calls"],
                          "peak_tree_rss_ratio": ratios}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
