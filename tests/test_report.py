"""The report: sections render what exists and name the command for what does not; the page renders in a real
headless Chromium with no console errors, no network requests, and every chart drawn.

Chromium is driven over the DevTools protocol on a pipe (``--remote-debugging-pipe``: fds 3 and 4, messages
separated by NUL bytes), which needs no websocket library. Tests skip with the reason when Chromium is absent
(.ci/run installs Debian's chromium).
"""

from __future__ import annotations

import base64
import json
import os
import re
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from slmigrate.config import Config
from slmigrate.report import report
from conftest import skip_unless_required  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / ".pytest_cache" / "report"  # screenshots land here for a human to look at


def chromium_binary() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


class Chromium:
    """A headless Chromium on the DevTools pipe: send commands, collect events."""

    def __init__(self, binary: str, profile: Path):
        args = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--no-first-run", "--no-default-browser-check",
                "--disable-extensions", "--hide-scrollbars", "--remote-debugging-pipe",
                f"--user-data-dir={profile}"]
        # The pipe protocol reads commands on fd 3 and writes replies on fd 4: let the shell wire our stdin and
        # stdout there, then give Chromium's own stdin/stdout something harmless.
        script = 'exec "$@" 3<&0 4>&1 0</dev/null 1>&2'
        self.proc = subprocess.Popen(["/bin/sh", "-c", script, "sh", *args], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        self.buffer = b""
        self.next_id = 0
        self.events: list[dict] = []

    def _read_message(self, deadline: float) -> dict:
        while b"\0" not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("Chromium did not answer in time")
            ready, _, _ = select.select([self.proc.stdout], [], [], left)
            if ready:
                chunk = os.read(self.proc.stdout.fileno(), 1 << 20)
                if not chunk:
                    raise RuntimeError("Chromium closed the DevTools pipe")
                self.buffer += chunk
        raw, self.buffer = self.buffer.split(b"\0", 1)
        return json.loads(raw)

    def send(self, method: str, params: dict | None = None, session: str | None = None,
             timeout: float = 60) -> dict:
        self.next_id += 1
        message = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        self.proc.stdin.write(json.dumps(message).encode() + b"\0")
        self.proc.stdin.flush()
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read_message(deadline)
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_for(self, method: str, timeout: float = 60) -> dict:
        deadline = time.monotonic() + timeout
        for event in self.events:
            if event.get("method") == method:
                return event
        while True:
            event = self._read_message(deadline)
            self.events.append(event)
            if event.get("method") == method:
                return event

    def close(self) -> None:
        try:
            self.send("Browser.close", timeout=10)
        except Exception:  # noqa: BLE001 - closing a browser that already went away is fine
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


CHART_CHECK = """
(() => [...document.querySelectorAll('figure.chart')].map(f => {
  const el = f.querySelector('svg, img');
  if (!el) return {name: f.dataset.chart, ok: false, why: 'no svg or img'};
  const box = el.getBoundingClientRect();
  const drawn = el.tagName === 'IMG' ? (el.complete && el.naturalWidth > 0)
                                     : el.querySelectorAll('path, rect, use, text').length > 0;
  return {name: f.dataset.chart, ok: drawn && box.width > 100 && box.height > 40,
          width: box.width, height: box.height};
}))()
"""


def render_in_chromium(html_file: Path, screenshot: Path) -> dict:
    """Open the report, return console errors, network requests, chart checks and missing sections."""
    binary = chromium_binary()
    if binary is None:
        skip_unless_required("chromium", "Chromium is not installed (apt-get install -y chromium; .ci/run does this)")
    profile = screenshot.parent / "chromium-profile"
    shutil.rmtree(profile, ignore_errors=True)
    browser = Chromium(binary, profile)
    try:
        target = browser.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = browser.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Runtime", "Log", "Page", "Network"):
            browser.send(f"{domain}.enable", session=session)
        browser.send("Emulation.setDeviceMetricsOverride",
                     {"width": 1280, "height": 900, "deviceScaleFactor": 1, "mobile": False}, session=session)
        browser.send("Page.navigate", {"url": html_file.resolve().as_uri()}, session=session)
        browser.wait_for("Page.loadEventFired")
        charts = browser.send("Runtime.evaluate", {"expression": CHART_CHECK, "returnByValue": True},
                              session=session)["result"]["value"]
        missing = browser.send("Runtime.evaluate", {
            "expression": "[...document.querySelectorAll('section[data-present=false] h2')].map(h => h.textContent)",
            "returnByValue": True}, session=session)["result"]["value"]
        size = browser.send("Page.getLayoutMetrics", session=session)["cssContentSize"]
        shot = browser.send("Page.captureScreenshot", {
            "format": "png", "captureBeyondViewport": True,
            "clip": {"x": 0, "y": 0, "width": 1280, "height": min(size["height"], 16000), "scale": 1}},
            session=session)
        screenshot.write_bytes(base64.b64decode(shot["data"]))
    finally:
        browser.close()
    errors = []
    for e in browser.events:
        p = e.get("params", {})
        if e.get("method") == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
            errors.append(p)
        elif e.get("method") == "Runtime.exceptionThrown":
            errors.append(p)
        elif e.get("method") == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
            errors.append(p["entry"])
    requests = [e["params"]["request"]["url"] for e in browser.events
                if e.get("method") == "Network.requestWillBeSent"]
    return {"errors": errors, "charts": charts, "missing": missing, "requests": requests,
            "height": size["height"]}


# --- a workspace holding every stage's artifacts --------------------------------------------------------------

def _calls(n: int = 60):
    from slmigrate.record import CallRecord

    calls = []
    for i in range(n):
        task = ("intent", "extract", "open")[i % 3]
        calls.append(CallRecord(
            request={"model": "gpt-4.1", "messages": [{"role": "system", "content": f"task {task}"},
                                                    {"role": "user", "content": f"message {i}"}]},
            response={"choices": [{"message": {"role": "assistant", "content": f"answer {i}"},
                                   "finish_reason": "stop"}],
                      "usage": {"prompt_tokens": 100 + i, "completion_tokens": 10 + i}},
            model="gpt-4.1", agent="support-bot", session=f"s{i // 4}", prompt_tokens=100 + i,
            completion_tokens=10 + i, source="import:openai", timestamp=f"2026-11-0{1 + i % 9}T10:00:00.000Z",
        ))
    return calls


def populate(ws) -> None:
    """Every stage's artifact, in the format its module writes, with made-up figures (for rendering only)."""
    from slmigrate.curate import dataset as curated
    from slmigrate.config import SelectConfig
    from slmigrate.selection.run import select

    calls = _calls(90)
    ws.store.insert_calls(calls)
    rows = [curated.to_row(c, ("train", "train", "test")[i % 3]) for i, c in enumerate(calls)]
    curated.write_curated(ws, rows, {"calls_in": 90, "calls_out": 90, "pii": "synthetic",
                                     "dropped": {"duplicate": 0, "failed": 0},
                                     "entities": {"PERSON": 31, "EMAIL_ADDRESS": 12}}, {})
    tasks = [("intent", "classify customer intent", "label", 0.91, True),
             ("extract", "extract order fields json", "json", 0.84, True),
             ("open", "open-ended writing requests", "text", 0.22, False)]
    ws.store.set_clusters({c.id: tasks[i % 3][0] for i, c in enumerate(calls)})
    clusters = [{"id": cid, "label": label, "output_kind": kind, "size": 30, "share": 1 / 3,
                 "cost_usd": 0.01 * (i + 1), "prompt_tokens": {"p50": 110, "p95": 140},
                 "completion_tokens": {"p50": 20, "p95": 40}, "replaceability": score,
                 "likely_replaceable": likely, "reasons": ["short answers" if likely else "long free text"]}
                for i, (cid, label, kind, score, likely) in enumerate(tasks)]
    from slmigrate import artifacts

    artifacts.write_clusters(ws, {"clusters": clusters, "unclustered": {"size": 0, "share": 0, "cost_usd": 0},
                                  "overall": {"call_share": 2 / 3, "cost_share": 0.5}, "map": "clusters/map.png"})
    _map_png(ws.path("clusters", "map.png"))
    select(ws, SelectConfig(cpu_only=True))
    for cid in ("intent", "extract"):
        folder = ws.path("adapters", cid, "smollm2-135m-instruct")
        folder.mkdir(parents=True)
        steps = list(range(1, 41))
        (folder / "metrics.json").write_text(json.dumps({
            "method": "lora", "steps": 40, "examples": 60, "final_train_loss": 0.13, "best_val_loss": 0.55,
            "tokens_per_second": 150.0, "seconds": 95.0, "history": {
            "steps": steps, "train_loss": [2.5 * 0.93 ** s for s in steps], "val_steps": [10, 20, 30, 40],
            "val_loss": [1.6, 0.9, 0.6, 0.55]}}))
    variants = lambda good: {  # noqa: E731
        "base": {"metrics": {"exact_match": 0.1}, "primary": 0.1,
                 "efficiency": {"latency_p50_ms": 300, "tokens_per_s": 40, "cost_per_1k_usd": 0.01}},
        "finetuned": {"metrics": {"exact_match": good}, "primary": good,
                      "efficiency": {"latency_p50_ms": 280, "tokens_per_s": 42, "cost_per_1k_usd": 0.01}}}
    results = [{"cluster": cid, "label": label, "kind": kind, "primary_metric": "exact_match", "threshold": 0.9,
                "test_calls": 10, "llm": {"model": "gpt-4.1", "latency_p50_ms": 900, "cost_per_1k_usd": 0.3},
                "variants": variants(0.95 if likely else 0.3),
                "decision": {"migrate": likely, "reason": "made up for the rendering test"}}
               for cid, label, kind, _, likely in tasks]
    (ws.path("evals") / "latest.json").write_text(json.dumps({"clusters": results, "plan": {
        "measured": {"calls": {"share": 2 / 3}, "cost_usd": {"share": 0.5}}}}))


def _map_png(path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4, 3))
    ax.scatter([0, 1, 2, 3], [1, 0, 3, 2], c=["r", "g", "b", "r"])
    fig.savefig(path)
    plt.close(fig)


