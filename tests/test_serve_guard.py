"""The router's live guard: a share of the small model's answers is checked against the LLM in the background;
a task whose live agreement's upper bound falls below its threshold is demoted to the LLM.

The router here is the real application behind the real openai client, with the scripted engine of
tests/test_serve.py (its answers chosen per test) and a stub upstream; tests/test_serve_real.py runs the guard
with the real SmolLM2 engine.
"""

import asyncio
import threading

import openai
import pytest
from stub_llm import ServerThread, StubLLM, stored_calls
from test_serve import ScriptedEngine, _ask, assign

from conftest import wait_for
from slmigrate.cli import main
from slmigrate.collect.writer import RecordWriter
from slmigrate.serve import RouterSettings, build_app
from slmigrate.serve.guard import demotions, live_record
from slmigrate.stats import wilson
from slmigrate.status import status
from slmigrate.store import Store
from slmigrate.workspace import Workspace



class Guarded:
    """The router with the live guard on (every SLM answer checked unless told otherwise), threshold 0.9."""

    def __init__(self, tmp_path, upstream_url: str, threshold: float = 0.9, **settings):
        self.ws = Workspace.open(tmp_path / "ws")
        self.db = self.ws.root / "slmigrate.sqlite"
        self.engine = ScriptedEngine(tmp_path)
        for d in self.engine.deployments.values():
            d.threshold, d.metric = threshold, None
        self.writer = RecordWriter(lambda: Store(self.db))
        settings.setdefault("guard_sample", 1.0)
        self.app, self.router = build_app(self.ws, RouterSettings(upstream=upstream_url, **settings),
                                          writer=self.writer, engine=self.engine, assign=assign)
        self.server = ServerThread(self.app).start()
        self.client = openai.OpenAI(base_url=self.server.base + "/v1", api_key="sk-test", max_retries=0,
                                    timeout=15)

    def task(self, cluster: str = "intent") -> dict:
        return self.router.guard.snapshot()["tasks"][cluster]

    def routes(self) -> dict:
        return self.client._client.get(self.server.base + "/slmigrate/routes").json()

    def stop(self):
        self.server.stop()
        self.writer.close()


@pytest.fixture(scope="module")
def stub():
    with StubLLM() as server:
        yield server


@pytest.fixture
def guarded(tmp_path):
    made = []

    def make(upstream_url, threshold=0.9, **settings):
        made.append(Guarded(tmp_path / str(len(made)), upstream_url, threshold, **settings))
        return made[-1]

    yield make
    for g in made:
        g.stop()


def test_wilson_interval():
    low, high = wilson(9, 10)
    assert (round(low, 2), round(high, 2)) == (0.6, 0.98)  # the 9/10: far too wide to decide on
    assert wilson(0, 20)[1] == pytest.approx(3.8415 / 23.8415, abs=1e-4)  # z²/(n + z²) with no agreement
    assert wilson(50, 50)[0] == pytest.approx(0.9287, abs=1e-4) and wilson(50, 50)[1] == pytest.approx(1.0)
    assert wilson(0, 0) == (0.0, 1.0)
    low, high = wilson(7.5, 10)  # a sum of continuous scores is accepted
    assert low < 0.75 < high


