"""GLUE test sets: reading GLUE's ``test.tsv`` files, predicting them, and the submission files.

Layout (the original GLUE distribution): ``<glue_dir>/<TaskDir>/test.tsv`` (MNLI: ``test_matched.tsv`` and
``test_mismatched.tsv``), a header with an ``index`` column (QQP: ``id``), the task's text columns (CoLA:
``sentence``; the others as in their train file) and no label. A test file that also has the label column
(the train file's label column; CoLA: ``label``) is labelled: its metrics are computed as ``test/*``
(MNLI mismatched: ``test_mismatched/*``). Rows are kept in the file's order; an empty sentence is kept (the
submission needs a prediction for every index). A malformed file fails naming the file, line and column.

Submission files (GLUE's format, one per test file): ``<Name>.tsv`` with the header ``index<TAB>prediction``,
one row per test row in the file's order; the prediction is the label name (``0``/``1`` for CoLA, SST-2,
MRPC, QQP, WNLI; ``entailment``/``not_entailment`` for QNLI, RTE; ``entailment``/``neutral``/``contradiction``
for MNLI) or, for STS-B, the score with 3 decimals. Names: ``CoLA``, ``SST-2``, ``MRPC``, ``QQP``, ``STS-B``,
``MNLI-m``, ``MNLI-mm``, ``QNLI``, ``RTE``, ``WNLI``.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import torch
from torch.utils.data import DataLoader

from .metrics import compute_metrics
from .tasks import GlueDataError, GlueTask
from .tsv import _parse_label, read_text

INDEX_COLUMNS = ("index", "id")


@dataclass(frozen=True)
class GlueTestSplit:
    """One GLUE test file: its file stem, the submission name and the metric prefix."""

    stem: str
    name: str
    prefix: str


def glue_test_splits(task: GlueTask) -> tuple[GlueTestSplit, ...]:
    """The test files of ``task`` (MNLI: matched, then mismatched)."""
    if task.name == "mnli":
        return (GlueTestSplit("test_matched", "MNLI-m", "test"),
                GlueTestSplit("test_mismatched", "MNLI-mm", "test_mismatched"))
    return (GlueTestSplit("test", task.dir_name, "test"),)


def glue_test_columns(task: GlueTask) -> tuple[str, str | None, str]:
    """``(text_a, text_b, label)`` column names of the task's test file (CoLA: ``sentence``, ``label``)."""
    if not task.header:  # CoLA: the train/dev files are headerless, GLUE's test file has a header
        return "sentence", None, "label"
    return task.columns


