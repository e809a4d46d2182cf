"""How many of the study's jobs run in parallel on this machine, per benchmark (``--n_jobs`` default of
:mod:`tasks.study.driver`; the report's cost estimates, :meth:`tasks.study.report.Report.floor_cost_lines`)."""

DEFAULT_JOBS = {"glue": 2, "domainbed": 2, "ceiling": 1}