def test_a_task_the_llm_always_disagrees_with_is_demoted_within_60_requests(guarded, stub, capsys, monkeypatch):
    g = guarded(stub.url)
    g.engine.script["intent"] = {"role": "assistant", "content": "refund_request"}  # the stub says "Echo: ..."
    slm_answers = 0
    for i in range(60):
        out = g.client.chat.completions.create(model="gpt-4o", messages=_ask("label", f"money back {i}"))
        if out.model != "slmigrate/intent":
            break
        slm_answers += 1
        # One request, one comparison: wait for it, so the count of SLM answers before the demotion is exact.
        wait_for(lambda: g.task()["samples"] >= slm_answers or g.task()["demoted"], "the guard's comparison")
    task = g.task()
    assert task["demoted"], task
    assert slm_answers == task["samples"] == 20  # guard_min_samples: the first moment the guard may decide
    assert task["agreement"] == 0.0 and task["upper"] < 0.9 and "upper bound" in task["reason"]
    # From then on the LLM answers the task, and says why.
    out = g.client.chat.completions.create(model="gpt-4o", messages=_ask("label", "and now?"))
    assert out.choices[0].message.content == "Echo: and now?"
    assert g.engine.calls == 20
    routes = g.routes()
    assert routes["guard"]["tasks"]["intent"]["demoted"] is True
    assert routes["clusters"]["intent"]["upstream"] >= 1
    metrics = g.client._client.get(g.server.base + "/slmigrate/metrics").text
    assert 'slmigrate_router_guard_demoted{cluster="intent"} 1' in metrics
    assert 'slmigrate_router_guard_samples_total{cluster="intent"} 20' in metrics
    records = stored_calls(g.writer, g.db, expect=20 + 20 + 2)
    by = [r.metadata["route"] for r in records]
    assert sum(r.get("answered_by") == "slm" for r in by) == 20
    assert sum(r.get("guard") == "sample" for r in by) == 20  # the LLM's side of each check is logged too
    assert any(r.get("reason") == "demoted by the live guard" for r in by)
    # Persisted: status shows it, refine's reader returns it, and a restarted router keeps the task on the LLM.
    assert set(demotions(g.ws)) == {"intent"}
    assert status(g.ws)["live_guard"]["intent"]["demoted"] is True
    monkeypatch.setenv("COLUMNS", "200")
    assert main(["status", "-w", str(g.ws.root)]) == 0
    shown = capsys.readouterr().out
    assert "live guard" in shown and "demoted to the LLM" in shown
    again, _ = build_app(g.ws, RouterSettings(upstream=stub.url, guard_sample=1.0), writer=g.writer,
                         engine=g.engine, assign=assign)
    assert again.router.route({"messages": _ask("label", "x")}).reason == "demoted by the live guard"


def test_a_task_the_llm_agrees_with_is_never_demoted(guarded, stub):
    g = guarded(stub.url)
    g.engine.script["intent"] = {"role": "assistant", "content": "Echo: same words"}  # what the stub answers
    for i in range(60):
        out = g.client.chat.completions.create(model="gpt-4o", messages=_ask("label", "same words"))
        assert out.model == "slmigrate/intent", f"request {i} was not answered by the small model"
    task = wait_for(lambda: g.task()["samples"] == 60 and g.task(), "60 comparisons")
    assert not task["demoted"] and task["agreement"] == 1.0 and task["lower"] > 0.9
    assert demotions(g.ws) == {} and live_record(g.ws)["intent"]["samples"] == 60


def test_only_the_sampled_share_is_checked(guarded, stub):
    g = guarded(stub.url, guard_sample=0.25)
    g.engine.script["intent"] = {"role": "assistant", "content": "Echo: hi"}
    for _ in range(8):
        g.client.chat.completions.create(model="gpt-4o", messages=_ask("label", "hi"))
    wait_for(lambda: g.task()["samples"] == 2, "two comparisons")
    guard_rows = [r for r in stored_calls(g.writer, g.db, expect=10) if r.metadata["route"].get("guard")]
    assert len(guard_rows) == 2


class HeldUpstream:
    """An upstream LLM that answers only once the test lets it (``release``): no timing assumptions."""

    def __init__(self, content: str):
        from starlette.applications import Starlette
        from starlette.responses import JSONResponse
        from starlette.routing import Route

        self.arrived = threading.Event()
        self.release = threading.Event()
        self.answered = threading.Event()

        async def chat(request):
            body = await request.json()
            self.arrived.set()
            await asyncio.to_thread(self.release.wait, 30)
            self.answered.set()
            return JSONResponse({"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                                 "choices": [{"index": 0, "finish_reason": "stop",
                                              "message": {"role": "assistant", "content": content}}],
                                 "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6}})

        self.server = ServerThread(Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])]))
        self.url = None

    def __enter__(self):
        self.server.start()
        self.url = self.server.base + "/v1"
        return self

    def __exit__(self, *exc):
        self.release.set()
        self.server.stop()


