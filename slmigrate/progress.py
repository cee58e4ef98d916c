"""The one progress protocol, and the one progress bar that draws it.

Library code reports progress through a callback and never draws: a stage takes ``progress: Progress | None``
and calls ``progress(what, done, total)`` as work advances (``what`` names the phase, file or item; ``done``
counts up to ``total``). Inside one pass, helpers that only know "n more items finished" take an ``Advance``.
Messages that are no count (a stage starting, a model being pulled) go through ``Say``.

``Bars`` is the only code that draws: rich bars on stderr, one per ``what``, started at the first report so a
pass that reports nothing draws nothing. Calling a ``Bars`` is the ``Progress`` protocol, so the CLI hands one to
a stage as its callback. ``progress_bar`` is the short form for one pass with an ``Advance``::

    with progress_bar(show, "embedding", len(texts)) as advance:
        ...; advance(len(batch))

rich is imported only when a bar is actually shown, so library callers that pass ``enabled=False`` (tests,
``--json`` runs) never pay for it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

Progress = Callable[[str, int, int], None]  # (what, done, total)
Advance = Callable[[int], None]  # n more items of the current pass are done
Say = Callable[[str], None]  # one line per event


class Bars:
    """Rich progress bars on stderr, one per ``what``; calling it reports progress (the ``Progress`` protocol).

    ``fields`` adds a column per extra value a report may carry, e.g. ``{"loss": "loss {}"}`` shows
    ``bars(what, done, total, loss="0.1234")`` as ``loss 0.1234`` (``-`` until the first value). ``unit="bytes"``
    counts in kB/MB; ``transient`` bars vanish when done; ``label`` is the name column's rich template.
    """

    def __init__(self, enabled: bool = True, *, console: Any = None, transient: bool = True, unit: str = "items",
                 fields: Mapping[str, str] | None = None, label: str = "{task.description}") -> None:
        self.enabled, self.console, self.transient, self.unit = enabled, console, transient, unit
        self.fields, self.label = dict(fields or {}), label
        self._progress: Any = None
        self._tasks: dict[str, Any] = {}

    def __call__(self, what: str, done: int, total: int, **fields: Any) -> None:
        if not self.enabled:
            return
        if self._progress is None:
            self._start()
        if what not in self._tasks:
            self._tasks[what] = self._progress.add_task(what, total=total or None, completed=done,
                                                        **{name: "-" for name in self.fields})
        self._progress.update(self._tasks[what], completed=done, total=total or None,
                              **{k: str(v) for k, v in fields.items()})

    def end(self, what: str, done: int, note: str) -> None:
        """End ``what``'s bar at ``done`` (full), with ``note`` after its name: a pass that stopped early (e.g.
        fine-tuning's early stopping) must not look frozen part-way."""
        if self.enabled and what in self._tasks:
            self._progress.update(self._tasks[what], total=done, completed=done, description=f"{what} ({note})")

    def _start(self) -> None:
        from rich.console import Console
        from rich.progress import (BarColumn, DownloadColumn, MofNCompleteColumn, Progress, TextColumn,
                                   TimeElapsedColumn, TimeRemainingColumn)

        count = DownloadColumn() if self.unit == "bytes" else MofNCompleteColumn()
        extra = [TextColumn(template.format(f"{{task.fields[{name}]}}")) for name, template in self.fields.items()]
        self._progress = Progress(TextColumn(self.label), BarColumn(), count, *extra,
                                  TimeElapsedColumn(), TimeRemainingColumn(),
                                  console=self.console or Console(stderr=True), transient=self.transient)
        self._progress.start()
        self._tasks = {}

    def close(self) -> None:
        """Stop drawing; a later report starts new bars."""
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def __enter__(self) -> Bars:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class progress_bar:
    """``with`` gives ``advance(n)``; nothing is drawn unless ``enabled`` and ``total >= min_total``."""

    def __init__(self, enabled: bool, desc: str, total: int, min_total: int = 1) -> None:
        self.bars = Bars(enabled and total >= max(min_total, 1))
        self.desc, self.total, self.done = desc, total, 0

    def __enter__(self) -> Advance:
        self.bars(self.desc, 0, self.total)
        return self._advance

    def _advance(self, n: int) -> None:
        self.done += n
        self.bars(self.desc, self.done, self.total)

    def __exit__(self, *exc: object) -> None:
        self.bars.close()
