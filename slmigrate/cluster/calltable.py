"""The calls as columns: what ``cluster`` keeps per call and per distinct task view, so memory stays flat.

Held as Python objects, a million calls take gigabytes (~5 KB each even trimmed to what clustering reads), yet
clustering needs only a few numbers per call. ``CallTable.add`` takes the calls one at a time, from a stream, and
keeps:

- per call, 36 bytes in ``array`` columns: the row of its distinct view, its model, token counts and cost, and
  its request signature (the router's fast-path key);
- per *row*, one per distinct (group, task view): 41 bytes of columns (group, content hash, output kind, tool
  name, and hashes of the answer shape, system prompt and latest turn: what the stats count) plus the dedup
  dictionary's entry;
- the views themselves, each with the id of the row's first call, in a temporary spill file that ``cluster``
  reads back a chunk at a time (``iter_rows``).

A row's group is the clustering group (all calls, or one agent's with ``--by agent``) or, for a call that carries
a task tag, the tag: tagged calls are not clustered, each tag is a cluster of its own.
"""

from __future__ import annotations

import pickle
import tempfile
from array import array
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path

import numpy as np

from slmigrate.cluster.model import UNKNOWN_AGENT, request_signature, task_tag
from slmigrate.cluster.templates import TemplateMiner
from slmigrate.cluster.views import OUTPUT_KINDS, TaskView, digest64, instruction_text, task_view
from slmigrate.config import PricesConfig
from slmigrate.record import CallRecord

GROUP, TAG = "group", "tag"
_SPILL_BATCH = 2000  # views pickled per spill record


@lru_cache(maxsize=4096)
def _chunks_digest(chunks: tuple[str, ...]) -> int:
    return digest64("\x1f".join(chunks))


def view_digest(view: TaskView) -> int:
    """The identity of a task view, and the order of the fit sample: a hash of its content."""
    return digest64("\x1e".join((format(_chunks_digest(view.system_chunks), "x"), view.tools, view.turn,
                                 view.answer, view.kind, view.tool_name or "", format(view.instructions, "x"))))


class Interner:
    """Small integer ids for repeated values (models, tool names, signatures), first seen first."""

    def __init__(self) -> None:
        self.values: list = []
        self._ids: dict = {}

    def __call__(self, value) -> int:
        found = self._ids.get(value)
        if found is None:
            found = self._ids[value] = len(self.values)
            self.values.append(value)
        return found


class CallTable:
    """Columns of the calls added so far (``call_*`` per call, ``row_*`` per distinct view); ``finish()`` turns
    them into numpy arrays."""

    def __init__(self, *, by: str, task_tag_key: str | None, prices: PricesConfig,
                 spill_dir: str | Path | None = None) -> None:
        self.by, self.task_tag_key, self.prices = by, task_tag_key, prices
        self.groups = Interner()  # (GROUP, agent or None) | (TAG, tag)
        self.models = Interner()
        self.tools = Interner()
        self.signatures = Interner()  # request_signature hex digests
        # Per call.
        self.call_row, self.call_model, self.call_sig = array("i"), array("i"), array("i")
        self.prompt, self.completion, self.cost = array("q"), array("q"), array("d")  # tokens: -1 when unknown
        # Per row (distinct group + view).
        self.row_group, self.row_tool, self.row_kind = array("i"), array("i"), array("b")
        self.row_hash, self.row_answer, self.row_system, self.row_turn = array("Q"), array("Q"), array("Q"), array("Q")
        # Per row: its instruction text's id in ``templates`` and its tool list (interned): what forms tasks first.
        self.row_instr, self.row_tools = array("i"), array("i")
        self.templates = TemplateMiner()
        self.tool_lists = Interner()
        self._row_of: dict[int, int] | None = {}
        self._spill = tempfile.TemporaryFile(dir=spill_dir, prefix="slmigrate-views-")
        self._pending: list[tuple[TaskView, str]] = []

    def __enter__(self) -> CallTable:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._spill.close()

    def add(self, call: CallRecord) -> None:
        view = task_view(call)
        tag = task_tag(call, self.task_tag_key)
        if tag is not None:
            group = self.groups((TAG, tag))
        else:
            group = self.groups((GROUP, (call.agent or UNKNOWN_AGENT) if self.by == "agent" else None))
        content = view_digest(view)
        key = group << 64 | content
        row = self._row_of.get(key)
        if row is None:
            row = self._row_of[key] = len(self.row_hash)
            self.row_group.append(group)
            self.row_hash.append(content)
            self.row_kind.append(OUTPUT_KINDS.index(view.kind))
            self.row_tool.append(self.tools(view.tool_name) if view.tool_name else -1)
            self.row_answer.append(digest64(view.answer))
            self.row_system.append(_chunks_digest(view.system_chunks))
            self.row_tools.append(self.tool_lists(view.tools))
            self.row_instr.append(self.templates.add(view.instructions, self.row_tools[-1],
                                                     lambda: instruction_text(call.messages)))
            self.row_turn.append(digest64(view.turn))
            self._pending.append((view, call.id))
            if len(self._pending) >= _SPILL_BATCH:
                self._flush()
        self.call_row.append(row)
        self.call_model.append(self.models(call.model or "unknown"))
        self.call_sig.append(self.signatures(request_signature(call, self.by)))
        self.prompt.append(-1 if call.prompt_tokens is None else call.prompt_tokens)
        self.completion.append(-1 if call.completion_tokens is None else call.completion_tokens)
        self.cost.append(self.prices.cost(call.model, call.prompt_tokens, call.completion_tokens))

    def _flush(self) -> None:
        if self._pending:
            pickle.dump(self._pending, self._spill, protocol=pickle.HIGHEST_PROTOCOL)
            self._pending = []

    def finish(self) -> CallTable:
        """No more calls: write the last views and expose the columns as numpy arrays (no copies)."""
        self._flush()
        self._row_of = None  # only needed while adding; a dict entry per distinct view
        for name in ("call_row", "call_model", "call_sig", "prompt", "completion", "cost", "row_group", "row_tool",
                     "row_kind", "row_hash", "row_answer", "row_system", "row_turn", "row_instr", "row_tools"):
            column = getattr(self, name)
            setattr(self, name, np.frombuffer(column, dtype=column.typecode) if len(column) else
                    np.zeros(0, dtype=column.typecode))
        return self

    def groups_are_tags(self) -> np.ndarray:
        """Per group: whether it is a task tag (not clustered)."""
        return np.array([kind == TAG for kind, _ in self.groups.values], dtype=bool)

    @property
    def n_calls(self) -> int:
        return len(self.call_row)

    @property
    def n_rows(self) -> int:
        return len(self.row_hash)

    def iter_rows(self, chunk: int = 20_000) -> Iterator[tuple[int, list[TaskView], list[str]]]:
        """(first row, views, first call ids) for every row in order, ``chunk`` rows at a time."""
        self._spill.seek(0)
        start, views, ids = 0, [], []
        while True:
            try:
                batch = pickle.load(self._spill)
            except EOFError:
                break
            for view, first in batch:
                views.append(view)
                ids.append(first)
            if len(views) >= chunk:
                yield start, views, ids
                start += len(views)
                views, ids = [], []
        if views:
            yield start, views, ids

    def views_of(self, rows: np.ndarray) -> dict[int, TaskView]:
        """The views of a few rows (the fit sample), in one read of the spill file."""
        wanted = np.zeros(self.n_rows, dtype=bool)
        wanted[rows] = True
        out = {}
        for start, views, _ in self.iter_rows():
            for j in np.flatnonzero(wanted[start:start + len(views)]).tolist():
                out[start + j] = views[j]
        return out
