"""Curriculum callback: sets the load-balancing weight λ every optimizer step (SPEC §3).

Before each training batch, ``λ, phase = schedule(τ, T)`` with ``τ = trainer.global_step`` (the
optimizer steps taken so far) and ``T = trainer.estimated_stepping_batches``; the callback hands λ
to the module through ``pl_module.set_lambda(λ)`` (the module is a :class:`callbacks.contract.LambdaModule`,
checked at ``setup``) and logs ``curriculum/lambda`` and
``curriculum/phase`` (the index of the phase in ``schedule.phase_names``; 0 for the one-phase
modes).

λ is saved once, in this callback's state (last λ, phase, step). On resume the state is put back
on the module (``set_lambda``) when the checkpoint is loaded and again at the start of training;
resuming from a checkpoint that holds no curriculum state fails at the start of training rather
than training on with λ = 0.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback

from callbacks.contract import LambdaModule, require
from rmoe.schedules import SCHEDULES, Schedule, build_schedule


def _set_lambda(pl_module: L.LightningModule, value: float) -> None:
    pl_module.set_lambda(float(value))  # a LambdaModule: checked in CurriculumCallback.setup


class CurriculumCallback(Callback):
    """``schedule``: ``{mode, **params}`` — the ``curriculum`` config group (validated here, so a bad
    schedule fails when the callback is built, before training)."""

    def __init__(self, schedule: Mapping[str, Any]):
        params = dict(schedule)
        if "mode" not in params:
            raise ValueError(f"curriculum config {dict(schedule)!r} has no 'mode'; allowed: {'|'.join(SCHEDULES)}")
        self.mode = params.pop("mode")
        params.pop("name", None)
        self.params = params
        self.schedule: Schedule = build_schedule(self.mode, **params)
        self.total_steps: int | None = None
        self.lam: float | None = None
        self.phase: str | None = None
        self.step: int | None = None
        self._restored = False

    @property
    def phase_names(self) -> tuple[str, ...]:
        return self.schedule.phase_names

    def phase_index(self, phase: str) -> int:
        return self.schedule.phase_index(phase)

    def value(self, step: int, total_steps: int) -> tuple[float, str]:
        lam, phase = self.schedule(int(step), int(total_steps))
        return float(lam), str(phase)

    @staticmethod
    def run_total_steps(trainer: L.Trainer) -> int:
        """``T`` of the schedule: the run's optimizer steps (0 when unbounded)."""
        total = trainer.estimated_stepping_batches
        return int(total) if total != float("inf") else 0

    def schedule_record(self, trainer: L.Trainer | None = None) -> dict[str, Any]:
        """The schedule as plain data, for plots and records: ``{mode, **params, total_steps}``
        (``build_schedule(mode, **params)`` rebuilds it; ``total_steps`` is ``T``, None if unknown)."""
        total = self.total_steps
        if total is None and trainer is not None:
            total = self.run_total_steps(trainer)
        return {"mode": self.mode, **self.params, "total_steps": total}

    def _apply(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        total = self.run_total_steps(trainer)
        self.total_steps = total
        self.lam, self.phase = self.value(trainer.global_step, total)
        self.step = int(trainer.global_step)
        _set_lambda(pl_module, self.lam)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # the module takes λ through set_lambda (tasks.run.moe_module.MoEModule provides it)
        require(pl_module, LambdaModule, type(self).__name__)

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        # λ back on the module as soon as the checkpoint is read (also when fit has nothing left to run)
        state = (checkpoint.get("callbacks") or {}).get(self.state_key)
        if state and state.get("lambda") is not None:
            _set_lambda(pl_module, state["lambda"])

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.ckpt_path is not None and not self._restored:
            raise ValueError(
                f"ckpt_path={str(trainer.ckpt_path)!r} holds no {self.state_key} state (λ, phase, step): it was "
                "written without the curriculum callback, so the module's λ would silently stay 0 until the first "
                "step and the phase/step state would be lost. Allowed: a checkpoint written with "
                "callbacks.curriculum, or +init_from=<ckpt> to start a new run from its weights")
        if self.lam is not None:  # restored from a checkpoint: put λ back before the first step
            _set_lambda(pl_module, self.lam)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._apply(trainer, pl_module)
        pl_module.log_dict({"curriculum/lambda": self.lam, "curriculum/phase": float(self.phase_index(self.phase))},
                           on_step=True, on_epoch=False, batch_size=1)

    def state_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "lambda": self.lam, "phase": self.phase, "step": self.step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.lam = state_dict.get("lambda")
        self.phase = state_dict.get("phase")
        self.step = state_dict.get("step")
        self._restored = True
