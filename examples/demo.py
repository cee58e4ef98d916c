"""The README's main command (`make demo`): the whole migration on the examples log, offline, on a CPU.

1. generate a support agent's LLM call log with ``examples/agent_log.py`` (seeded, so always the same calls);
2. put it and ``examples/slmigrate.toml`` into the workspace folder (the repository stays clean);
3. call ``slmigrate run`` on that config: import, curate, cluster, select, fine-tune, evaluate, report;
4. say where the report is.

Running it again re-uses what is there: the second ``slmigrate run`` finds nothing changed and does no work.

Usage: python examples/demo.py [--workspace .slmigrate-demo] [--calls 600] [--seed 0] [--fresh]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workspace", default=".slmigrate-demo", help="Workspace folder (default .slmigrate-demo).")
    parser.add_argument("--calls", type=int, default=600, help="Calls in the generated log (default 600).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the generated log (default 0).")
    parser.add_argument("--fresh", action="store_true", help="Delete the workspace first and start over.")
    args = parser.parse_args(argv)
    os.umask(0o077)  # the generated log and its workspace are owner-only, like everything slmigrate writes

    ws = Path(args.workspace).resolve()
    if args.fresh:
        shutil.rmtree(ws, ignore_errors=True)
    ws.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the demo never downloads anything

    sys.path.insert(0, str(HERE))
    import agent_log

    log = ws / "calls.jsonl"
    # Same seed and size give a byte-identical file; rewriting it only when it differs keeps its modification
    # time, so the import stage is skipped on a second demo run.
    tmp = ws / "calls.jsonl.new"
    agent_log.write(tmp, calls=args.calls, seed=args.seed)
    if log.exists() and log.read_bytes() == tmp.read_bytes():
        tmp.unlink()
    else:
        tmp.replace(log)
    config = ws / "slmigrate.toml"
    text = (HERE / "slmigrate.toml").read_text()
    if not config.exists() or config.read_text() != text:
        config.write_text(text)
    print(f"Example log: {log} ({args.calls} calls of a customer-support agent); config: {config}")

    started = time.monotonic()
    command = [sys.executable, "-m", "slmigrate", "--workspace", str(ws), "run", "--config", str(config)]
    print("$ " + " ".join(command[1:]).replace("-m slmigrate", "slmigrate"), flush=True)
    code = subprocess.call(command)
    minutes = (time.monotonic() - started) / 60
    report = ws / "reports" / "report.html"
    if code != 0:
        what = "was interrupted" if code == 130 else f"failed (exit code {code}); see the error above"
        print(f"slmigrate run {what} after {minutes:.1f} min. Run `make demo` again to resume: finished stages "
              "are skipped.", file=sys.stderr)
        return code
    print(f"\nDone in {minutes:.1f} min. Open the report: {report}")
    print(f"(Markdown version: {report.with_suffix('.md')}; workspace: {ws}; `slmigrate --workspace {ws} status`)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
