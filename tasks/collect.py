"""Collect results of a sweep into tables: ``python -m tasks.collect --input_dir <dir>``.

Every complete run folder below ``<dir>`` (any depth: Hydra multirun folders nest; complete = it
holds a ``done`` file, other folders are ignored and counted) is read: each line of its
``results.jsonl`` (DomainBed) and its ``summary.json`` when that is a GLUE run. Each *reader* claims
the records of its benchmark and turns them into :class:`Table` s, which are printed as Markdown
and/or LaTeX and saved as ``<dir>/results.md`` / ``<dir>/results.tex``.

Readers: ``domainbed`` (DomainBed's collect_results: per dataset and model-selection method, one
column per test domain, mean ± SE over trial seeds), ``glue`` (the paper's GLUE table: best dev
epoch, mean ± SE over seeds, best learning rate; see :mod:`tasks.glue.collect`). To add a benchmark,
write a class with ``name``, ``claims(record) -> bool`` and ``tables(records, latex) -> list[(heading,
[Table])]`` (optionally ``configure(input_dir)``, called first) and append it to ``READERS``.

``python -m tasks.collect --study docs/results --output docs/RESULTS.md`` writes the study report
instead (:mod:`tasks.study_report`).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any, Protocol

from tasks.domainbed.reporting import Table, all_tables, is_domainbed_record
from tasks.domainbed.selection import Record, load_records
from tasks.glue.collect import GlueReader
from tasks.results import load_summaries


class Reader(Protocol):
    name: str

    def claims(self, record: Record) -> bool: ...

    def tables(self, records: list[Record], latex: bool) -> list[tuple[str, list[Table]]]: ...


class DomainBedReader:
    name = "domainbed"

    def claims(self, record: Record) -> bool:
        return is_domainbed_record(record)

    def tables(self, records: list[Record], latex: bool) -> list[tuple[str, list[Table]]]:
        return [(f"Model selection: {m.name}", ts) for m, ts in all_tables(records, latex)]


READERS: list[Any] = [GlueReader(), DomainBedReader()]


# --- rendering ---------------------------------------------------------------------------------
def _md_escape(s: str) -> str:
    return str(s).replace("|", "\\|")


def render_markdown(table: Table) -> str:
    lines = [f"#### {table.title}", ""]
    lines.append("| " + " | ".join(_md_escape(h) for h in table.header) + " |")
    lines.append("|" + "|".join(["---"] + ["---:"] * (len(table.header) - 1)) + "|")
    for row in table.rows:
        lines.append("| " + " | ".join(_md_escape(c) for c in row) + " |")
    lines += [""] + [f"{n}" for n in table.notes]
    return "\n".join(lines).rstrip() + "\n"


def _tex_escape(s: str) -> str:
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
             " & ".join("\\textbf{" + _tex_escape(h) + "}" for h in table.header) + " \\\\", "\\midrule"]
    for row in table.rows:
        lines.append(" & ".join(_tex_escape(c) for c in row) + " \\\\")
    lines += ["\\bottomrule", "\\end{tabular}}", "\\end{center}"]
    return "\n".join(lines) + "\n"


def render(sections: Sequence[tuple[str, list[Table]]], latex: bool) -> str:
    out = []
    for heading, tables in sections:
        if latex:
            out.append(f"\\subsection{{{_tex_escape(heading)}}}\n")
            for t in tables:
                out.append(f"\\subsubsection{{{_tex_escape(t.section or t.title)}}}\n")
                out.append(render_latex(t))
        else:
            out.append(f"### {heading}\n")
            out += [render_markdown(t) for t in tables]
    return "\n".join(out)


def collect(input_dir: str, fmt: str = "both", save: bool = True) -> str:
    """Read, select and render; returns the printed text."""
    if not os.path.isdir(input_dir):
        raise SystemExit(f"--input_dir {input_dir!r} is not a folder")
    ignored: list[str] = []
    records = load_records(input_dir, ignored=ignored)
    glue_runs, glue_ignored = load_summaries(input_dir, benchmark="glue")
    records += glue_runs
    ignored = sorted(set(ignored) | set(glue_ignored))
    for d in ignored:
        print(f"ignored (no done file): {d}", file=sys.stderr)
    skipped = f"Ignored incomplete runs (no `done` file): {len(ignored)}\n"
    if not records:
        raise SystemExit(f"no results.jsonl records or GLUE summary.json found in complete runs below "
                         f"{input_dir!r} ({len(ignored)} incomplete run folders without a done file ignored)")
    texts: dict[str, list[str]] = {"markdown": [], "latex": []}
    for reader in READERS:
        if hasattr(reader, "configure"):  # optional: a reader may read side files (e.g. a meta.json)
            reader.configure(input_dir)
        mine = [r for r in records if reader.claims(r)]
        if not mine:
            continue
        for kind in ("markdown", "latex"):
            if fmt in (kind, "both"):
                head = ("" if texts[kind] else skipped) + f"Total records ({reader.name}): {len(mine)}\n"
                texts[kind].append(head + "\n" + render(reader.tables(mine, latex=kind == "latex"), kind == "latex"))
    if not texts["markdown"] and not texts["latex"]:
        raise SystemExit(f"none of the {len(records)} records below {input_dir!r} belongs to a known benchmark "
                         f"({', '.join(r.name for r in READERS)})")
    md, tex = "\n".join(texts["markdown"]), "\n".join(texts["latex"])
    if save:
        if md:
            with open(os.path.join(input_dir, "results.md"), "w") as f:
                f.write(md)
        if tex:
            with open(os.path.join(input_dir, "results.tex"), "w") as f:
                f.write(tex)
    return "\n".join(t for t in (md, tex) if t)


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Print result tables of a sweep (GLUE; DomainBed collect_results).")
    p.add_argument("--input_dir", help="folder searched recursively for complete runs (results.jsonl, summary.json)")
    p.add_argument("--format", choices=("markdown", "latex", "both"), default="both")
    p.add_argument("--latex", action="store_true", help="LaTeX only (same as --format latex)")
    p.add_argument("--no-save", action="store_true", help="do not write results.md / results.tex")
    p.add_argument("--study", metavar="RESULTS_DIR",
                   help="write the study report from RESULTS_DIR (e.g. docs/results) instead; see tasks.study_report")
    p.add_argument("--output", default=None, help="with --study: the report file (default <RESULTS_DIR>/../RESULTS.md)")
    p.add_argument("--plots", default=None, help="with --study: the plot folder (default <output folder>/plots)")
    a = p.parse_args(argv)
    if a.study:
        from tasks import study_report

        study_report.main([a.study] + (["--output", a.output] if a.output else [])
                          + (["--plots", a.plots] if a.plots else []))
        return
    if not a.input_dir:
        p.error("--input_dir is required (or --study RESULTS_DIR)")
    text = collect(a.input_dir, "latex" if a.latex else a.format, save=not a.no_save)
    sys.stdout.write(text)


if __name__ == "__main__":
    main()