def test_empty_workspace_says_what_to_run(workspace, tmp_path):
    info = report(workspace, out=tmp_path / "r.html", config=Config())
    html = (tmp_path / "r.html").read_text()
    md = (tmp_path / "r.md").read_text()
    assert info.sections_present == 0 and info.charts == []
    for command in ("slmigrate collect import FILE", "slmigrate curate", "slmigrate cluster", "slmigrate select",
                    "slmigrate finetune", "slmigrate evaluate"):
        assert f"run <code>{command}</code>" in html
        assert f"run `{command}`" in md
    assert "<script" not in html and "http://" not in html and "https://" not in html


def test_calls_only_shows_cost_by_model_and_escapes(workspace, tmp_path):
    calls = _calls()
    calls[0].model = "<b>evil</b>"
    workspace.store.insert_calls(calls)
    info = report(workspace, out=tmp_path / "r.html", config=Config())
    html = (tmp_path / "r.html").read_text()
    assert "&lt;b&gt;evil&lt;/b&gt;" in html and "<b>evil</b>" not in html
    present = {s["id"]: s["present"] for s in info.sections}
    assert present["overview"] and not present["map"]
    # gpt-4.1 at $2 / $8 per million tokens, priced from the store's usage.
    expected = sum(Config().prices.cost(c.model, c.prompt_tokens, c.completion_tokens) for c in calls)
    assert f"${expected:,.4f}" in html or f"${expected:,.2f}" in html


