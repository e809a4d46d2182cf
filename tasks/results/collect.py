"""Collect results of a sweep into tables: ``python -m tasks.collect --input_dir <dir>``
(= ``python -m tasks.results``).

Every complete, non-debug run folder below ``<dir>`` (any depth: Hydra multirun folders nest) is
read once (:func:`tasks.results.records.scan`); incomplete folders (no ``done``) and debug runs are
left out, counted and listed on stderr. Each *reader* takes the runs of its benchmark and turns them
into :class:`~tasks.results.table.Table` s, printed as Markdown and/or LaTeX
(:mod:`tasks.results.table`) and saved as ``<dir>/results.md`` / ``<dir>/results.tex``.

Rows are keyed by method identity (the ``variant``, default ``moe.name``) plus every override that
varies between the runs of a cell (:mod:`tasks.results.grouping`): a β × λ_min × seed grid gives
one row per (β, λ_min); each cell shows its number of seeds ``n``. Two folders with the same full
key -- which includes every swept key: the seeds, the learning rate, ``hparams_seed`` -- are logged as a
warning naming them (the first is kept). Runs that dropped batches (``callbacks.numerics.on_fault=skip``)
are left out and listed unless ``--include-skipped``.

Readers: ``domainbed`` (DomainBed's collect_results: per dataset and model-selection method, one
column per test domain, mean ± SE over trial seeds; :mod:`tasks.results.domainbed`), ``glue`` (the
paper's GLUE table: best dev epoch, mean ± SE over seeds, best learning rate;
:mod:`tasks.results.glue`). To add a benchmark, write a class with ``name``,
``prepare(runs) -> items`` and ``tables(items, latex) -> list[(heading, [Table])]`` (optionally
``configure(input_dir)``, called first) and append it to ``READERS``.

``python -m tasks.collect --study docs/results --output docs/RESULTS.md`` writes the study report instead
(:mod:`tasks.collect` adds that option; this package knows no study).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any, Protocol

from .domainbed import all_tables, domainbed_records
from .glue import GlueReader
from .records import RunRecord, scan
from .table import Table, render_sections


class Reader(Protocol):
    name: str

    def prepare(self, runs: list[RunRecord]) -> list[Any]: ...

    def tables(self, items: list[Any], latex: bool) -> list[tuple[str, list[Table]]]: ...


class DomainBedReader:
    name = "domainbed"

    def prepare(self, runs: list[RunRecord]) -> list[dict[str, Any]]:
        return domainbed_records(runs)

    def tables(self, records: list[dict[str, Any]], latex: bool) -> list[tuple[str, list[Table]]]:
        return [(f"Model selection: {m.name}", ts) for m, ts in all_tables(records, latex)]


READERS: list[Any] = [GlueReader(), DomainBedReader()]


def collect(input_dir: str, fmt: str = "both", save: bool = True, include_skipped: bool = False) -> str:
    """Read, select and render; returns the printed text. ``include_skipped``: count runs that dropped
    batches (``callbacks.numerics.on_fault=skip``), left out by default."""
    if not os.path.isdir(input_dir):
        raise SystemExit(f"--input_dir {input_dir!r} is not a folder")
    s = scan(input_dir, include_skipped=include_skipped)
    for d in s.incomplete:
        print(f"ignored (no done file, or an empty one): {os.path.join(input_dir, d)}", file=sys.stderr)
    for d in s.debug:
        print(f"skipped (debug run): {os.path.join(input_dir, d)}", file=sys.stderr)
    for d in s.skipped_batches:
        print(f"left out (batches skipped by callbacks.numerics.on_fault=skip; --include-skipped counts it): "
              f"{os.path.join(input_dir, d)}", file=sys.stderr)
    skipped = (f"Ignored incomplete runs (no `done` file): {len(s.incomplete)}\n"
               f"Skipped debug runs: {len(s.debug)}\n"
               + (f"Left out runs with skipped batches: {len(s.skipped_batches)}\n" if s.skipped_batches else ""))
    if not s.runs:
        raise SystemExit(f"no results.jsonl records or GLUE summary.json found in complete runs below "
                         f"{input_dir!r} ({len(s.incomplete)} incomplete run folders without a done file ignored, "
                         f"{len(s.debug)} debug runs skipped)")
    texts: dict[str, list[str]] = {"markdown": [], "latex": []}
    for reader in READERS:
        if hasattr(reader, "configure"):  # optional: a reader may read side files (e.g. a meta.json)
            reader.configure(input_dir)
        mine = reader.prepare(s.runs)
        if not mine:
            continue
        for kind in ("markdown", "latex"):
            if fmt in (kind, "both"):
                head = ("" if texts[kind] else skipped) + f"Total records ({reader.name}): {len(mine)}\n"
                texts[kind].append(head + "\n" + render_sections(reader.tables(mine, latex=kind == "latex"),
                                                                 kind == "latex"))
    if not texts["markdown"] and not texts["latex"]:
        raise SystemExit(f"none of the {len(s.runs)} runs below {input_dir!r} belongs to a known benchmark "
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


def parser() -> argparse.ArgumentParser:
    """The command line of the tables (:func:`main`; :mod:`tasks.collect` adds ``--study``)."""
    p = argparse.ArgumentParser(description="Print result tables of a sweep (GLUE; DomainBed collect_results).")
    p.add_argument("--input_dir", help="folder searched recursively for complete runs (results.jsonl, summary.json)")
    p.add_argument("--format", choices=("markdown", "latex", "both"), default="both")
    p.add_argument("--latex", action="store_true", help="LaTeX only (same as --format latex)")
    p.add_argument("--no-save", action="store_true", help="do not write results.md / results.tex")
    p.add_argument("--include-skipped", action="store_true",
                   help="count runs that dropped batches (callbacks.numerics.on_fault=skip); left out by default")
    return p


def main(argv: Sequence[str] | None = None) -> None:
    p = parser()
    run(p, p.parse_args(argv))


def run(p: argparse.ArgumentParser, a: argparse.Namespace, required: str = "--input_dir is required") -> None:
    """Print (and save) the tables the parsed command line ``a`` asks for; ``p.error(required)`` without
    ``--input_dir``."""
    if not a.input_dir:
        p.error(required)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    text = collect(a.input_dir, "latex" if a.latex else a.format, save=not a.no_save,
                   include_skipped=a.include_skipped)
    sys.stdout.write(text)


if __name__ == "__main__":
    main()
