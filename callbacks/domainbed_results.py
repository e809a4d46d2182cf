"""DomainBed results records: one JSON line per evaluation in ``<run>/results.jsonl``.

Evaluation (Lightning's validation loop over the datamodule's per-domain ``in``/``out`` loaders)
follows DomainBed's schedule, set by :class:`callbacks.domainbed_schedule.DomainBedEvalSchedule`:
after the first update, every ``checkpoint_freq`` (= ``trainer.val_check_interval``) updates from
there, and after the last (``trainer.max_steps``). After each evaluation this callback appends::

    {"step": S, "epoch": S / steps_per_epoch, "env0_in_acc": ..., "env0_out_acc": ..., ...,
     "lambda_aux": ..., "hparams": {...}, "args": {"dataset", "algorithm", "test_envs",
     "trial_seed", "hparams_seed", "seed", "holdout_fraction", "steps", "checkpoint_freq",
     "output_dir", ...}}

``S`` is DomainBed's ``step``: the 0-based index of the update just taken (optimizer steps taken
minus one: 0, f, 2f, ..., max_steps - 1). ``hparams_seed`` null is replaced by
``md5(json(hparams)) % 2**31``, so runs of different hyper-parameters are told apart by model
selection. When a run resumes from a checkpoint taken after ``n`` optimizer steps, records with
``S >= n`` are dropped first (they are evaluated again), and the file is rewritten atomically.
A half-written last line (a kill during the append) is dropped with a
warning naming the file; a malformed line elsewhere fails naming the file and the line.
(``rmoe-train`` prints the run's per-domain table from ``self.path`` at the end of fit:
:func:`tasks.results.domainbed.run_report`.)
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig, ListConfig, OmegaConf

from callbacks.contract import DomainEvalModule, require
from callbacks.records import RESULTS_FILE, read_jsonl


def _plain(obj: Any) -> Any:
    """JSON-safe copy (OmegaConf containers, tuples, numpy scalars -> plain Python)."""
    if isinstance(obj, (DictConfig, ListConfig)):
        obj = OmegaConf.to_container(obj, resolve=True)
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item):
        return obj.item()
    return obj


class DomainBedResultsCallback(Callback):
    """``args`` / ``hparams``: written into every record (the task config fills them by
    interpolation); ``output_dir``: the run folder (default: ``trainer.default_root_dir``)."""

    def __init__(self, args: Mapping[str, Any] | None = None, hparams: Mapping[str, Any] | None = None,
                 output_dir: str | None = None, filename: str = RESULTS_FILE):
        self.args = _plain(dict(args or {}))
        self.hparams = _plain(dict(hparams or {}))
        if self.args.get("hparams_seed") is None:
            text = json.dumps(self.hparams, sort_keys=True)
            self.args["hparams_seed"] = int(hashlib.md5(text.encode("utf-8")).hexdigest(), 16) % (2**31)
        self.output_dir = output_dir
        self.filename = filename
        self.path: str | None = None
        self.written = 0

    # --- helpers -------------------------------------------------------------------------------
    def _path(self, trainer: L.Trainer) -> str:
        folder = self.output_dir or trainer.default_root_dir
        os.makedirs(folder, exist_ok=True)
        return os.path.join(folder, self.filename)

    @staticmethod
    def read(path: str) -> list[dict]:
        """The records of ``path``; a half-written last line is dropped with a warning
        (:func:`callbacks.records.read_jsonl`, the one ``results.jsonl`` reader)."""
        return read_jsonl(path)

    # --- hooks ---------------------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # the module keeps each evaluation's accuracies in last_eval (tasks.domainbed.module.DomainBedModule)
        require(pl_module, DomainEvalModule, type(self).__name__)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.path = self._path(trainer)
        if trainer.is_global_zero and os.path.exists(self.path):
            done = int(trainer.global_step)  # updates in the checkpoint: its records have step < done
            keep = [r for r in self.read(self.path) if int(r.get("step", done)) < done]
            tmp = self.path + ".tmp"
            with open(tmp, "w") as f:
                for r in keep:
                    f.write(json.dumps(r, sort_keys=True) + "\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero or trainer.state.fn != "fit":
            return
        accs = pl_module.last_eval  # a DomainEvalModule: checked in setup
        if not accs:
            return
        dm = trainer.datamodule
        step = int(trainer.global_step) - 1  # DomainBed's step: index of the update just taken
        spe = float(getattr(dm, "steps_per_epoch", 0) or 0)
        record: dict[str, Any] = {"step": step, "epoch": step / spe if spe else None}
        record.update({k: float(v) for k, v in accs.items()})
        record["lambda_aux"] = float(pl_module.lambda_aux)
        record["hparams"] = self.hparams
        record["args"] = self.args
        self.path = self.path or self._path(trainer)
        with open(self.path, "a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
        self.written += 1
