"""DomainBed results records: one JSON line per evaluation in ``<run>/results.jsonl``.

Evaluation runs every ``trainer.val_check_interval`` optimizer steps (Lightning's validation loop
over the datamodule's per-domain ``in``/``out`` loaders); this callback also stops training after
``trainer.max_steps`` steps *with* a final evaluation (by setting ``trainer.should_stop`` on the last
step, which makes Lightning validate). After each evaluation it appends::

    {"step": S, "epoch": S / steps_per_epoch, "env0_in_acc": ..., "env0_out_acc": ..., ...,
     "lambda_aux": ..., "hparams": {...}, "args": {"dataset", "algorithm", "test_envs",
     "trial_seed", "hparams_seed", "seed", "holdout_fraction", "steps", "checkpoint_freq",
     "output_dir", ...}}

``S`` is the number of optimizer steps taken (DomainBed's record ``step`` counts from 0, i.e.
ours minus one). ``hparams_seed`` null is replaced by ``md5(json(hparams)) % 2**31``, so runs of
different hyper-parameters are told apart by model selection. When a run resumes from a checkpoint,
records written after that checkpoint's step are dropped first (they are evaluated again).
(The DomainBed module prints the run's per-domain table from ``self.path`` at the end of fit.)
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback


def _plain(obj: Any) -> Any:
    """JSON-safe copy (OmegaConf containers, tuples, numpy scalars -> plain Python)."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(obj, (DictConfig, ListConfig)):
            obj = OmegaConf.to_container(obj, resolve=True)
    except ImportError:  # pragma: no cover
        pass
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
                 output_dir: str | None = None, filename: str = "results.jsonl"):
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
        if not os.path.exists(path):
            return []
        with open(path) as f:
            return [json.loads(line) for line in f if line.strip()]

    # --- hooks ---------------------------------------------------------------------------------
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.path = self._path(trainer)
        if trainer.is_global_zero and os.path.exists(self.path):
            step = int(trainer.global_step)
            keep = [r for r in self.read(self.path) if int(r.get("step", -1)) <= step] if step > 0 else []
            with open(self.path, "w") as f:
                for r in keep:
                    f.write(json.dumps(r, sort_keys=True) + "\n")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if trainer.max_steps is not None and trainer.max_steps > 0 and trainer.global_step >= trainer.max_steps:
            trainer.should_stop = True  # -> Lightning runs the final validation before stopping

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero or trainer.state.fn != "fit":
            return
        accs = getattr(pl_module, "last_eval", None)
        if not accs:
            return
        dm = trainer.datamodule
        step = int(trainer.global_step)
        spe = float(getattr(dm, "steps_per_epoch", 0) or 0)
        record: dict[str, Any] = {"step": step, "epoch": step / spe if spe else None}
        record.update({k: float(v) for k, v in accs.items()})
        record["lambda_aux"] = float(getattr(pl_module, "lambda_aux", 0.0))
        record["hparams"] = self.hparams
        record["args"] = self.args
        self.path = self.path or self._path(trainer)
        with open(self.path, "a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
        self.written += 1
