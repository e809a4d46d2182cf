"""Summarise GLUE run folders: ``python -m tasks.glue.report <run_dir> [<run_dir> ...]``.

For each run (a folder with ``metrics.csv`` and ``.hydra/config.yaml``) prints the task, the ``moe``
option, the training time of each epoch (``time/train_epoch_s``, validation excluded), the dev
headline score after each epoch (``val/score``) and its best (``val/score_best``).
"""

from __future__ import annotations

import csv
import os
import sys

import yaml


def summarise(run_dir: str) -> dict:
    with open(os.path.join(run_dir, "metrics.csv"), newline="") as f:
        rows = list(csv.DictReader(f))

    def col(key: str) -> list[float]:
        return [float(r[key]) for r in rows if r.get(key) not in (None, "")]

    cfg_path = os.path.join(run_dir, ".hydra", "config.yaml")
    cfg = {}
    if os.path.isfile(cfg_path):
        with open(cfg_path) as f:
            cfg = yaml.safe_load(f) or {}
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
        if not os.path.isfile(os.path.join(run, "metrics.csv")):
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
