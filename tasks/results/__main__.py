"""``python -m tasks.results --input_dir <dir>``: the result tables (:mod:`tasks.results.collect`)."""

from tasks.results.collect import main

main()
