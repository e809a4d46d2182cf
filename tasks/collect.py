"""``python -m tasks.collect --input_dir <dir>``: the result tables; the code is :mod:`tasks.results.collect`."""

from tasks.results.collect import collect, main

__all__ = ["collect", "main"]

if __name__ == "__main__":
    main()
