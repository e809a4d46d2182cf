"""``python -m tasks.collect --input_dir <dir>``: the result tables (:mod:`tasks.results.collect`);
``python -m tasks.collect --study docs/results [--output docs/RESULTS.md]``: the study report
(:mod:`tasks.study.report`, run as ``python -m tasks.study_report``). The results package knows no study: the
``--study`` option lives here."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence

from tasks.results.collect import collect, parser, run

__all__ = ["collect", "main"]


def main(argv: Sequence[str] | None = None) -> None:
    p = parser()
    p.add_argument("--study", metavar="RESULTS_DIR",
                   help="write the study report from RESULTS_DIR (e.g. docs/results) instead; see tasks.study.report")
    p.add_argument("--output", default=None, help="with --study: the report file (default <RESULTS_DIR>/../RESULTS.md)")
    p.add_argument("--plots", default=None, help="with --study: the plot folder (default <output folder>/plots)")
    a = p.parse_args(argv)
    if a.study:  # its own command (scipy and matplotlib: seconds that the tables do not need)
        raise SystemExit(subprocess.call([sys.executable, "-m", "tasks.study_report", a.study]
                                         + (["--output", a.output] if a.output else [])
                                         + (["--plots", a.plots] if a.plots else [])))
    run(p, a, "--input_dir is required (or --study RESULTS_DIR)")


if __name__ == "__main__":
    main()
