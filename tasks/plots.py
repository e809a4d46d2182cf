"""Redraw a run's routing plots from its records: ``python -m tasks.plots <run_dir> [...]``.

Reads ``summary.json`` through the one record reader (:func:`tasks.results.records.read_run`): its
``series`` is the routing-stability history the run drew its plots from, and its ``task``,
``method``, ``variant`` and ``seed`` title them, so the redraw writes the same files
(``<run>/plots/<name>.png``, or ``--out <dir>``; :mod:`callbacks.plots`) as the run did at its end.
"""

from __future__ import annotations

import argparse
import os
import sys

from callbacks.plots import PLOT_DPI, write_routing_plots
from tasks.results.records import read_run

INFO_KEYS = ("task", "method", "variant", "seed")


def redraw(run_dir: str, out_dir: str | None = None, dpi: int = PLOT_DPI) -> dict[str, str]:
    """Write the routing plots of the run in ``run_dir`` (default into ``<run_dir>/plots``); ``{name: path}``.

    A run without ``summary.json`` (killed before the end of fit) or whose summary has no routing
    series is an error naming the folder (its plots are those of its last validation)."""
    run = read_run(run_dir)
    if run.summary is None:
        raise FileNotFoundError(f"{run_dir}: no summary.json (a run writes it at the end of fit; a killed run "
                                "keeps the plots of its last validation in <run>/plots)")
    series = run.summary.get("series") or {}
    if not series:
        raise ValueError(f"{run_dir}: summary.json has no routing series (a run without the routing_stability "
                         "callback or without MoE layers): nothing to draw")
    info = {k: run.summary.get(k) for k in INFO_KEYS}
    return write_routing_plots(series, out_dir or os.path.join(run_dir, "plots"), info, dpi=dpi)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tasks.plots", description=__doc__.splitlines()[0],
                                epilog="example: python -m tasks.plots logs/domainbed/rotated_digits/runs/<run>")
    p.add_argument("run_dirs", nargs="+", metavar="run_dir", help="run folder(s) holding summary.json")
    p.add_argument("--out", default=None, help="folder for the PNGs (default <run_dir>/plots; with several runs "
                                               "<out>/<run folder name>)")
    p.add_argument("--dpi", type=int, default=PLOT_DPI)
    args = p.parse_args(argv)
    status = 0
    for run_dir in args.run_dirs:
        out = args.out
        if out is not None and len(args.run_dirs) > 1:
            out = os.path.join(out, os.path.basename(os.path.normpath(run_dir)))
        try:
            paths = redraw(run_dir, out, args.dpi)
        except (OSError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            status = 1
            continue
        print(f"{run_dir}: {len(paths)} plots in {os.path.dirname(next(iter(paths.values()))) if paths else '-'}")
    return status


if __name__ == "__main__":
    sys.exit(main())
