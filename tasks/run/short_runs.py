"""Runs shorter than the trainer's cadences still log and validate (a callback :func:`tasks.job.train` adds).

* ``trainer.log_every_n_steps`` larger than the run's planned optimizer steps (a short GLUE run with the default
  50) would log no ``train/*``, ``routing/*`` or ``curriculum/lambda`` row at all: Lightning writes step metrics
  only every ``log_every_n_steps`` steps. The cadence becomes the planned number of steps (one row at the end).
* ``trainer.max_steps`` that ends inside the first epoch with validation at epoch ends
  (``val_check_interval=null``) would stop before any validation: no ``val/score``, no best checkpoint, and
  early stopping fails at the end ("conditioned on metric val/score which is not available"). Validation then
  runs after the last step instead.

Each change is logged (INFO) with the setting it overrides; runs long enough for their cadences are untouched.
"""

from __future__ import annotations

import logging
import math

from lightning.pytorch import Callback, LightningModule, Trainer

log = logging.getLogger(__name__)


class ShortRunCallback(Callback):
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        planned = trainer.estimated_stepping_batches
        if math.isfinite(planned) and 1 <= planned < trainer.log_every_n_steps:
            log.info("trainer.log_every_n_steps=%d is more than this run's %d optimizer steps: logging every %d "
                     "(train/*, routing/*, curriculum/* rows at the last step)", trainer.log_every_n_steps,
                     int(planned), int(planned))
            trainer.log_every_n_steps = int(planned)
        batches = trainer.num_training_batches
        last = trainer.max_steps * trainer.accumulate_grad_batches if trainer.max_steps > 0 else None
        if (last is not None and trainer.global_step == 0 and trainer.check_val_every_n_epoch is not None
                and math.isfinite(batches) and trainer.val_check_batch == batches and last < batches
                and trainer.limit_val_batches):
            log.info("trainer.max_steps=%d ends inside the first epoch (%d batches) and validation runs at epoch "
                     "ends (val_check_interval=null): validating after the last step instead", trainer.max_steps,
                     int(batches))
            trainer.val_check_batch = last
