"""Exact resume: the random-number generators and a ``last.ckpt`` written mid-epoch too.

* :class:`RNGStateCallback` saves the Python, NumPy and torch (CPU and CUDA) generator states in
  every checkpoint and puts them back when the resumed training starts (``on_train_start``: after
  Lightning has restored the loops and created the train loader iterator, before the first batch),
  so dropout, routing noise and anything else drawing from the global generators continue the
  interrupted run's streams. ``tasks.run.resume.prepare_fit`` adds it to every ``train()`` run. Under
  DDP the checkpoint holds rank 0's states and every rank restores them (the ranks are seeded alike).
* :class:`LastCheckpoint` is the ``last_checkpoint`` entry of ``conf/callbacks/default.yaml``: a
  ``ModelCheckpoint`` (``monitor=None``, one file) written after every validation, as the stock
  callback, *and* every ``every_n_train_steps`` optimizer steps (Lightning's own
  ``every_n_train_steps`` excludes the after-validation save). A step save is skipped when a
  validation follows the batch: the save after the validation covers the step, and a checkpoint
  taken between the batch and its validation would resume without that validation (Lightning does
  not rerun it).
* **Preemption** (:class:`LastCheckpoint` too). SIGTERM (Lightning's handler sets
  ``trainer.received_sigterm``) or SIGUSR1 (Slurm's warning signal; handled here unless Lightning's
  Slurm auto-requeue handler owns it) ends the run at the end of the current training batch: the
  checkpoint of that moment is written to ``last.ckpt`` (when a validation is due right after the
  batch, it runs first and its save is that checkpoint) and, once Lightning has handed the batch's
  metrics to the loggers (at the next batch or epoch end; for SIGTERM Lightning's own ``SIGTERMException``
  right after the batch, which carries the same record), :class:`Preempted` is raised -- a
  ``SystemExit`` with code 128 + the signal number (143 for SIGTERM, 138 for SIGUSR1). A SIGTERM during
  a validation ends it through Lightning's ``SIGTERMException``: the last save before it is the resume point.
* :class:`RunIdentityCallback` writes the run's identity (task, dataset, test_envs, method/variant,
  backbone) into every checkpoint under ``"rmoe_run_identity"``; ``tasks.run.resume`` refuses to resume
  a checkpoint of another identity.
"""

from __future__ import annotations

import os
import random
import signal
import threading
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from callbacks.lightning_internals import (
    allow_checkpoint_resave,
    check_lightning_version,
    checkpoint_saves_at_epoch_end,
    checkpoint_skips_saving,
    load_dropped_loader_states,
    save_checkpoint_now,
    validation_follows,
)

IDENTITY_KEY = "rmoe_run_identity"


class Preempted(SystemExit):
    """The run stopped on a preemption signal after saving ``path`` at optimizer step ``step``; the exit
    code is 128 + the signal number."""

    def __init__(self, signum: int, path: str | None, step: int):
        super().__init__(128 + int(signum))
        self.signum, self.path, self.step = int(signum), path, int(step)

    def __str__(self) -> str:
        return (f"preempted by {signal.Signals(self.signum).name} at step {self.step}; "
                f"checkpoint of that moment: {self.path}")


class RunIdentityCallback(Callback):
    """Stores ``identity`` (a plain dict) in every checkpoint under :data:`IDENTITY_KEY`."""

    def __init__(self, identity: dict[str, Any]):
        self.identity = dict(identity)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        checkpoint[IDENTITY_KEY] = dict(self.identity)


def collect_rng_states() -> dict[str, Any]:
    # plain tuples/ints/tensors only: Lightning loads checkpoints with torch.load(weights_only=True)
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    states: dict[str, Any] = {"python": random.getstate(),
                              "numpy": (str(kind), torch.from_numpy(keys.astype(np.int64)), int(pos),
                                        int(has_gauss), float(cached)),
                              "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["torch.cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    if "python" in states:
        random.setstate(states["python"])
    if "numpy" in states:
        kind, keys, pos, has_gauss, cached = states["numpy"]
        np.random.set_state((kind, np.asarray(keys, dtype=np.int64).astype(np.uint32), pos, has_gauss, cached))
    if "torch" in states:
        torch.set_rng_state(states["torch"])
    if "torch.cuda" in states and torch.cuda.is_available():
        cuda = states["torch.cuda"]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)


class RNGStateCallback(Callback):
    """Checkpoints the global RNG states and restores them at the start of the resumed training.

    Also loads the checkpointed train-loader state when Lightning has not (Lightning 2.5-2.6 bug
    #20550: when ``configure_optimizers`` reads ``trainer.estimated_stepping_batches``, the train
    loader is built before the checkpoint is restored and its saved state is silently dropped).
    """

    def __init__(self) -> None:
        self._pending: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        """This process's generator states; under data parallelism every rank's, in rank order
        (``{"ranks": [...]}``: the checkpoint is written by rank 0 alone, and each rank draws its own
        streams — expert dropout, noise, augmentation — so each must get its own back)."""
        states = collect_rng_states()
        if torch.distributed.is_available() and torch.distributed.is_initialized() \
                and torch.distributed.get_world_size() > 1:
            gathered: list[Any] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, states)  # every rank saves a checkpoint together
            return {"ranks": gathered}
        return states

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = dict(state_dict)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._pending is not None and "ranks" in self._pending:
            ranks = self._pending["ranks"]
            if len(ranks) != trainer.world_size:
                raise RuntimeError(f"the checkpoint holds the RNG states of {len(ranks)} ranks; this run has "
                                   f"{trainer.world_size}: resume with the run's own trainer.devices")
            self._pending = ranks[trainer.global_rank]
        load_dropped_loader_states(trainer)  # Lightning #20550 (see the class docstring)
        if self._pending is not None:
            set_rng_states(self._pending)
            self._pending = None


class LastCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint(monitor=None)`` saved after every validation and every ``every_n_train_steps``
    optimizer steps (``null`` or 0: after validations only, as the stock callback)."""

    def __init__(self, *args: Any, every_n_train_steps: int | None = None, **kwargs: Any):
        n = 0 if every_n_train_steps is None else every_n_train_steps
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise ValueError(f"invalid callbacks.last_checkpoint.every_n_train_steps={every_n_train_steps!r}; "
                             "allowed: an integer >= 0 or null")
        if kwargs.get("monitor") is not None:
            raise ValueError(f"invalid callbacks.last_checkpoint.monitor={kwargs['monitor']!r}; allowed: null "
                             "(it keeps the latest state; the model_checkpoint entry keeps the best)")
        super().__init__(*args, **kwargs)
        self.save_every_n_train_steps = n
        self._step_saved_at: int | None = None
        self._usr1 = False  # SIGUSR1 received (our handler)
        self._stop_pending: int | None = None  # the signal to stop on, once the saved batch's metrics are logged
        self._old_usr1: Any = None

    # --- preemption ---------------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        check_lightning_version()
        super().setup(trainer, pl_module, stage)
        if (stage == "fit" and hasattr(signal, "SIGUSR1") and threading.current_thread() is threading.main_thread()
                and signal.getsignal(signal.SIGUSR1) in (signal.SIG_DFL, None)):
            self._old_usr1 = signal.signal(signal.SIGUSR1, self._on_usr1)

    def _on_usr1(self, signum: int, frame: Any) -> None:
        self._usr1 = True

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._old_usr1 is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGUSR1, self._old_usr1)
            self._old_usr1 = None
        super().teardown(trainer, pl_module, stage)

    def _preempt_signal(self, trainer: L.Trainer) -> int | None:
        if self._usr1:
            return int(signal.SIGUSR1)
        if getattr(trainer, "received_sigterm", False):
            return int(signal.SIGTERM)
        return None

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self._stop_pending is not None:
            self._stop(trainer, self._stop_pending)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._stop_pending is not None:
            self._stop(trainer, self._stop_pending)
        if checkpoint_saves_at_epoch_end(self, trainer):
            self._allow_resave(trainer)
        super().on_train_epoch_end(trainer, pl_module)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        # Lightning 2.6 ends the run itself right after the batch a SIGTERM arrived in (SIGTERMException, exit code
        # None): tell rmoe-train what was saved (train.py turns it into exit 143 and a preempted attempt)
        if self._stop_pending is not None and type(exception).__name__ == "SIGTERMException":
            path = self.best_model_path or self.last_model_path or None  # (monitor=None: the latest save)
            exception.rmoe_preempted = Preempted(self._stop_pending, os.path.abspath(path) if path else None,
                                                 int(trainer.global_step))

    def _stop(self, trainer: L.Trainer, signum: int) -> None:
        path = self.best_model_path or self.last_model_path or None  # (monitor=None: the latest save)
        raise Preempted(signum, os.path.abspath(path) if path else None, int(trainer.global_step))

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        signum = self._preempt_signal(trainer)
        if signum is not None and not trainer.sanity_checking:
            if self._validation_follows(trainer):
                return  # that validation runs, its save is the checkpoint of the moment, then the run stops
            if not checkpoint_skips_saving(self, trainer):  # (not saved at this very step already)
                save_checkpoint_now(self, trainer)
                self._step_saved_at = int(trainer.global_step)
            self._stop_pending = signum  # stop once Lightning has handed this batch's metrics to the loggers
            return
        n = self.save_every_n_train_steps
        if n < 1 or trainer.global_step % n != 0 or checkpoint_skips_saving(self, trainer):
            return
        if self._validation_follows(trainer):
            return  # the save after that validation covers this step (Lightning would not redo it on resume)
        save_checkpoint_now(self, trainer)
        self._step_saved_at = int(trainer.global_step)

    @staticmethod
    def _validation_follows(trainer: L.Trainer) -> bool:
        """Whether Lightning validates right after this batch. A checkpoint taken in between would
        resume after the validation point, and Lightning does not rerun a skipped validation."""
        return validation_follows(trainer)

    def _allow_resave(self, trainer: L.Trainer) -> None:
        # the step save of this very step was taken before the validation: let the validation's save replace it
        if not trainer.sanity_checking and self._step_saved_at == trainer.global_step:
            allow_checkpoint_resave(self)
            self._step_saved_at = None

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._allow_resave(trainer)
        super().on_validation_end(trainer, pl_module)
        signum = self._preempt_signal(trainer)
        if signum is not None and not trainer.sanity_checking and trainer.state.fn == "fit":
            self._stop(trainer, signum)

