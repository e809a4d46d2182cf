"""Summarise GLUE run folders: ``python -m tasks.glue.report <run_dir> [<run_dir> ...]``.

For each run (a folder with ``metrics.csv`` and ``.hydra/config.yaml``) prints the task, the ``moe``
option, the training time of each epoch (``time/train_epoch_s``, validation excluded), the dev
headline score after each epoch (``val/score``) and its best (``val/score_best``).
"""

from __future__ import annotations

import os
import sys

from callbacks.records import METRICS_FILE
from tasks.results.records import metric_column, read_config, read_metrics


def summarise(run_dir: str) -> dict:
    """The run's identity (``.hydra/config.yaml``) and per-epoch columns (``metrics.csv``), read by
    :mod:`tasks.results.records`."""
    rows = read_metrics(run_dir)

    def col(key: str) -> list[float]:
        return metric_column(rows, key)

    cfg = read_config(run_dir)
    return {"run": run_dir, "task": cfg.get("task_name", "?"), "moe": (cfg.get("moe") or {}).get("name", "?"),
            "backbone": (cfg.get("backbone") or {}).get("name", "?"),
            "epoch_s": col("time/train_epoch_s"), "val_s": col("time/val_s"), "score": col("val/score")}


def main(argv: list[str] | None = None) -> int:
    runs = argv if argv is not None else sys.argv[1:]
    if not runs:
        print(__doc__)
        return 2
    print(f"{'task':<10} {'backbone':<10} {'moe':<9} {'train s/epoch':<22} {'val s':<8} "
          f"{'val/score per epoch':<28} best")
    for run in runs:
        if not os.path.isfile(os.path.join(run, METRICS_FILE)):
            print(f"{run}: no metrics.csv (yet)")
            continue
        s = summarise(run)
        epochs = ", ".join(f"{x:.0f}" for x in s["epoch_s"])
        scores = ", ".join(f"{x:.4f}" for x in s["score"])
        best = f"{max(s['score']):.4f}" if s["score"] else "-"
        val = f"{sum(s['val_s']) / len(s['val_s']):.0f}" if s["val_s"] else "-"
        print(f"{s['task']:<10} {s['backbone']:<10} {s['moe']:<9} {epochs:<22} {val:<8} {scores:<28} {best}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
