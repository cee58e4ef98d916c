"""One rich progress bar on stderr for a long pass over ``total`` items, shared by the library's stages.

    with progress_bar(show, "embedding", len(texts)) as advance:
        ...; advance(len(batch))

rich is imported only when a bar is actually shown, so library callers that pass ``enabled=False`` (tests,
``--json`` runs) never pay for it.
"""

from __future__ import annotations

from collections.abc import Callable

Advance = Callable[[int], None]


class progress_bar:
    """``with`` gives ``advance(n)``; nothing is drawn unless ``enabled`` and ``total >= min_total``."""

    def __init__(self, enabled: bool, desc: str, total: int, min_total: int = 1) -> None:
        self.enabled = enabled and total >= max(min_total, 1)
        self.desc, self.total = desc, total
        self._bar = None

    def __enter__(self) -> Advance:
        if not self.enabled:
            return lambda n: None
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self._bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                             TimeRemainingColumn(), console=Console(stderr=True), transient=True)
        self._bar.start()
        task = self._bar.add_task(self.desc, total=self.total)
        return lambda n: self._bar.advance(task, n)

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()
