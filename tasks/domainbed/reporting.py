"""Moved to :mod:`tasks.results.domainbed` (kept for ``tasks.domainbed.module``'s import of ``run_table``)."""

from tasks.results.domainbed import run_table

__all__ = ["run_table"]