@pytest.mark.parametrize("stream", [False, True])
def test_the_client_never_waits_for_the_guards_llm_call(guarded, stream):
    with HeldUpstream("refund_request") as upstream:
        g = guarded(upstream.url)
        g.engine.script["intent"] = {"role": "assistant", "content": "refund_request"}
        out = g.client.chat.completions.create(model="gpt-4o", messages=_ask("label", "money back"), stream=stream)
        if stream:
            text = "".join(c.choices[0].delta.content or "" for c in out if c.choices)
        else:
            text = out.choices[0].message.content
        assert text == "refund_request"
        # The client has the small model's whole answer, and the LLM has not answered (it cannot, yet).
        assert upstream.arrived.wait(15), "the guard never asked the LLM"
        assert not upstream.answered.is_set() and g.task()["samples"] == 0
        assert g.router.guard.snapshot()["in_flight"] == 1
        upstream.release.set()
        task = wait_for(lambda: g.task()["samples"] == 1 and g.task(), "the guard's comparison")
        assert task["agreement"] == 1.0
        wait_for(lambda: g.router.guard.snapshot()["in_flight"] == 0, "the check to finish")


def test_a_demotion_holds_until_the_task_is_evaluated_again(workspace, tmp_path):
    from slmigrate import artifacts
    from slmigrate.serve.deployment import Deployment
    from slmigrate.serve.guard import Guard

    deployments = {"intent": Deployment("intent", tmp_path / "adapter", "base", "label", metric="label_exact",
                                        threshold=0.9)}
    artifacts.write_evaluation(workspace, {"run": "r1", "clusters": []})
    guard = Guard(workspace, deployments, sample=1.0, min_samples=5)
    for _ in range(4):
        assert guard.record("intent", 0.0) is None  # below the minimum: no decision yet
    event = guard.record("intent", 0.0)
    assert event["demoted"] and event["samples"] == 5 and event["upper"] < 0.9
    assert not guard.begin("intent")  # a demoted task is not sampled any more
    # The same evaluation: a restarted router keeps the demotion and the counts.
    again = Guard(workspace, deployments, sample=1.0, min_samples=5)
    assert again.demoted("intent") and again.tasks["intent"].samples == 5
    assert set(demotions(workspace)) == {"intent"}
    # A new evaluation (the task retrained and evaluated again): a fresh start.
    artifacts.write_evaluation(workspace, {"run": "r2", "clusters": []})
    assert demotions(workspace) == {} and live_record(workspace) == {}
    fresh = Guard(workspace, deployments, sample=1.0, min_samples=5)
    assert not fresh.demoted("intent") and fresh.tasks["intent"].samples == 0
    # A task without a threshold is watched but never demoted.
    unbounded = {"free": Deployment("free", tmp_path / "adapter", "base", "text")}
    watcher = Guard(workspace, unbounded, sample=1.0, min_samples=1)
    assert all(watcher.record("free", 0.0) is None for _ in range(30))
    assert watcher.snapshot()["tasks"]["free"]["samples"] == 30


@pytest.mark.parametrize("agrees", [True, False])
def test_the_canary_ramp_grows_a_share_only_on_the_guards_lower_bound(guarded, stub, agrees):
    g = guarded(stub.url, threshold=0.5, canary=25, canary_ramp=True, guard_min_samples=5)
    g.engine.script["intent"] = {"role": "assistant", "content": "Echo: hi" if agrees else "something else"}
    shares, slm = [], 0
    for _ in range(40):
        out = g.client.chat.completions.create(model="gpt-4o", messages=_ask("label", "hi"))
        if out.model.startswith("slmigrate/"):
            slm += 1
            wait_for(lambda: g.task()["samples"] >= slm or g.task()["demoted"], "the guard's comparison")
        shares.append(g.task()["canary"])
    if agrees:
        # 25% until 5 checks bound agreement above 0.5 (lower 0.57), then 50%, then every request.
        assert shares[0] == 25 and 50 in shares and shares[-1] == 100, shares
        assert shares == sorted(shares)
        assert g.task()["samples"] == slm == 5 + 5 + 10  # 20 requests at 25%, 10 at 50%, 10 at 100%
    else:
        assert set(shares) == {25} and g.task()["demoted"], shares  # never grew; demoted after 5 checks
