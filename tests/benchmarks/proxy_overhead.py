"""Added latency and throughput of `slmigrate collect proxy` versus calling the stub upstream directly, and
versus LiteLLM's proxy on the same stub, side by side in one run.

    .venv/bin/python tests/benchmarks/proxy_overhead.py [--requests 400] [--rounds 3] [--litellm /tmp/litellm-venv]

Every target is a separate process on 127.0.0.1: the stub (tests/stub_llm.py), the slmigrate proxy (logging to
a throwaway workspace, so the measured cost includes capture), and LiteLLM's proxy when its venv exists. LiteLLM
is never a dependency of slmigrate; make its throwaway venv with

    python3.11 -m venv /tmp/litellm-venv && /tmp/litellm-venv/bin/pip install 'litellm[proxy]'

Rounds interleave the targets (direct, slmigrate, litellm, direct, ...) so the shared machine's noise hits all
alike; figures are medians over rounds. Half the requests stream. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
from stub_llm import free_port, wait_http  # noqa: E402
# One bearer token for every target: the stub and slmigrate ignore/forward it; LiteLLM requires a master key.
TOKEN = "sk-bench-" + "0123456789abcdef" * 4


def start_litellm(venv: Path, upstream: str, workdir: Path) -> tuple[subprocess.Popen, str] | None:
    exe = venv / "bin" / "litellm"
    if not exe.exists():
        return None
    port = free_port()
    config = workdir / "litellm.yaml"
    config.write_text(
        "model_list:\n"
        "  - model_name: stub\n"
        "    litellm_params:\n"
        "      model: openai/stub\n"
        f"      api_base: {upstream}\n"
        "      api_key: sk-bench\n"
        "litellm_settings:\n"
        "  drop_params: true\n"
        "  telemetry: false\n"
    )
    env = {**os.environ, "LITELLM_LOG": "ERROR", "LITELLM_TELEMETRY": "False", "DISABLE_SCHEMA_UPDATE": "true",
           "LITELLM_LOCAL_MODEL_COST_MAP": "True", "NO_DOCS": "True", "LITELLM_MASTER_KEY": TOKEN}
    log = open(workdir / "litellm.log", "wb")
    proc = subprocess.Popen([str(exe), "--config", str(config), "--host", "127.0.0.1", "--port", str(port),
                             "--num_workers", "1"], stdout=log, stderr=subprocess.STDOUT, env=env, cwd=workdir)
    try:
        wait_http(f"http://127.0.0.1:{port}/health/liveliness", proc)
    except RuntimeError:
        proc.kill()
        sys.stderr.write((workdir / "litellm.log").read_text()[-3000:])
        return None
    return proc, f"http://127.0.0.1:{port}/v1"


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and its children (Linux /proc); steadier than latency on a busy box."""
    total = 0.0
    for p in [pid] + _children(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def _children(pid: int) -> list[int]:
    try:
        kids = [int(k) for k in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []
    return kids + [g for k in kids for g in _children(k)]


def body(i: int) -> dict:
    payload = {"model": "stub", "messages": [{"role": "user", "content": f"benchmark request {i} " + "x " * 20}]}
    if i % 2:
        payload["stream"] = True
    return payload


async def run_load(base: str, n: int, concurrency: int) -> dict:
    latencies: list[float] = []
    failures = 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=60, headers={"Authorization": f"Bearer {TOKEN}"}) as client:
        counter = iter(range(n))

        async def worker() -> None:
            nonlocal failures
            for i in counter:
                payload = body(i)
                t0 = time.perf_counter()
                try:
                    if payload.get("stream"):
                        async with client.stream("POST", base + "/chat/completions", json=payload) as r:
                            async for _ in r.aiter_raw():
                                pass
                            ok = r.status_code == 200
                    else:
                        r = await client.post(base + "/chat/completions", json=payload)
                        ok = r.status_code == 200
                except httpx.HTTPError:
                    ok = False
                if ok:
                    latencies.append((time.perf_counter() - t0) * 1000)
                else:
                    failures += 1

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - started
    latencies.sort()
    return {"p50_ms": percentile(latencies, 50), "p99_ms": percentile(latencies, 99),
            "rps": len(latencies) / wall, "failures": failures}


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    k = min(len(sorted_values) - 1, max(0, round(q / 100 * (len(sorted_values) - 1))))
    return sorted_values[k]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=400, help="requests per target, round and concurrency")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", default="1,16,64")
    parser.add_argument("--litellm", default="/tmp/litellm-venv", help="venv with litellm[proxy] installed")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="slm-bench-"))
    procs: list[subprocess.Popen] = []
    try:
        stub_port = free_port()
        stub = subprocess.Popen([sys.executable, str(ROOT / "tests" / "stub_llm.py"), "--port", str(stub_port)])
        procs.append(stub)
        direct = f"http://127.0.0.1:{stub_port}/v1"
        wait_http(direct + "/models", stub)
        proxy_port = free_port()
        proxy = subprocess.Popen([sys.executable, "-m", "slmigrate", "collect", "proxy", "--upstream", direct,
                                  "--port", str(proxy_port), "-w", str(work / "ws")], cwd=work,
                                 env={**os.environ, "PYTHONPATH": str(ROOT)}, stderr=subprocess.DEVNULL)
        procs.append(proxy)
        wait_http(f"http://127.0.0.1:{proxy_port}/slmigrate/health", proxy)
        targets = {"direct": direct, "slmigrate": f"http://127.0.0.1:{proxy_port}/v1"}
        pids = {"direct": stub.pid, "slmigrate": proxy.pid}
        litellm = start_litellm(Path(args.litellm), direct, work)
        litellm_note = "not run: no litellm venv at " + args.litellm
        if litellm is not None:
            procs.append(litellm[0])
            targets["litellm"] = litellm[1]
            pids["litellm"] = litellm[0].pid
            litellm_note = "ran"
        elif (Path(args.litellm) / "bin" / "litellm").exists():
            litellm_note = f"installed but did not start; see {work / 'litellm.log'}"

        for base in targets.values():  # warm connection pools and lazy imports
            asyncio.run(run_load(base, 30, 4))

        results: dict = {}
        for concurrency in [int(c) for c in args.concurrency.split(",")]:
            per: dict[str, list[dict]] = {name: [] for name in targets}
            for _ in range(args.rounds):
                for name, base in targets.items():
                    # CPU spent by the target itself (the stub's own cost is in every row, so subtract "direct").
                    before = cpu_seconds(pids[name])
                    run = asyncio.run(run_load(base, args.requests, concurrency))
                    run["cpu_ms_per_req"] = (cpu_seconds(pids[name]) - before) * 1000 / args.requests
                    per[name].append(run)
            row = {}
            for name, runs in per.items():
                row[name] = {key: round(statistics.median(r[key] for r in runs), 2)
                             for key in ("p50_ms", "p99_ms", "rps", "cpu_ms_per_req")}
                row[name]["failures"] = sum(r["failures"] for r in runs)
            for name in targets:
                if name != "direct":
                    row[name]["added_p50_ms"] = round(row[name]["p50_ms"] - row["direct"]["p50_ms"], 2)
                    row[name]["added_p99_ms"] = round(row[name]["p99_ms"] - row["direct"]["p99_ms"], 2)
                    row[name]["rps_vs_direct"] = round(row[name]["rps"] / row["direct"]["rps"], 3)
            if "litellm" in row:
                row["slmigrate_rps_vs_litellm"] = round(row["slmigrate"]["rps"] / row["litellm"]["rps"], 2)
            results[f"c{concurrency}"] = row
        health = httpx.get(f"http://127.0.0.1:{proxy_port}/slmigrate/health").json()["capture"]
        print(json.dumps({
            "benchmark": "proxy_overhead", "requests_per_run": args.requests, "rounds": args.rounds,
            "stream_share": 0.5, "litellm": litellm_note, "slmigrate_logged": health["logged"],
            "slmigrate_dropped": health["dropped"], "python": platform.python_version(),
            "cpus": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 2), "results": results,
        }))
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