def test_markdown_report_escapes_logged_html_and_link_syntax(workspace, tmp_path):
    from slmigrate.report.doc import Section, md_text

    calls = _calls(8)
    calls[0].model = '<script>alert("m")</script>'
    calls[1].agent = "<img src=x onerror=alert(1)> [click](javascript:alert(2)) ![p](http://evil.example/p.png)"
    workspace.store.insert_calls(calls)
    report(workspace, out=tmp_path / "r.html", config=Config())
    md = (tmp_path / "r.md").read_text()
    for raw in ("<script", "<img", "![p]", "[click]"):
        assert raw not in md, raw
    assert not re.search(r"(?<!\\)\]\(", md)  # no unescaped "](" anywhere: no link or image can form
    assert "&lt;script&gt;alert(\"m\")&lt;/script&gt;" in md  # still readable as text
    assert "\\[click\\](javascript:alert(2))" in md
    # every element escapes: paragraphs, bullets, tiles, table cells, collapsed examples
    s = Section("x", "t")
    s.para("a <b>b</b> & [l](u)")
    s.bullets(["<i>x</i>"])
    s.kpis([("<k>", "[v](u)")])
    s.table(["h"], [["<td>|x"]])
    s.details([("<s>", "`code` <script>x</script>")], "ex")
    text = "\n".join(s.md)
    assert "<" not in text and not re.search(r"(?<!\\)\]\(", text)
    assert md_text("a\\[b](c)") == "a\\\\\\[b\\](c)"  # a logged backslash cannot undo the escape


def test_report_renders_in_chromium_with_every_chart(workspace, tmp_path):
    populate(workspace)
    out = tmp_path / "report.html"
    info = report(workspace, out=out, config=Config())
    assert len(info.charts) >= 5
    OUT.mkdir(parents=True, exist_ok=True)
    result = render_in_chromium(out, OUT / "report-fixture.png")
    assert result["errors"] == []
    assert [r for r in result["requests"] if not r.startswith(("file:", "data:"))] == []
    by_name = {c["name"]: c for c in result["charts"]}
    assert sorted(by_name) == sorted(info.charts)
    assert all(c["ok"] for c in result["charts"]), result["charts"]
    assert result["missing"] == []
    assert (OUT / "report-fixture.png").stat().st_size > 20_000


