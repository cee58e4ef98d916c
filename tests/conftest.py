"""Shared test set-up: no network for model hubs, paths to the shared real data, a fresh workspace."""

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.pop("SLMIGRATE_ENCRYPTION_KEY", None)
os.environ.pop("SLMIGRATE_WORKSPACE", None)
# The tests' tiny random models answer on near-ties that bfloat16 rounding flips, and whether a CPU has native
# bfloat16 (evaluate/greedy.py cpu_bf16) differs between machines: the suite runs float32 everywhere; the
# bfloat16 path has its own tests (test_generate.py) and its measurement (tests/benchmarks/generate_speed.py).
os.environ["SLMIGRATE_CPU_BF16"] = "0"

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data"
FIXTURES = Path(__file__).resolve().parent / "fixtures"

# The deterministic test embedder (tests/fakes.py) is no user option of the package: the suite registers it, so
# configs in tests may say `embedder = "hash"`.
import fakes  # noqa: E402

fakes.register()


# What CI promises to provide (`.ci/run` sets e.g. SLMIGRATE_TESTS_REQUIRE=chromium,postgres,shared,ray,smollm2):
# there a missing piece fails the tests that need it instead of skipping them, so the suite cannot go green while
# checking nothing. On a laptop without them the tests skip with the reason.
REQUIRED = {k.strip() for k in os.environ.get("SLMIGRATE_TESTS_REQUIRE", "").split(",") if k.strip()}


def skip_unless_required(kind: str, reason: str) -> None:
    """Skip for ``reason``, or fail when this run requires ``kind`` (chromium, postgres, shared, ray, smollm2,
    gemma)."""
    if kind in REQUIRED:
        pytest.fail(f"{reason} - and SLMIGRATE_TESTS_REQUIRE says this run must have {kind}", pytrace=False)
    pytest.skip(reason)


def shared_file(relative: str) -> Path:
    """A file from ../shared/data, or skip the test with the reason when it is not on this machine."""
    path = SHARED_DATA / relative
    if not path.exists():
        skip_unless_required("shared", f"shared data {relative} not present at {SHARED_DATA} "
                             "(only on the team's machines)")
    return path


@pytest.fixture
def workspace(tmp_path):
    from slmigrate.workspace import Workspace

    return Workspace.open(tmp_path / "ws")


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    if not has_cuda:
        skip = pytest.mark.skip(reason="needs a CUDA GPU")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


def wait_for(condition, what: str = "condition", timeout: float = 20.0):
    """Poll ``condition`` until it returns something truthy (returned), failing after ``timeout`` seconds: tests
    wait for what they need instead of sleeping and assuming it happened."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)
    return value


def run_process(argv, *, timeout: float, **kwargs) -> subprocess.CompletedProcess:
    """``subprocess.run(argv, capture_output=True, text=True, timeout=...)`` that, on timeout, kills the child's
    whole process group: a CLI the tests start may start workers of its own (an evaluation's model process,
    accelerate's ranks, the demo's stages), and ``subprocess.run`` kills only the direct child, leaving those
    running with PID 1 as their parent and the box loaded for the tests after it."""
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                          **kwargs) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)
