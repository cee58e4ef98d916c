"""What the workspace leaves on disk: private modes, no half-written versions, no orphaned workers."""

import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from slmigrate.workspace import Workspace

ROOT = Path(__file__).resolve().parents[1]


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_workspace_folders_and_store_are_private(tmp_path):
    ws = Workspace.open(tmp_path / "ws")
    ws.store.count_calls()  # opens (creates) the SQLite file
    assert _mode(ws.root) == 0o700
    assert all(_mode(ws.path(name)) == 0o700 for name in ("curated", "clusters", "adapters", "evals", "reports"))
    db = ws.root / "slmigrate.sqlite"
    assert _mode(db) == 0o600
    wal = ws.root / "slmigrate.sqlite-wal"
    assert not wal.exists() or _mode(wal) == 0o600


def test_a_crashed_curate_version_is_cleared_by_the_next(tmp_path):
    from slmigrate.curate.dataset import write_curated

    ws = Workspace.open(tmp_path / "ws")
    stale = ws.path("curated", ".v0001.tmp")
    (stale / "dataset").mkdir(parents=True)
    (stale / "dataset" / "half.arrow").write_bytes(b"\0" * 64)
    version = write_curated(ws, [], {"kept": 0}, {})
    assert version == "v0001"
    assert not stale.exists()
    assert sorted(p.name for p in ws.path("curated").iterdir()) == ["CURRENT", "v0001"]


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in state  # an unreaped zombie has exited


def test_worker_processes_die_with_a_killed_parent(tmp_path):
    """`kill -9` of curate used to leave its PII workers (~570 MB each) running. The workers here block for
    two minutes in their first batch, so only the die-with-parent watch can end them within the test."""
    (tmp_path / "pids").mkdir()
    (tmp_path / "slowpass.py").write_text(textwrap.dedent(f"""
        import os, time

        def factory():
            def fn(batch):
                open(os.path.join({str(tmp_path / 'pids')!r}, str(os.getpid())), "w").close()
                time.sleep(120)
                return batch
            return fn
    """))
    parent = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(tmp_path)!r})
        from slowpass import factory
        from slmigrate.engines import map_batches
        map_batches(list(range(8)), factory, workers=2, batch_size=1)
    """)], cwd=ROOT)
    try:
        deadline = time.monotonic() + 120  # two spawned workers import slmigrate on a possibly busy box
        while len(os.listdir(tmp_path / "pids")) < 2:
            assert parent.poll() is None, "the parent exited before its workers started"
            assert time.monotonic() < deadline, "the worker processes never started"
            time.sleep(0.2)
        workers = [int(p) for p in os.listdir(tmp_path / "pids")]
        assert all(_alive(pid) for pid in workers)
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        deadline = time.monotonic() + 20
        while any(_alive(pid) for pid in workers):
            assert time.monotonic() < deadline, f"workers {workers} outlived their killed parent"
            time.sleep(0.2)
    finally:
        if parent.poll() is None:
            parent.kill()
        for name in os.listdir(tmp_path / "pids"):
            try:
                os.kill(int(name), signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_every_file_a_command_writes_is_owner_only(tmp_path):
    """Not only the store: curated data, exports and the import's own files hold logged prompts too."""
    from slmigrate.cli import main

    log = tmp_path / "calls.jsonl"
    subprocess.run([sys.executable, str(ROOT / "examples" / "agent_log.py"), "--out", str(log), "--calls", "60",
                    "--seed", "2"], check=True, capture_output=True)
    cli = [sys.executable, "-m", "slmigrate", "--workspace", str(tmp_path / "ws")]
    for args in (["collect", "import", str(log)], ["curate", "--pii", "off"],
                 ["curate", "export", "--out", str(tmp_path / "ws" / "exports" / "train.jsonl")]):
        proc = subprocess.run([*cli, *args], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
    written = list((tmp_path / "ws").rglob("*"))
    assert any(p.name.endswith(".arrow") for p in written) and (tmp_path / "ws" / "exports" / "train.jsonl").exists()
    wide = [f"{p.relative_to(tmp_path)} {_mode(p):o}" for p in written
            if _mode(p) != (0o700 if p.is_dir() else 0o600)]
    assert wide == []
    # run in-process, the CLI gives the caller its umask back
    before = os.umask(0o022)
    try:
        assert main(["--workspace", str(tmp_path / "ws"), "status"]) == 0
        assert os.umask(0o022) == 0o022
    finally:
        os.umask(before)