def read_glue_test_tsv(path: str, task: GlueTask) -> dict[str, Any]:
    """``{"index": [...], "text_a": [...], "text_b": [...] (pairs), "label": [...] or None}`` of a test file."""
    a_col, b_col, y_col = glue_test_columns(task)
    with io.StringIO(read_text(path), newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        try:
            header = [h.strip() for h in next(reader)]
        except StopIteration:
            raise GlueDataError(f"{path}:1: empty file; expected a header with an index column and "
                                f"{[c for c in (a_col, b_col) if c]}") from None
        idx_col = next((c for c in INDEX_COLUMNS if c in header), None)
        if idx_col is None:
            raise GlueDataError(f"{path}:1: header has no index column; allowed: one of {list(INDEX_COLUMNS)} "
                                f"(GLUE's test layout); header is {header}")
        missing = [c for c in (a_col, b_col) if c is not None and c not in header]
        if missing:
            raise GlueDataError(f"{path}:1: header has no column {missing[0]!r}; header is {header}")
        i_i, a_i = header.index(idx_col), header.index(a_col)
        b_i = header.index(b_col) if b_col is not None else None
        y_i = header.index(y_col) if y_col in header else None
        out: dict[str, Any] = {"index": [], "text_a": [], "label": [] if y_i is not None else None}
        if b_i is not None:
            out["text_b"] = []
        seen: dict[str, int] = {}
        for row in reader:
            line = reader.line_num
            if not row or (len(row) == 1 and not row[0].strip()):
                continue
            if len(row) != len(header):
                raise GlueDataError(f"{path}:{line}: malformed row: {len(row)} tab-separated fields, expected "
                                    f"{len(header)} (the header's columns)")
            index = row[i_i].strip()
            if not index:
                raise GlueDataError(f"{path}:{line}: malformed row: {idx_col} is empty; allowed: a row identifier")
            if index in seen:
                raise GlueDataError(f"{path}:{line}: malformed row: {idx_col}={index!r} repeats line {seen[index]}; "
                                    "allowed: distinct indices")
            seen[index] = line
            out["index"].append(index)
            out["text_a"].append(row[a_i])
            if b_i is not None:
                out["text_b"].append(row[b_i])
            if y_i is not None:
                out["label"].append(_parse_label(task, row[y_i], f"{path}:{line}", y_col))
    if not out["index"]:
        raise GlueDataError(f"{path}: no data rows")
    return out


def find_test_files(glue_dir: str | None, task: GlueTask) -> list[tuple[GlueTestSplit, str]]:
    """The test files of ``task`` present under ``glue_dir`` (none for the hub dataset)."""
    if not glue_dir:
        return []
    found = []
    for split in glue_test_splits(task):
        path = os.path.join(glue_dir, task.dir_name, f"{split.stem}.tsv")
        if os.path.isfile(path):
            found.append((split, path))
    return found


def format_prediction(task: GlueTask, value: float | int) -> str:
    """GLUE's submission value: the label name, or the STS-B score with 3 decimals."""
    if task.is_regression:
        return f"{float(value):.3f}"
    return task.labels[int(value)]


def write_submission(path: str | os.PathLike, task: GlueTask, index: Sequence[str], preds: Sequence[float]) -> Path:
    """``index<TAB>prediction`` rows (GLUE's format), written to a temporary file then renamed."""
    if len(index) != len(preds):
        raise ValueError(f"{path}: {len(preds)} predictions for {len(index)} test rows")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8", newline="") as f:
        f.write("index\tprediction\n")
        for i, p in zip(index, preds):
            f.write(f"{i}\t{format_prediction(task, p)}\n")
    os.replace(tmp, path)
    return path


def predict_test_sets(trainer: Any, model: Any, datamodule: Any, out_dir: str | os.PathLike | None
                      ) -> tuple[dict[str, float], dict[str, str]]:
    """Predict every test file of the datamodule's task (in file order). Returns ``(metrics, files)``:
    ``test/*`` metrics of the labelled files, and -- when ``out_dir`` is given -- the submission file
    written for each test file (``{name: path}``)."""
    task = datamodule.task
    files = find_test_files(datamodule.glue_dir, task)
    if out_dir is not None and len(files) < len(glue_test_splits(task)):
        want = [os.path.join(str(datamodule.glue_dir), task.dir_name, f"{s.stem}.tsv") for s in glue_test_splits(task)]
        raise GlueDataError(f"predict=true: GLUE test file(s) not found: {[w for w in want if not os.path.isfile(w)]} "
                            f"(data.glue_dir={datamodule.glue_dir!r}); allowed: a data.glue_dir holding "
                            f"{task.dir_name}/{glue_test_splits(task)[0].stem}.tsv in GLUE's test layout")
    metrics: dict[str, float] = {}
    written: dict[str, str] = {}
    for split, path in files:
        raw = read_glue_test_tsv(path, task)
        labelled = raw["label"] is not None
        cols = {"text_a": raw["text_a"],
                "label": raw["label"] if labelled else [0.0 if task.is_regression else 0] * len(raw["index"])}
        if "text_b" in raw:
            cols["text_b"] = raw["text_b"]
        ds = datamodule._tokenize(datasets.Dataset.from_dict(cols))
        loader = DataLoader(ds, batch_size=datamodule.eval_batch_size, shuffle=False, collate_fn=datamodule.collate)
        preds = torch.cat([p.cpu() for p in trainer.predict(model, dataloaders=loader)])
        if len(preds) != len(raw["index"]):
            raise RuntimeError(f"{path}: {len(preds)} predictions for {len(raw['index'])} rows "
                               "(trainer.limit_predict_batches must be 1.0)")
        if labelled:
            labels = torch.tensor(raw["label"], dtype=torch.float32 if task.is_regression else torch.long)
            metrics.update({f"{split.prefix}/{k}": v for k, v in compute_metrics(task, preds, labels).items()})
        if out_dir is not None:
            values = preds.tolist()
            written[split.name] = str(write_submission(Path(out_dir) / f"{split.name}.tsv", task, raw["index"], values))
    return metrics, written


def dev_prediction_names(task: GlueTask) -> tuple[str, ...]:
    """The dev prediction files' names, one per dev split (``RTE-dev``; MNLI: ``MNLI-m-dev``, ``MNLI-mm-dev``)."""
    return tuple(f"{s.name}-dev" for s in glue_test_splits(task))[: len(task.val_splits)]


def predict_dev_sets(trainer: Any, model: Any, datamodule: Any, out_dir: str | os.PathLike) -> dict[str, str]:
    """``predict=dev``: the predictions for every dev row (MNLI: matched and mismatched), in the dev file's order,
    as ``<out_dir>/<Name>-dev.tsv`` with the header ``index<TAB>prediction<TAB>label`` (``index``: the row's
    position in the dev file, from 0; prediction and label in the submission format). Returns ``{name: path}``."""
    task = datamodule.task
    written: dict[str, str] = {}
    loaders = datamodule.val_dataloader()
    for k, name in enumerate(dev_prediction_names(task)):
        ds = datamodule.val_sets[k]
        preds = torch.cat([p.cpu() for p in trainer.predict(model, dataloaders=loaders[k])]).tolist()
        labels = list(ds["labels"])
        if len(preds) != len(labels):
            raise RuntimeError(f"{name}: {len(preds)} predictions for {len(labels)} dev rows "
                               "(trainer.limit_predict_batches must be 1.0)")
        path = Path(out_dir) / f"{name}.tsv"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            f.write("index\tprediction\tlabel\n")
            for i, (p, y) in enumerate(zip(preds, labels)):
                f.write(f"{i}\t{format_prediction(task, p)}\t{format_prediction(task, y)}\n")
        os.replace(tmp, path)
        written[name] = str(path)
    return written
