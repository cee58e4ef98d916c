"""The one progress bar (slmigrate.progress.Bars): what the CLI and the stages draw through."""

from __future__ import annotations

import io

from rich.console import Console

from slmigrate.progress import Bars, progress_bar


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


def test_progress_bar_counts_what_advance_reports():
    shown = progress_bar(True, "embedding", 10)
    with shown as advance:
        advance(4)
        advance(6)
    assert shown.bars.enabled and shown.done == 10
    assert not progress_bar(True, "few", 10, min_total=100).bars.enabled  # too short a pass for a bar
