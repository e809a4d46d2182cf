"""``python -m tasks.study_report docs/results --output docs/RESULTS.md``: the code is :mod:`tasks.study.report`."""

from tasks.study.report import generate, load_study, main

__all__ = ["generate", "load_study", "main"]

if __name__ == "__main__":
    main()
