"""The one progress bar (slmigrate.progress.Bars) the CLI draws with, and the protocol stages report through."""

from __future__ import annotations

import io

from rich.console import Console

from slmigrate.progress import Bars, counter


def _console() -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, force_terminal=False, width=160), out


def test_a_report_draws_one_bar_per_name_with_its_fields():
    console, out = _console()
    with Bars(console=console, transient=False, fields={"loss": "loss {}"}) as bars:
        bars("train", 0, 48)
        bars("train", 12, 48, loss="0.5000")
        bars("eval", 3, 4)
    text = out.getvalue()
    assert "train" in text and "12/48" in text and "loss 0.5000" in text
    assert "eval" in text and "3/4" in text


def test_a_pass_that_stops_early_ends_full_where_it_stopped():
    console, out = _console()
    with Bars(console=console, transient=False) as bars:
        bars("finetune", 30, 48)
        bars.end("finetune", 30, "stopped early: patience")
    text = out.getvalue()
    assert "30/30" in text and "finetune (stopped early: patience)" in text and "/48" not in text


def test_disabled_or_silent_passes_draw_nothing():
    console, out = _console()
    with Bars(False, console=console, transient=False) as bars:
        bars("x", 1, 2)
        bars.end("x", 1, "done")
    with Bars(console=console, transient=False):
        pass  # nothing reported: no bar is started
    assert out.getvalue() == ""


def test_a_report_with_a_note_ends_the_pass_as_end_does():
    """The protocol's way to say "stopped early" (a stage has no ``Bars.end`` to call)."""
    console, out = _console()
    with Bars(console=console, transient=False) as bars:
        bars("finetune", 30, 48)
        bars("finetune", 30, 30, note="stopped early: patience")
        bars("eval", 2, 2, note="nothing left")  # a pass whose first report is its last
    text = out.getvalue()
    assert "finetune (stopped early: patience)" in text and "30/30" in text and "/48" not in text
    assert "eval (nothing left)" in text


def test_counter_reports_running_counts_and_nothing_without_a_callback():
    seen = []
    advance = counter(lambda what, done, total, **fields: seen.append((what, done, total)), "embedding", 10)
    advance(4)
    advance(6)
    assert seen == [("embedding", 0, 10), ("embedding", 4, 10), ("embedding", 10, 10)]
    seen.clear()
    counter(lambda *a, **k: seen.append(a), "few", 10, min_total=100)(10)  # too short a pass to report
    counter(None, "none", 10)(10)
    assert seen == []
