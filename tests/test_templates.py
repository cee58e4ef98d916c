"""Instruction templates (cluster/templates.py) and the dominant-task split, without the real embedding model."""

import random
import re

from sklearn.metrics import adjusted_rand_score

from slmigrate.cluster import cluster_calls
from fakes import HashEmbedder
from slmigrate.cluster.templates import TemplateMiner, mask_lines
from slmigrate.cluster.views import digest64, instruction_text
from slmigrate.config import ClusterConfig
from slmigrate.record import CallRecord

import synthetic_agents


def mine(rows, min_size=5, rewrite=lambda text: text):
    miner = TemplateMiner()
    ids = []
    for r in rows:
        text, from_user = instruction_text(r["request"]["messages"])
        text = rewrite(text)
        ids.append(miner.add(digest64(text), 0, lambda t=text, u=from_user: (t, u)))
    per_text, templates = miner.fit(min_size)
    return [per_text[i] for i in ids], templates


def test_mask_lines_hides_slots():
    text = ("Role: engineer\n```python\nx = 1\n```\nWrite main.py for <PERSON_1> (a@b.co), order 123, "
            "id 9f8e7d6c5b4a\nSee https://x.io/a 'a long quoted string of user data here'\n\n")
    assert mask_lines(text) == ["Role: engineer", "<code>",
                                "Write <file> for <pii> (<email>), order 0, id 0", 'See <url> "<str>"']


def test_templates_in_the_first_user_message_are_recovered_and_named():
    rows = synthetic_agents.template_log(480, seed=0)
    labels, templates = mine(rows)
    truth = [r["metadata"]["template"] for r in rows]
    assert adjusted_rand_score(truth, labels) >= 0.95
    names = {t.name for t in templates}
    assert "You are a python code to Mermaid Sequence Diagram translator in function detail" in names
    assert "You are a QA engineer" in names


def test_pii_placeholders_neither_create_nor_merge_templates():
    rows = synthetic_agents.template_log(480, seed=1)
    names = re.compile("|".join(rf"{f} {last}" for f in synthetic_agents.FIRST for last in synthetic_agents.LAST))
    plain, _ = mine(rows)
    counter = iter(range(10**6))
    scrubbed, _ = mine(rows, rewrite=lambda text: names.sub(lambda m: f"<PERSON_{next(counter) % 3 + 1}>", text))
    assert adjusted_rand_score(plain, scrubbed) == 1.0


def test_react_scratchpad_lines_do_not_split_an_agent():
    rows = synthetic_agents.react_log(480, seed=0)
    labels, templates = mine(rows)
    assert adjusted_rand_score([r["metadata"]["agent"] for r in rows], labels) == 1.0
    assert len(templates) == 3


def test_a_chat_s_opening_messages_are_no_template():
    rng = random.Random(0)
    words = "river budget garden office lunch travel roadmap coffee printer holiday poem".split()
    rows = [{"request": {"messages": [{"role": "user", "content": " ".join(rng.choices(words, k=12))}]}}
            for _ in range(60)]
    labels, templates = mine(rows)
    assert all(templates[t].residual for t in set(labels))


def _agent_call(i, answer):
    tools = [{"type": "function", "function": {"name": n, "parameters": {"type": "object", "properties": {}}}}
             for n in ("lookup_order", "refund", "escalate")]
    return CallRecord(request={"model": "m", "tools": tools, "messages": [
        {"role": "system", "content": "You are the support agent of Acme. Use the tools to help the customer."},
        {"role": "user", "content": f"Customer {i}: my order {i * 7} never came, case {random.Random(i).random()}"}]},
        response={"choices": [{"index": 0, "message": answer}]}).finalise()


def test_one_agent_prompt_is_split_into_its_steps():
    calls = []
    for i in range(120):
        kind = i % 4
        if kind < 3:
            name = ("lookup_order", "refund", "escalate")[kind]
            answer = {"role": "assistant", "content": None, "tool_calls": [
                {"id": f"c{i}", "type": "function", "function": {"name": name, "arguments": "{}"}}]}
        else:
            answer = {"role": "assistant", "content": f"I am sorry about order {i}, it is on its way now."}
        calls.append(_agent_call(i, answer))
    body, _, assignment, _ = cluster_calls(calls, ClusterConfig(map=False), embedder=HashEmbedder())
    assert len(body["clusters"]) == 4 and "warning" not in body
    assert all(c["split_from_dominant"] for c in body["clusters"])
    assert {c["label"].split(" · ")[-1] for c in body["clusters"]} == {
        "calls lookup_order", "calls refund", "calls escalate", "reply"}
    by_step = {}
    for call, cid in zip(calls, assignment):
        by_step.setdefault(cid, set()).add(call.answer.get("tool_calls", [{}])[0].get("function", {}).get("name"))
    assert all(len(v) == 1 for v in by_step.values())


def test_one_task_doing_one_thing_stays_whole_and_is_reported():
    calls = [CallRecord(request={"model": "m", "messages": [
        {"role": "system", "content": "Classify the message's sentiment. Answer positive or negative."},
        {"role": "user", "content": f"message {i}: the {random.Random(i).choice(['food', 'room'])} was fine"}]},
        response={"choices": [{"index": 0, "message": {"role": "assistant", "content": "positive"}}]}).finalise()
        for i in range(40)]
    body, _, _, _ = cluster_calls(calls, ClusterConfig(map=False), embedder=HashEmbedder())
    assert len(body["clusters"]) == 1
    assert "holds 100% of the calls" in body["warning"] and "--granularity fine" in body["warning"]
