"""The one table renderer: a :class:`Table` (strings) as Markdown or LaTeX, and the cell formats.

Scores are shown x100 with one decimal as ``mean ± SE`` (:func:`fmt_score`; SE per
:func:`tasks.results.stats.mean_se`); a single value shows the mean only.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Table:
    """A titled 2-D table of strings: ``header`` (column labels), ``rows`` (first cell = row label)."""

    title: str
    header: list[str]
    rows: list[list[str]]
    section: str = ""
    notes: list[str] = field(default_factory=list)


# --- cells --------------------------------------------------------------------------------------
def fmt_score(mean: float | None, se: float | None, latex: bool = False, scale: float = 100.0,
              digits: int = 1) -> str:
    """``"66.7 ± 0.4"`` (scores x100, one decimal); just the mean when SE is undefined; ``"—"`` without data."""
    if mean is None:
        return "--" if latex else "—"
    text = f"{scale * mean:.{digits}f}"
    if se is not None:
        text += (" $\\pm$ " if latex else " ± ") + f"{scale * se:.{digits}f}"
    return text


def fmt_lr(lr: Any) -> str:
    try:
        return f"{float(lr):g}"
    except (TypeError, ValueError):
        return str(lr)


def fmt_num(x: float | None, digits: int) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


# --- Markdown -----------------------------------------------------------------------------------
def _md_escape(s: Any) -> str:
    return str(s).replace("|", "\\|")


def md_table(header: Sequence[str], rows: Iterable[Sequence[str]], align: str | None = None) -> list[str]:
    """Markdown table lines; ``align``: one letter per column, ``l`` (left) or ``r`` (right; default
    for every column but the first)."""
    align = align or ("l" + "r" * (len(header) - 1))
    lines = ["| " + " | ".join(_md_escape(h) for h in header) + " |",
             "|" + "|".join("---" if a == "l" else "---:" for a in align) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(_md_escape(c) for c in row) + " |")
    return lines


def table_lines(t: Table) -> list[str]:
    """The table and its notes (no title)."""
    return md_table(t.header, t.rows) + [""] + [f"{n}" for n in t.notes]


def render_markdown(table: Table) -> str:
    """``#### title``, the table, its notes."""
    return "\n".join([f"#### {table.title}", ""] + table_lines(table)).rstrip() + "\n"


# --- LaTeX --------------------------------------------------------------------------------------
def tex_escape(s: Any) -> str:
    s = str(s)
    if "$" in s:  # already LaTeX (e.g. "88.1 $\pm$ 0.3")
        return s
    for a, b in (("\\", "\\textbackslash{}"), ("&", "\\&"), ("%", "\\%"), ("_", "\\_"), ("#", "\\#")):
        s = s.replace(a, b)
    return s


def render_latex(table: Table) -> str:
    n = len(table.header) - 1
    lines = [f"% {table.title}", "\\begin{center}", "\\adjustbox{max width=\\textwidth}{%",
             "\\begin{tabular}{l" + "c" * n + "}", "\\toprule",
             " & ".join("\\textbf{" + tex_escape(h) + "}" for h in table.header) + " \\\\", "\\midrule"]
    for row in table.rows:
        lines.append(" & ".join(tex_escape(c) for c in row) + " \\\\")
    lines += ["\\bottomrule", "\\end{tabular}}", "\\end{center}"]
    return "\n".join(lines) + "\n"


def render_sections(sections: Sequence[tuple[str, list[Table]]], latex: bool) -> str:
    """Headed groups of tables: ``### heading`` + Markdown tables, or ``\\subsection`` + LaTeX tables."""
    out = []
    for heading, tables in sections:
        if latex:
            out.append(f"\\subsection{{{tex_escape(heading)}}}\n")
            for t in tables:
                out.append(f"\\subsubsection{{{tex_escape(t.section or t.title)}}}\n")
                out.append(render_latex(t))
        else:
            out.append(f"### {heading}\n")
            out += [render_markdown(t) for t in tables]
    return "\n".join(out)
