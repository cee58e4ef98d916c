"""Batched generation: left padding and length sorting must not change what greedy decoding produces."""

import pytest

torch = pytest.importorskip("torch")

from slmigrate.evaluate.generate import generate, max_new_tokens_for  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """On a shared 2-core box, torch's second thread spin-waits against other processes (15x slower here)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny():
    from tiny_model import tiny_model, tiny_tokenizer

    tok = tiny_tokenizer()
    return tiny_model(tok), tok


PROMPTS = ["hello there", "a much longer prompt with many more words in it than the others", "x",
           "what is the weather in paris today", "tool call please"]


def test_batched_equals_one_by_one_and_keeps_order(tiny):
    model, tok = tiny
    single = generate(model, tok, PROMPTS, batch_size=1, max_new_tokens=12)
    batched = generate(model, tok, PROMPTS, batch_size=4, max_new_tokens=12)
    assert batched.texts == single.texts
    assert batched.new_tokens == single.new_tokens
    assert batched.prompt_tokens == [len(tok(p, add_special_tokens=False)["input_ids"]) for p in PROMPTS]
    assert all(0 <= n <= 12 for n in batched.new_tokens) and sum(batched.new_tokens) > 0
    assert batched.tokens_per_s > 0 and batched.peak_memory_mb > 0 and batched.memory_kind == "rss"
    # Longest first: prompts 1, 3, 4, 0 form the first batch, "x" (2) is alone in the second. A call's latency
    # is its batch's wall time; its compute time is its share of that batch.
    assert batched.latency_ms[0] == batched.latency_ms[1] == batched.latency_ms[3]
    assert batched.compute_ms[0] == pytest.approx(batched.latency_ms[0] / 4)
    assert batched.compute_ms[2] == pytest.approx(batched.latency_ms[2])
    assert batched.summary()["calls"] == len(PROMPTS)


def test_max_new_tokens_stops_and_counts_truncation(tiny):
    model, tok = tiny
    # A random model rarely emits its stop token in 3 steps: every answer is cut at the limit.
    out = generate(model, tok, PROMPTS, batch_size=2, max_new_tokens=3)
    assert all(n <= 3 for n in out.new_tokens)
    assert out.truncated == sum(1 for n in out.new_tokens if n == 3)


def test_max_new_tokens_sized_from_references(tiny):
    _, tok = tiny
    n = len(tok("one two three four five six seven eight", add_special_tokens=False)["input_ids"])
    assert max_new_tokens_for(tok, ["one two three four five six seven eight", "one"]) == int(
        max(16, -(-n * 1.25 // 1) + 16))
    assert max_new_tokens_for(tok, []) == 16
    assert max_new_tokens_for(tok, ["word " * 5000], cap=64) == 64


def test_empty_prompt_list(tiny):
    model, tok = tiny
    out = generate(model, tok, [], batch_size=4)
    assert out.texts == [] and out.tokens_per_s == 0.0
