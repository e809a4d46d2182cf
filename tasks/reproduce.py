"""``python -m tasks.reproduce {glue,domainbed,small,ceiling,report}``: the code is :mod:`tasks.study.driver`."""

from tasks.study.driver import main

__all__ = ["main"]

if __name__ == "__main__":
    raise SystemExit(main())