@pytest.mark.slow
def test_real_pipeline_report_in_chromium(tmp_path):
    """Real import, curate, cluster and select on the examples log, then the report in Chromium."""
    import importlib.util

    missing = [m for m in ("slmigrate.collect", "slmigrate.curate", "slmigrate.cluster", "slmigrate.selection")
               if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"stage modules not in this checkout yet: {', '.join(missing)}")
    if chromium_binary() is None:
        skip_unless_required("chromium", "Chromium is not installed (apt-get install -y chromium; .ci/run does this)")
    sys.path.insert(0, str(ROOT / "examples"))
    import agent_log

    from slmigrate.pipeline import audit

    log = tmp_path / "calls.jsonl"
    agent_log.write(log, calls=300, seed=1)
    summary = audit([log], tmp_path / "audit")
    assert summary.ok, summary.error
    OUT.mkdir(parents=True, exist_ok=True)
    result = render_in_chromium(Path(summary.report), OUT / "report-audit.png")
    assert result["errors"] == []
    assert result["charts"] and all(c["ok"] for c in result["charts"]), result["charts"]
    names = {c["name"] for c in result["charts"]}
    assert {"cost_per_cluster", "cluster_map", "replaceability", "savings"} <= names
    # An audit trains nothing: those sections say what to run.
    assert "Fine-tuning" in result["missing"] and "Evaluation per variant" in result["missing"]


def test_cli_report_and_audit_errors(workspace, tmp_path, capsys):
    from slmigrate.cli import main

    workspace.store.insert_calls(_calls(12))
    out = tmp_path / "team.html"
    assert main(["report", "--workspace", str(workspace.root), "--out", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["html"] == str(out) and out.exists() and Path(info["markdown"]).exists()
    assert main(["report", "--workspace", str(workspace.root), "--no-markdown"]) == 0
    assert (workspace.root / "reports" / "report.html").exists()
    assert not (workspace.root / "reports" / "report.md").exists()
    assert main(["audit", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "a")]) == 1
    assert "nope.jsonl does not exist" in capsys.readouterr().err


def test_cli_report_uses_the_workspace_config_not_the_current_directory(workspace, tmp_path, monkeypatch, capsys):
    """`slmigrate report` run from a folder whose ./slmigrate.toml prices calls 100x higher reports the same
    costs: it takes the workspace's settings; only --config names another file."""
    from slmigrate.cli import main

    calls = _calls(12)
    workspace.store.insert_calls(calls)
    default = sum(Config().prices.cost(c.model, c.prompt_tokens, c.completion_tokens) for c in calls)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "slmigrate.toml").write_text('[prices]\nper_million = {"gpt-4.1" = [200.0, 800.0]}\n')

    def cost_shown(*args: str) -> str:
        out = tmp_path / "r.html"
        assert main(["report", "--workspace", str(workspace.root), "--out", str(out), *args]) == 0, \
            capsys.readouterr().err
        capsys.readouterr()
        return out.read_text()

    here = cost_shown()
    monkeypatch.chdir(elsewhere)
    there = cost_shown()
    assert f"${default:,.4f}" in here and f"${default:,.4f}" in there
    assert f"${100 * default:,.4f}" not in there
    named = cost_shown("--config", "slmigrate.toml")
    assert f"${100 * default:,.4f}" in named or f"${100 * default:,.2f}" in named


def test_the_live_guard_section_shows_each_migrated_task_and_a_demotion(workspace, tmp_path):
    from slmigrate.serve.guard import GUARD

    populate(workspace)
    report(workspace, out=tmp_path / "r.html", config=Config())
    assert "Live guard" in (tmp_path / "r.md").read_text() and "no live checks yet" in (tmp_path / "r.md").read_text()
    run = (workspace.evaluation() or {}).get("run")
    workspace.path(*GUARD).parent.mkdir(parents=True, exist_ok=True)
    workspace.path(*GUARD).write_text(json.dumps({"tasks": {"intent": {
        "evaluation_run": run, "metric": "exact_match", "threshold": 0.9, "samples": 20, "agreement": 0.0,
        "lower": 0.0, "upper": 0.161, "demoted": True, "reason": "upper bound 0.161 < threshold 0.90"}}}))
    report(workspace, out=tmp_path / "r.html", config=Config())
    md = (tmp_path / "r.md").read_text()
    guard = md[md.index("Live guard"):]
    assert "demoted to the LLM" in guard and "0.000-0.161" in guard and "upper bound 0.161" in guard
