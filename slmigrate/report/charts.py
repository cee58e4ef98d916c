"""Charts for the report, drawn with matplotlib and returned as inline SVG text (no files, no network).

Every chart is a small function from plain numbers to an SVG string, so the report can embed it directly and a
test can check it is there. One palette and one size family keep the page calm.
"""

from __future__ import annotations

import io
import re
from collections.abc import Callable, Sequence

PALETTE = ("#2563eb", "#f59e0b", "#10b981", "#ef4444", "#8b5cf6", "#06b6d4", "#ec4899", "#84cc16", "#64748b",
           "#f97316")
MUTED = "#94a3b8"
INK = "#1e293b"


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # never a display; the report is rendered headless
    import matplotlib.pyplot as plt

    plt.rcParams.update({
        "font.size": 9, "axes.edgecolor": "#cbd5e1", "axes.labelcolor": INK, "xtick.color": INK,
        "ytick.color": INK, "axes.spines.top": False, "axes.spines.right": False, "svg.fonttype": "none",
        "font.family": "sans-serif", "axes.titlesize": 10, "axes.titleweight": "bold",
    })
    return plt


def _svg(fig) -> str:
    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight", metadata={"Date": None})
    _plt().close(fig)
    text = buf.getvalue()
    # Drop the XML prolog and DOCTYPE: inside HTML the <svg> element stands on its own.
    text = text[text.index("<svg"):]
    # Let CSS shrink the chart to a narrow column, but never blow it up past its drawn size (fonts would grow).
    return re.sub(r'(<svg[^>]*?)\swidth="([^"]+)"\sheight="[^"]+"', r'\1 style="max-width:\2"', text, count=1)


def _short(label: str, width: int = 34) -> str:
    return label if len(label) <= width else label[: width - 1] + "…"


def barh(labels: Sequence[str], values: Sequence[float], *, xlabel: str, fmt: str | Callable[[float], str] = "{:,.0f}",
         colors: Sequence[str] | None = None) -> str:
    """Horizontal bars, largest first, each with its value written at its end."""
    plt = _plt()
    n = len(labels)
    fig, ax = plt.subplots(figsize=(5.0, 0.38 * n + 0.8))
    ys = list(range(n))[::-1]
    ax.barh(ys, values, color=list(colors) if colors else PALETTE[0], height=0.62)
    ax.set_yticks(ys, [_short(str(x)) for x in labels])
    ax.set_xlabel(xlabel)
    top = max([float(v) for v in values] + [0.0]) or 1.0
    for y, v in zip(ys, values):
        text = fmt(v) if callable(fmt) else fmt.format(v)
        ax.text(float(v) + top * 0.01, y, text, va="center", fontsize=8, color=INK)
    ax.set_xlim(0, top * 1.18)
    return _svg(fig)


def lines(series: dict[str, tuple[Sequence[float], Sequence[float]]], *, xlabel: str, ylabel: str,
          title: str | None = None) -> str:
    """One line per named series of (x, y); used for training and validation loss."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.6, 2.7))
    for i, (name, (xs, ys)) in enumerate(series.items()):
        if len(xs):
            ax.plot(xs, ys, color=PALETTE[i % len(PALETTE)], lw=1.6, marker="o" if len(xs) < 12 else None,
                    ms=3, label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(_short(title, 48), loc="left")
    if len(series) > 1:
        ax.legend(fontsize=7.5, frameon=False)
    ax.grid(axis="y", color="#e2e8f0", lw=0.6)
    return _svg(fig)


def stacked_share(parts: Sequence[tuple[str, float]], *, title: str) -> str:
    """One 100% bar split into named parts (e.g. cost that can move vs cost that stays)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 0.9))
    total = sum(v for _, v in parts) or 1.0
    left = 0.0
    for i, (name, value) in enumerate(parts):
        share = value / total
        color = (PALETTE[2], MUTED, PALETTE[1], PALETTE[3])[i % 4]
        ax.barh([0], [share], left=left, color=color, height=0.6, label=f"{name} ({share:.0%})")
        if share > 0.07:
            ax.text(left + share / 2, 0, f"{share:.0%}", ha="center", va="center", color="white",
                    fontsize=9, fontweight="bold")
        left += share
    ax.set_xlim(0, 1)
    ax.set_yticks([])
    ax.set_xticks([])
    for side in ("left", "bottom"):
        ax.spines[side].set_visible(False)
    ax.set_title(title, loc="left")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.08), ncol=len(parts), fontsize=8, frameon=False)
    return _svg(fig)


def grouped_bars(labels: Sequence[str], series: dict[str, Sequence[float | None]], *, xlabel: str,
                 threshold: float | None = None, colors: dict[str, str] | None = None,
                 intervals: dict[str, Sequence[tuple[float, float] | None]] | None = None) -> str:
    """One group of horizontal bars per label, one bar per named series (model variants, or estimated vs
    measured); a missing value is simply not drawn. ``intervals``: per series, (low, high) whiskers."""
    plt = _plt()
    n, k = len(labels), max(len(series), 1)
    fig, ax = plt.subplots(figsize=(6.4, (0.22 * k + 0.25) * n + 1.0))
    ys = list(range(n))[::-1]
    h = 0.8 / k
    colors = colors or {"base": MUTED, "icl": PALETTE[1], "finetuned": PALETTE[0]}
    for i, (name, values) in enumerate(series.items()):
        offset = (k - 1) / 2 * h - i * h
        pts = [(y + offset, v) for y, v in zip(ys, values) if v is not None]
        ax.barh([p[0] for p in pts], [p[1] for p in pts], height=h * 0.9,
                color=colors.get(name, PALETTE[(i + 2) % len(PALETTE)]), label=name)
        spans = [(y + offset, v, iv) for y, v, iv in zip(ys, values, (intervals or {}).get(name) or [None] * n)
                 if v is not None and iv is not None]
        for y, v, (low, high) in spans:
            ax.plot([low, high], [y, y], color=INK, lw=0.9)
        ends = {y + offset: iv[1] for y, v, iv in zip(ys, values, (intervals or {}).get(name) or [None] * n)
                if v is not None and iv is not None}
        for y, v in pts:
            # The value's label sits past its whisker, so the two never overlap.
            ax.text(max(v, ends.get(y, v)) + 0.01, y, f"{v:.2f}", va="center", fontsize=7, color=INK)
    if threshold is not None:
        ax.axvline(threshold, color=PALETTE[3], lw=1, ls="--", label=f"threshold {threshold:g}")
    ax.set_yticks(ys, [_short(str(x)) for x in labels])
    ax.set_xlim(0, 1.12)
    ax.set_xlabel(xlabel)
    ax.legend(loc="lower right", fontsize=7.5, frameon=False)
    return _svg(fig)
