"""The GLUE dev sets' label counts, recorded once into ``docs/results/glue_dev_labels.json`` so the
report's gates (the majority-class / constant-prediction score, the dev set's SE, degenerate runs)
are computed from ``docs/results/`` alone, offline::

    RMOE_DATA_DIR=/work/shared/data python -m tasks.study.devlabels

reads ``$RMOE_DATA_DIR/glue/<Task>/dev.tsv`` with the training code's own reader
(:func:`tasks.glue.tsv.read_glue_tsv`) and writes, per task: the file, ``n`` (dev rows), and for a
classification task ``labels`` (the task's label names, in index order) and ``counts`` (rows per
label index); for STS-B ``regression: true`` and ``std`` (the labels' population standard deviation,
which a degenerate run's prediction spread is compared with).
"""

from __future__ import annotations

import argparse
import json
import math
import os
from collections.abc import Sequence

from tasks.glue.tasks import get_task
from tasks.glue.tsv import read_glue_tsv, task_file

FILE = "glue_dev_labels.json"
COMMAND = "RMOE_DATA_DIR=/work/shared/data python -m tasks.study.devlabels"
DEFAULT_TASKS = ("cola", "mrpc", "rte", "stsb")


def dev_label_counts(glue_dir: str, tasks: Sequence[str]) -> dict:
    out = {}
    for name in tasks:
        task = get_task(name)
        path = task_file(glue_dir, task, "dev")
        labels = read_glue_tsv(path, task)["label"]
        entry: dict = {"file": f"{task.dir_name}/dev.tsv", "n": len(labels)}
        if task.labels is None:
            entry["regression"] = True
            ys = [float(y) for y in labels]
            mean = sum(ys) / len(ys)
            entry["std"] = round(math.sqrt(sum((y - mean) ** 2 for y in ys) / len(ys)), 6)
        else:
            entry["labels"] = list(task.labels)
            entry["counts"] = [sum(1 for y in labels if y == i) for i in range(len(task.labels))]
        out[task.name] = entry
    return out


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Record the GLUE dev sets' label counts for the study report.")
    p.add_argument("--glue-dir", default=os.path.join(os.environ.get("RMOE_DATA_DIR", "data"), "glue"))
    p.add_argument("--output", default=os.path.join("docs", "results", FILE))
    p.add_argument("--tasks", nargs="+", default=list(DEFAULT_TASKS))
    a = p.parse_args(argv)
    data = {"command": COMMAND, "tasks": dev_label_counts(a.glue_dir, a.tasks)}
    with open(a.output, "w", encoding="utf-8", newline="\n") as f:
        json.dump(data, f, indent=1, sort_keys=True)
        f.write("\n")


if __name__ == "__main__":
    main()
