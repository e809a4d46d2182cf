"""``metrics.csv`` and the loggers' steps (Lightning's CSV logger, imported here: a job builds its loggers after its
config checks).

* **Step.** Every logger writes its rows at ``trainer.global_step``, the optimizer updates completed when the
  row is written (:func:`log_at_global_step`): the training row of update ``N`` and the validation after it
  are at ``N``, as ``summary.json``, the checkpoint names and the console say (Lightning's own step is
  ``N - 1`` there); the learning-rate monitor's row, written before update ``N + 1``, is at ``N`` too.
* **Records.** Lightning's CSV logger deletes an existing ``metrics.csv`` when it starts; on resume
  :func:`keep_csv_history` keeps the rows logged up to the checkpoint's step (the rest are logged
  again by the resumed run) and makes the logger append to them; header changes are rewritten
  atomically. A fresh run's CSV logger (:func:`start_csv_history`) starts ``metrics.csv`` without
  Lightning's warning that the folder "exists and is not empty" (it always is: ``.hydra/``, the lock,
  ``attempts.jsonl``); it warns only when there is a ``metrics.csv`` to replace.
"""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Iterable, Sequence
from typing import Any

from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

log = logging.getLogger("tasks.run.run_folder")


def _write_rows_atomic(path: str, fieldnames: Sequence[str], rows: Iterable[dict[str, Any]]) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(fieldnames))
        writer.writeheader()
        writer.writerows(rows)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class AppendingExperimentWriter(ExperimentWriter):
    """Lightning's CSV writer that keeps an existing ``metrics.csv`` (appends) and rewrites it
    atomically when the header grows."""

    def _check_log_dir_exists(self) -> None:
        pass

    def _rewrite_with_new_header(self, fieldnames: list[str]) -> None:
        with open(self.metrics_file_path, newline="") as f:
            rows = list(csv.DictReader(f))
        _write_rows_atomic(self.metrics_file_path, fieldnames, rows)


class FreshExperimentWriter(ExperimentWriter):
    """Lightning's CSV writer that warns only when a ``metrics.csv`` is there to be replaced (Lightning
    warns whenever the folder holds any file)."""

    def _check_log_dir_exists(self) -> None:
        if os.path.isfile(self.metrics_file_path):
            log.warning("%s exists: this run starts it again (the old rows are deleted)", self.metrics_file_path)
            os.unlink(self.metrics_file_path)


def start_csv_history(loggers: Sequence[Any]) -> None:
    """A fresh run: every CSV logger writes a new ``metrics.csv`` (module docstring)."""
    for lg in loggers:
        if isinstance(lg, CSVLogger) and lg._experiment is None:
            lg._experiment = FreshExperimentWriter(lg.log_dir)


def read_metrics_csv(path: str | os.PathLike) -> tuple[list[str], list[dict[str, str]]]:
    """``(header, rows)`` of a metrics.csv; a half-written last row (fewer fields) is dropped."""
    with open(path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader, [])
        rows = []
        for row in reader:
            if len(row) != len(header):
                log.warning("%s: dropped a malformed row at line %d (%d fields, the header has %d)", path,
                            reader.line_num, len(row), len(header))
                continue
            rows.append(dict(zip(header, row)))
    return header, rows


def log_at_global_step(loggers: Sequence[Any], trainer: Any) -> None:
    """Every logger of ``loggers`` writes its rows at ``trainer.global_step`` (module docstring), whatever step
    Lightning passes (its ``_batches_that_stepped``, one less between an optimizer step and the end of the
    validation that follows it). Each logger's ``log_metrics`` is wrapped once, on this instance."""
    for lg in loggers:
        if getattr(lg, "_rmoe_global_step", False):
            continue
        original = lg.log_metrics

        def log_metrics(metrics: Any, step: int | None = None, _original: Any = original) -> None:
            _original(metrics, int(trainer.global_step))

        lg.log_metrics = log_metrics
        lg._rmoe_global_step = True


def _before_checkpoint(row: dict[str, str], resume_step: int) -> bool:
    """Whether a ``metrics.csv`` row was logged before a checkpoint taken after ``resume_step`` updates: every
    row at a smaller step, and at ``resume_step`` the training and validation rows (the learning-rate monitor's
    row there, without an ``epoch``, precedes the next update: the resumed run logs it again)."""
    step = _step(row)
    if step is None or step > resume_step:
        return False
    return step < resume_step or bool(row.get("epoch", ""))


def keep_csv_history(loggers: Sequence[Any], resume_step: int) -> int:
    """On resume: every CSV logger keeps the rows of its ``metrics.csv`` logged before the checkpoint
    (``resume_step``: its global step; :func:`_before_checkpoint`; the resumed run logs the later ones again)
    and appends to them. Returns the number of rows kept."""
    kept = 0
    for lg in loggers:
        if not isinstance(lg, CSVLogger):
            continue
        exp = AppendingExperimentWriter(lg.log_dir)
        path = exp.metrics_file_path
        if os.path.isfile(path):
            header, rows = read_metrics_csv(path)
            keep = [r for r in rows if _before_checkpoint(r, resume_step)]
            dropped = len(rows) - len(keep)
            _write_rows_atomic(path, header, keep)
            exp.metrics_keys = list(header)
            kept += len(keep)
            log.info("%s: kept %d logged row(s) up to step %d%s", path, len(keep), resume_step,
                     f", dropped {dropped} logged after the checkpoint (logged again)" if dropped else "")
        lg._experiment = exp
    return kept


def _step(row: dict[str, str]) -> int | None:
    try:
        return int(float(row.get("step", "")))
    except ValueError:
        return None
