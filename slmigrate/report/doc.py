"""A tiny document builder that writes the HTML page and its Markdown twin from the same calls.

Sections add paragraphs, tables, KPI tiles and charts; each element knows how to render itself both ways, so
the two outputs never drift apart. Everything user-provided is escaped in both: cluster labels, model names and
task views come from logs. In Markdown that means HTML-escaping ``<``, ``>`` and ``&`` (a viewer that renders
inline HTML would otherwise run a logged ``<script>`` or ``<img onerror>``) and backslash-escaping ``[``, ``]``
and ``\\`` so logged text cannot form a link or an image.
"""

from __future__ import annotations

import base64
import html
import re
from dataclasses import dataclass, field
from typing import Any

from slmigrate.report.style import CSS


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


_MD_LINK_CHARS = re.compile(r"([\\\[\]])")


def md_text(value: Any) -> str:
    """Logged text made inert in Markdown: no HTML, no link or image syntax; it reads the same."""
    return _MD_LINK_CHARS.sub(r"\\\1", html.escape(str(value), quote=False))


def md_cell(value: Any) -> str:
    return md_text(value).replace("|", "\\|").replace("\n", " ")


@dataclass
class Cell:
    """A table cell with separate HTML (may hold markup) and Markdown text."""

    html: str
    md: str
    numeric: bool = False


def pill(text: str, tone: str) -> Cell:
    return Cell(f'<span class="pill {tone}">{esc(text)}</span>', f"**{md_cell(text)}**")


def num(value: Any, fmt: str = "{:,}") -> Cell:
    text = "–" if value is None else fmt.format(value)
    return Cell(esc(text), text, numeric=True)


@dataclass
class Chart:
    name: str
    caption: str
    svg: str | None = None
    png: bytes | None = None


@dataclass
class Section:
    id: str
    title: str
    lead: str = ""
    present: bool = True
    html: list[str] = field(default_factory=list)
    md: list[str] = field(default_factory=list)
    charts: list[Chart] = field(default_factory=list)

    def para(self, text: str, *, small: bool = False) -> None:
        self.html.append(f'<p class="{"small" if small else ""}">{esc(text)}</p>')
        self.md.append(md_text(text))

    def bullets(self, items: list[str]) -> None:
        if items:
            self.html.append('<ul class="reasons">' + "".join(f"<li>{esc(i)}</li>" for i in items) + "</ul>")
            self.md.append("\n".join(f"- {md_cell(i)}" for i in items))

    def kpis(self, tiles: list[tuple[str, str]]) -> None:
        self.html.append('<div class="kpis">' + "".join(
            f'<div class="kpi"><div class="v">{esc(v)}</div><div class="k">{esc(k)}</div></div>' for k, v in tiles
        ) + "</div>")
        self.md.append("\n".join(f"- **{md_cell(k)}**: {md_cell(v)}" for k, v in tiles))

    def table(self, headers: list[str], rows: list[list[Any]], *, caption: str | None = None) -> None:
        cells = [[c if isinstance(c, Cell) else Cell(esc(c), md_cell(c), isinstance(c, (int, float)))
                  for c in row] for row in rows]
        numeric = [bool(cells) and all(r[i].numeric for r in cells if i < len(r)) for i in range(len(headers))]
        head = "".join(f'<th class="{"n" if numeric[i] else ""}">{esc(h)}</th>' for i, h in enumerate(headers))
        body = "".join(
            "<tr>" + "".join(f'<td class="{"n" if c.numeric else ""}">{c.html}</td>' for c in row) + "</tr>"
            for row in cells
        )
        cap = f'<p class="small">{esc(caption)}</p>' if caption else ""
        self.html.append(f"{cap}<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        lines = ["| " + " | ".join(md_cell(h) for h in headers) + " |",
                 "|" + "|".join("---:" if n else "---" for n in numeric) + "|"]
        lines += ["| " + " | ".join(c.md for c in row) + " |" for row in cells]
        self.md.append((f"*{md_cell(caption)}*\n\n" if caption else "") + "\n".join(lines))

    def details(self, items: list[tuple[str, str]], title: str) -> None:
        """Collapsed examples (summary, body): HTML <details> needs no script; Markdown gets a list."""
        if not items:
            return
        self.html.append(f'<p class="small">{esc(title)}</p>' + "".join(
            f"<details><summary>{esc(k)}</summary><pre>{esc(v)}</pre></details>" for k, v in items))
        # Escaped text, not a code span: a logged backtick would close the span and let the rest render.
        self.md.append(f"*{md_cell(title)}*\n\n" + "\n".join(f"- **{md_cell(k)}**: {md_cell(v[:300])}"
                                                               for k, v in items))

    def columns_start(self) -> None:
        """Put what follows side by side (HTML only), until columns_end()."""
        self.html.append('<div class="grid2">')

    def columns_end(self) -> None:
        self.html.append("</div>")

    def chart(self, chart: Chart) -> None:
        self.charts.append(chart)
        if chart.svg is not None:
            body = chart.svg
        else:
            data = base64.b64encode(chart.png or b"").decode("ascii")
            width = int.from_bytes((chart.png or b"")[16:20], "big")  # PNG IHDR: natural width in pixels
            style = f' style="max-width:{width}px"' if width else ""
            body = f'<img alt="{esc(chart.caption)}"{style} src="data:image/png;base64,{data}">'
        self.html.append(f'<figure class="chart" data-chart="{esc(chart.name)}">{body}'
                         f"<figcaption>{esc(chart.caption)}</figcaption></figure>")
        ext = "svg" if chart.svg is not None else "png"
        self.md.append(f"![{md_cell(chart.caption)}](CHARTS/{chart.name}.{ext})")

    def missing(self, what: str, command: str) -> None:
        """The stage that fills this section has not run: say so and name the command."""
        if not self.html:  # a section with some content and one missing part still counts as present
            self.present = False
        self.html.append(f'<div class="missing">{esc(what)}: not run yet: run <code>{esc(command)}</code></div>')
        self.md.append(f"> {md_cell(what)}: not run yet: run `{command}`")


def render_html(title: str, subtitle: str, sections: list[Section], footer: str) -> str:
    toc = "".join(f'<a href="#{esc(s.id)}">{esc(s.title)}</a>' for s in sections)
    body = "".join(
        f'<section id="{esc(s.id)}" data-present="{str(s.present).lower()}"><h2>{esc(s.title)}</h2>'
        + (f'<p class="lead">{esc(s.lead)}</p>' if s.lead else "") + "".join(s.html) + "</section>"
        for s in sections
    )
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{esc(title)}</title><style>{CSS}</style></head><body>"
        f'<header class="top"><h1>{esc(title)}</h1><p>{esc(subtitle)}</p></header>'
        f'<nav class="toc">{toc}</nav><main>{body}</main><footer>{esc(footer)}</footer></body></html>\n'
    )


def render_markdown(title: str, subtitle: str, sections: list[Section], footer: str, charts_dir: str) -> str:
    parts = [f"# {md_cell(title)}", md_text(subtitle)]
    for s in sections:
        parts.append(f"## {md_cell(s.title)}")
        if s.lead:
            parts.append(f"*{md_cell(s.lead)}*")
        parts += [m.replace("](CHARTS/", f"]({charts_dir}/") for m in s.md]
    parts.append(f"---\n{md_text(footer)}")
    return "\n\n".join(parts) + "\n"
