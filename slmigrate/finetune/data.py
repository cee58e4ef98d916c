"""Training examples for one cluster, and batches that carry (almost) no padding.

An example is the call's prompt rendered with the model's chat template (``chat_format.render_prompt``)
followed by the LLM's recorded answer (``chat_format.render_answer``); labels are -100 on the prompt so the
loss covers only the answer tokens - the model learns to answer like the LLM, not to repeat its prompts.

Batches are length-grouped under a token budget: examples sorted by length are cut into runs whose padded
size (``rows x longest``) stays within ``batch_tokens``, so neighbours have nearly equal lengths and padding
is a few percent instead of the half or more that random padded batches carry. The order of the batches is
shuffled per epoch from the seed, so it is reproducible and a resumed run sees exactly the same batches.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Sequence

from slmigrate import chat_format

IGNORE = -100  # label value the loss skips


@dataclass
class Example:
    call_id: str
    input_ids: list[int]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class BuildReport:
    """What happened to the calls on the way to examples (reported in data.json and by the CLI)."""

    calls: int = 0
    examples: int = 0
    no_answer: int = 0  # failed calls: nothing to learn from
    too_long: int = 0  # even the answer and the protected turns do not fit max_length
    prompts_cut: int = 0  # prompts that lost old history or the system message's tail
    messages_dropped: int = 0
    prompt_tokens: int = 0
    answer_tokens: int = 0
    prefix_tokens_saved: int = 0  # prompt tokens removed by static prompt pruning, over all examples
    dropped_ids: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        data = dict(self.__dict__)
        data["dropped_ids"] = self.dropped_ids[:20]
        return data


def sample_calls(calls: Sequence[Any], limit: int | None, seed: int) -> list[Any]:
    """At most ``limit`` of ``calls``, kept in their original order: the first ``limit`` ids of a seeded shuffle of
    the sorted ids. Sorting first makes the draw independent of the order the store returned the calls; taking a
    prefix of one shuffle nests the samples of a seed (the 100 calls hold the 50), so the points of a learning
    curve differ by the data added, not by a fresh draw."""
    if limit is None or len(calls) <= limit:
        return list(calls)
    ids = sorted(c.id for c in calls)
    random.Random(f"sample:{seed}").shuffle(ids)
    keep = set(ids[:limit])
    return [c for c in calls if c.id in keep]


def build_examples(tokenizer, calls: Sequence[Any], *, max_length: int,
                   static: chat_format.StaticPrompt | None = None,
                   report: BuildReport | None = None) -> tuple[list[Example], BuildReport]:
    """Tokenise ``calls`` (anything with ``id``, ``messages``, ``tools``, ``answer``) into examples, without
    the ``static`` parts of their prompts."""
    report = report or BuildReport()
    examples: list[Example] = []
    static = static or chat_format.StaticPrompt()
    for call in calls:
        report.calls += 1
        if call.answer is None:
            report.no_answer += 1
            continue
        # The target is tokenised alone, as the model will produce it after the prompt at serving time.
        target_ids = tokenizer(chat_format.render_answer(tokenizer, call.answer), add_special_tokens=False)["input_ids"]
        budget = max_length - len(target_ids)
        messages, tools = static.apply(call.messages, call.tools)
        if budget <= 0:
            report.too_long += 1
            report.dropped_ids.append(call.id)
            continue
        rendered = chat_format.render_prompt(tokenizer, messages, tools, max_tokens=budget)
        if not rendered.fits:
            report.too_long += 1
            report.dropped_ids.append(call.id)
            continue
        if rendered.dropped_messages or rendered.system_chars_cut:
            report.prompts_cut += 1
            report.messages_dropped += rendered.dropped_messages
        prompt_ids = tokenizer(rendered.text, add_special_tokens=False)["input_ids"]
        if messages is not call.messages or len(tools) != len(call.tools or []):  # something was pruned
            whole = chat_format.render_prompt(tokenizer, call.messages, call.tools).text
            report.prefix_tokens_saved += max(0, chat_format.count_tokens(tokenizer, whole) - len(prompt_ids))
        report.examples += 1
        report.prompt_tokens += len(prompt_ids)
        report.answer_tokens += len(target_ids)
        examples.append(Example(call.id, prompt_ids + target_ids, [IGNORE] * len(prompt_ids) + target_ids))
    return examples, report


def length_grouped_batches(examples: Sequence[Example], batch_tokens: int, *, seed: int,
                           epoch: int) -> list[list[int]]:
    """Indexes of ``examples`` grouped into batches of similar length whose padded size fits ``batch_tokens``.

    Ties in length are broken by a seeded shuffle so equal-length examples do not always meet in the same
    batches; the batch order is shuffled per epoch. An example longer than the budget gets a batch alone.
    """
    rng = random.Random(f"{seed}:{epoch}")
    order = list(range(len(examples)))
    rng.shuffle(order)
    order.sort(key=lambda i: len(examples[i]))  # stable: the shuffle survives among equal lengths
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        longest = len(examples[i])  # sorted ascending, so the newcomer is the longest so far
        if current and longest * (len(current) + 1) > batch_tokens:
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    rng.shuffle(batches)
    return batches


def collate(examples: Sequence[Example], pad_id: int) -> dict[str, Any]:
    """Right-pad a batch to its longest example; padding gets attention 0 and label -100."""
    import torch

    width = max(len(e) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        ids[row, : len(e)] = torch.tensor(e.input_ids)
        labels[row, : len(e)] = torch.tensor(e.labels)
        mask[row, : len(e)] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def padding_share(examples: Sequence[Example], batches: Sequence[Sequence[int]]) -> float:
    """Padded positions as a share of all positions the model computes, for these batches."""
    real = sum(len(examples[i]) for b in batches for i in b)
    total = sum(max(len(examples[i]) for i in b) * len(b) for b in batches)
    return 1 - real / total if total else 0.0
