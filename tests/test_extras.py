"""The core install works without the machine-learning extras (pyproject.toml: `cluster`, `train`).

The proxy, `collect import`, `calls`, `status`, `report` and `curate` run in subprocesses where torch,
transformers, peft, accelerate and sentence-transformers cannot be imported (a sitecustomize that makes them look
uninstalled), and a command that needs a missing extra stops with `Error: ... pip install 'slmigrate[EXTRA]'`
and no traceback.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from slmigrate.store import Store

sys.path.insert(0, str(Path(__file__).parent))
from conftest import run_process  # noqa: E402
from stub_llm import StubLLM, expected_completion, free_port  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "tests" / "fixtures" / "formats" / "openai.jsonl"
BLOCKED = ("torch", "transformers", "peft", "accelerate", "sentence_transformers", "bitsandbytes")

# What an installation without the extras looks like to Python: importing one of them fails, and probing for it
# (importlib.util.find_spec, which libraries such as `datasets` use to see what is there) finds nothing.
SITECUSTOMIZE = f'''
import importlib.util
import sys

BLOCKED = {BLOCKED!r}


def _blocked(name):
    return name.split(".")[0] in BLOCKED


class _NotInstalled:
    def find_spec(self, name, path=None, target=None):
        if _blocked(name):
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None


_find_spec = importlib.util.find_spec


def find_spec(name, package=None):
    if _blocked(name):
        return None
    return _find_spec(name, package)


sys.meta_path.insert(0, _NotInstalled())
importlib.util.find_spec = find_spec
'''


@pytest.fixture
def bare_env(tmp_path):
    """Environment for a subprocess of a core install (no ML extras)."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(ROOT)])}
    env.pop("SLMIGRATE_ADMIN_TOKEN", None)
    return env


def _cli(env, *args, cwd: Path) -> subprocess.CompletedProcess:
    return run_process([sys.executable, "-m", "slmigrate", *args], env=env, cwd=cwd, timeout=300)


def test_the_blocker_blocks(bare_env, tmp_path):
    code = ("import importlib.util\nassert importlib.util.find_spec('torch') is None\n"
            "try:\n    import torch\nexcept ImportError:\n    print('blocked')\n")
    out = subprocess.run([sys.executable, "-c", code], env=bare_env, cwd=tmp_path, capture_output=True, text=True)
    assert out.stdout.strip() == "blocked", out.stderr


def test_proxy_import_calls_status_and_report_without_ml_extras(bare_env, tmp_path):
    ws = tmp_path / "ws"
    with StubLLM() as stub:
        port = free_port()
        proc = subprocess.Popen([sys.executable, "-m", "slmigrate", "collect", "proxy", "--upstream", stub.url,
                                 "--port", str(port), "-w", str(ws), "--json"], env=bare_env, cwd=tmp_path,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 60
            while True:
                assert proc.poll() is None, proc.stderr.read().decode()
                try:
                    if httpx.get(base + "/slmigrate/health", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                assert time.monotonic() < deadline, "proxy did not start"
                time.sleep(0.1)
            client = openai.OpenAI(base_url=base + "/v1", api_key="sk-test", max_retries=0)
            body = {"model": "stub", "messages": [{"role": "user", "content": "hello without torch"}]}
            answer = client.chat.completions.create(**body)
            assert answer.choices[0].message.content == expected_completion(body)["choices"][0]["message"]["content"]
            proc.send_signal(signal.SIGTERM)
            out, err = proc.communicate(timeout=60)
            assert proc.returncode == 0, err.decode()
            assert json.loads(out)["logged"] == 1
        finally:
            proc.kill()
    with Store(ws / "slmigrate.sqlite") as store:
        [stored] = list(store.iter_calls())
    assert stored.messages[-1]["content"] == "hello without torch" and stored.answer["content"].startswith("Echo:")

    done = _cli(bare_env, "-w", str(ws), "collect", "import", str(FIXTURE), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    status = _cli(bare_env, "-w", str(ws), "status", "--json", cwd=tmp_path)
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["calls"] == 4
    listed = _cli(bare_env, "-w", str(ws), "calls", "list", "--json", cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    assert len(json.loads(listed.stdout)) == 4
    reported = _cli(bare_env, "-w", str(ws), "report", "--json", cwd=tmp_path)
    assert reported.returncode == 0, reported.stderr
    assert Path(json.loads(reported.stdout)["html"]).exists()


def test_a_command_needing_a_missing_extra_names_it(bare_env, tmp_path):
    ws = str(tmp_path / "ws")
    assert _cli(bare_env, "-w", ws, "collect", "import", str(FIXTURE), cwd=tmp_path).returncode == 0
    curated = _cli(bare_env, "-w", ws, "curate", "--pii", "off", cwd=tmp_path)  # curate is core
    assert curated.returncode == 0, curated.stderr
    clustered = _cli(bare_env, "-w", ws, "cluster", cwd=tmp_path)
    assert clustered.returncode == 1, clustered.stderr
    assert "Traceback" not in clustered.stderr
    assert "needs the `cluster` extra" in clustered.stderr
    assert "pip install 'slmigrate[cluster]'" in clustered.stderr
