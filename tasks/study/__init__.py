"""The reproduction study: :mod:`.driver` (runs the sweeps, exports the records), :mod:`.data` (its
runs and the numbers behind the report), :mod:`.claims`, :mod:`.plots`, :mod:`.text` and
:mod:`.report` (``docs/RESULTS.md``). Reading and tables come from :mod:`tasks.results`."""
