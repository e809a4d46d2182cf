"""Finished runs -> tables (no torch).

* :mod:`.records` -- the one run-record reader (``done``, ``summary.json``, ``results.jsonl``,
  ``.hydra/*.yaml``, ``metrics.csv``, a study's ``meta.json``); the file names and fields are
  :mod:`callbacks.records`, shared with the writers.
* :mod:`.grouping` -- which runs share a row: method identity + every override that varies in a cell.
* :mod:`.stats` -- the one SE convention (sample std, n − 1, / √n) and paired differences.
* :mod:`.labels` -- the one labels / order list (methods, GLUE tasks, DomainBed datasets and domains).
* :mod:`.table` -- the one table renderer (Markdown, LaTeX) and cell formats.
* :mod:`.glue`, :mod:`.selection` + :mod:`.domainbed` -- the GLUE and DomainBed tables.
* :mod:`.collect` -- ``python -m tasks.collect`` / ``python -m tasks.results``.
"""

from .records import RunRecord, Scan, load_summaries, read_run, scan
from .stats import mean_se, paired_difference

__all__ = ["RunRecord", "Scan", "load_summaries", "mean_se", "paired_difference", "read_run", "scan"]
