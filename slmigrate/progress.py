"""The one progress protocol, and the one progress bar that draws it.

Library code reports progress through a callback and never draws: every stage takes
``progress: Progress | None = None`` and calls ``progress(what, done, total, **fields)`` as work advances
(``what`` names the phase, file or item; ``done`` counts up to ``total``; ``fields`` are extra values a
drawer may show, e.g. fine-tuning's ``loss=`` and ``tps=``). A callback must accept (and may ignore) fields.

A pass that ends before its total (fine-tuning's early stopping) says so with one last report at
``total == done`` and a ``note``: ``progress(what, done, done, note="stopped early: patience")``; ``NOTE`` names
that field. Inside one pass, helpers that only know "n more items finished" take an ``Advance``; ``counter``
turns a ``Progress`` into one. Messages that are no count (a stage starting, a model being pulled) go through
``Say``.

``Bars`` is the only code that draws, and only slmigrate/cli/ builds one: rich bars on stderr, one per
``what``, started at the first report so a pass that reports nothing draws nothing. Calling a ``Bars`` is the
``Progress`` protocol, so the CLI hands one to a stage as its callback::

    with Bars(not json_out, console=err_console) as bars:
        result = stage(ws, cfg, progress=bars)

rich is imported only when a bar is actually shown: a library call with ``progress=None`` never imports it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol

NOTE = "note"  # the field of a pass's last report when it ended before its total (see the module docstring)


class Progress(Protocol):
    """``progress(what, done, total, **fields)``: ``what`` has ``done`` of ``total`` items finished."""

    def __call__(self, what: str, done: int, total: int, /, **fields: Any) -> None: ...


Advance = Callable[[int], None]  # n more items of the current pass are done
Say = Callable[[str], None]  # one line per event


def silent(what: str, done: int, total: int, /, **fields: Any) -> None:
    """The ``Progress`` that ignores every report: ``report = progress or silent`` saves a check per report."""


def counter(progress: Progress | None, what: str, total: int, *, min_total: int = 1) -> Advance:
    """An ``Advance`` for one pass over ``total`` items that reports ``what``'s running count to ``progress``;
    it reports nothing without a callback or when the pass is shorter than ``min_total`` (no bar flickers by).
    The pass's start (0 of ``total``) is reported at once."""
    if progress is None or total < max(min_total, 1):
        return _ignore
    done = 0
    progress(what, 0, total)

    def advance(n: int) -> None:
        nonlocal done
        done += n
        progress(what, done, total)

    return advance


def _ignore(_n: int) -> None:
    return None


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

    def __call__(self, what: str, done: int, total: int, /, **fields: Any) -> None:
        if not self.enabled:
            return
        if NOTE in fields:
            self(what, done, total)  # a pass that ends at its first report still gets its bar
            self.end(what, done, str(fields[NOTE]))
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
