"""Run folders as units of work: the ``done`` marker, skipping finished jobs, clearing killed ones.

* ``<run>/done`` is written by ``rmoe-train`` (rank 0) after ``train()`` returned without error --
  DomainBed's convention. Its content is JSON: the final metrics, the finish time and the commit.
  Result readers (``tasks.collect``, ``tasks.study_report``) only count folders that have it.
* With ``skip_if_done=true`` (the reproduction sweeps, whose job folders are named by their
  parameters, not by a timestamp or job number), a job whose folder has ``done`` is skipped and
  returns its recorded metric; a folder without it (a killed or failed job) first loses its partial
  outputs (:data:`PARTIAL_OUTPUTS`) and the job is trained from scratch -- never counted half done
  (unless ``ckpt_path`` is set: then the job resumes and the folder is left as it is).
* A failing job in a multirun does not stop the other jobs (Hydra records it as failed and goes
  on); ``rmoe-train -m`` exits non-zero at the end and the failed folder has no ``done``.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Mapping
from pathlib import Path

from callbacks.records import DONE_FILE, METRICS_FILE, RESULTS_FILE, SUMMARY_FILE, read_done, write_json_atomic

log = logging.getLogger(__name__)

DONE = DONE_FILE
__all__ = ["DONE", "PARTIAL_OUTPUTS", "clear_partial", "is_done", "is_rank_zero", "mark_done", "read_done",
           "write_json_atomic"]
# what a previous, unfinished attempt may have left in a job folder (.hydra/ and the log stay)
PARTIAL_OUTPUTS = (RESULTS_FILE, SUMMARY_FILE, f"{SUMMARY_FILE}.tmp", METRICS_FILE, "hparams.yaml",
                   "checkpoints", "plots", "wandb")


def is_done(run_dir: str | os.PathLike) -> bool:
    return (Path(run_dir) / DONE).is_file()


def mark_done(run_dir: str | os.PathLike, metrics: Mapping[str, float], commit: str | None = None,
              skipped_batches: int = 0) -> Path:
    """Write ``<run_dir>/done`` atomically with its content (temp file + fsync + rename); ``skipped_batches``:
    the batches ``callbacks.numerics.on_fault=skip`` dropped (collectors leave such runs out unless asked)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    record = {"finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "commit": commit,
              "metrics": {k: float(v) for k, v in sorted(metrics.items())}, "skipped_batches": int(skipped_batches)}
    return write_json_atomic(run_dir / DONE, record)


def clear_partial(run_dir: str | os.PathLike) -> list[str]:
    """Remove the outputs of an unfinished attempt; returns what was removed."""
    run_dir = Path(run_dir)
    removed = []
    for name in PARTIAL_OUTPUTS:
        p = run_dir / name
        if p.is_dir():
            shutil.rmtree(p)
            removed.append(name)
        elif p.exists():
            p.unlink()
            removed.append(name)
    if removed:
        log.warning("%s: removed the partial outputs of an unfinished attempt: %s", run_dir, ", ".join(removed))
    return removed


def is_rank_zero() -> bool:
    return all(int(os.environ.get(k, "0") or 0) == 0 for k in ("RANK", "LOCAL_RANK", "NODE_RANK"))
