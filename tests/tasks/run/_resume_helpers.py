"""Test-only Lightning callbacks used by subprocess runs of ``python -m tasks.train``
(``+callbacks.<name>._target_=_resume_helpers.<Class>``; the test puts this folder on PYTHONPATH)."""

from __future__ import annotations

import os
import signal

import torch
from lightning.pytorch.callbacks import Callback


class KillAtStep(Callback):
    """SIGKILL the process once ``step`` optimizer steps are done: at the start of the next training
    batch (``where="train"``) or of the next validation (``where="validation"``)."""

    def __init__(self, step: int, where: str = "train"):
        if where not in ("train", "validation"):
            raise ValueError(f"where={where!r}; allowed: train|validation")
        self.step, self.where = int(step), where

    def _kill(self, trainer):
        if trainer.global_step >= self.step and not trainer.sanity_checking:
            os.kill(os.getpid(), signal.SIGKILL)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.where == "train":
            self._kill(trainer)

    def on_validation_start(self, trainer, pl_module):
        if self.where == "validation":
            self._kill(trainer)


class DumpState(Callback):
    """At the end of training each rank writes ``<path>.rank<r>.pt``: model state_dict, λ, the
    curriculum callback's state, the stability callback's history, the global step, and an md5 digest
    of every training batch it saw (to tell the ranks' data apart)."""

    def __init__(self, path: str):
        self.path = path
        self.batches: list[str] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        import hashlib

        tensors = [t for t in (batch.values() if isinstance(batch, dict) else
                               (x for pair in batch for x in pair)) if torch.is_tensor(t)]
        h = hashlib.md5()
        for t in tensors:
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
        self.batches.append(h.hexdigest())

    def on_train_end(self, trainer, pl_module):
        state = {"state_dict": {k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items()},
                 "lambda": float(getattr(pl_module, "lambda_aux", float("nan"))),
                 "global_step": int(trainer.global_step), "world_size": int(trainer.world_size),
                 "batches": list(self.batches), "callbacks": {}}
        for cb in trainer.callbacks:
            name = type(cb).__name__
            if name in ("CurriculumCallback", "RoutingStabilityCallback"):
                state["callbacks"][name] = cb.state_dict()
        torch.save(state, f"{self.path}.rank{trainer.global_rank}.pt")


class SaveSpy(Callback):
    """Records, for every checkpoint written, the global step and the module's best validation
    score at that moment in ``SaveSpy.saves`` (class attribute: read by in-process tests)."""

    saves: list[tuple[int, float]] = []

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        SaveSpy.saves.append((int(trainer.global_step), float(pl_module.best_score)))


class RaiseAtStep(Callback):
    """Raise ``RuntimeError("interrupted at step N")`` at the start of the training batch after
    ``step`` optimizer steps: an in-process stand-in for a crash (the run's last.ckpt stays)."""

    def __init__(self, step: int):
        self.step = int(step)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step >= self.step:
            raise RuntimeError(f"interrupted at step {trainer.global_step}")


class SignalAtStep(Callback):
    """Send ``signum`` (a name: SIGTERM, SIGUSR1) to this process at the start of the training batch after
    ``step`` optimizer steps (once), as a scheduler's preemption would."""

    def __init__(self, step: int, signum: str = "SIGTERM"):
        self.step, self.signum, self.sent = int(step), getattr(signal, signum), False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if not self.sent and trainer.global_step >= self.step and not trainer.sanity_checking:
            self.sent = True
            os.kill(os.getpid(), self.signum)
