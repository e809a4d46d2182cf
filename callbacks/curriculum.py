"""Curriculum callback: sets the load-balancing weight λ every optimizer step (SPEC §3).

Before each training batch, ``λ, phase = schedule(τ, T)`` with ``τ = trainer.global_step`` (the
optimizer steps taken so far) and ``T = trainer.estimated_stepping_batches``; the callback writes
``pl_module.<attr>`` (``lambda_aux``) and logs ``curriculum/lambda`` and ``curriculum/phase`` (the
index of the phase in the schedule's phase list; 0 for the one-phase modes). Its state (last λ,
phase, step) is saved in checkpoints and put back on the module when training resumes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback

from rmoe import build_schedule
from rmoe.schedules import parse_phases

ONE_PHASE_NAMES = {"constant": "constant", "linear_ramp": "ramp", "exp_decay": "decay"}


class CurriculumCallback(Callback):
    """``schedule``: ``{mode, **params}`` — the ``curriculum`` config group (validated here, so a bad
    schedule fails when the callback is built, before training)."""

    def __init__(self, schedule: Mapping[str, Any], attr: str = "lambda_aux"):
        params = dict(schedule)
        if "mode" not in params:
            raise ValueError(f"curriculum config {dict(schedule)!r} has no 'mode'; allowed: "
                             "constant|linear_ramp|exp_decay|phased")
        self.mode = params.pop("mode")
        params.pop("name", None)
        self.schedule = build_schedule(self.mode, **params)
        if self.mode == "phased":
            self.phase_names = [p.name for p in parse_phases(params["phases"], params.get("units", "fraction"))]
        else:
            self.phase_names = [ONE_PHASE_NAMES.get(self.mode, self.mode)]
        self.attr = attr
        self.lam: float | None = None
        self.phase: str | None = None
        self.step: int | None = None

    def phase_index(self, phase: str) -> int:
        return self.phase_names.index(phase) if phase in self.phase_names else -1

    def value(self, step: int, total_steps: int) -> tuple[float, str]:
        lam, phase = self.schedule(int(step), int(total_steps))
        return float(lam), str(phase)

    def _apply(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        total = trainer.estimated_stepping_batches
        total = int(total) if total != float("inf") else 0
        self.lam, self.phase = self.value(trainer.global_step, total)
        self.step = int(trainer.global_step)
        setattr(pl_module, self.attr, self.lam)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.lam is not None:  # restored from a checkpoint: put λ back before the first step
            setattr(pl_module, self.attr, self.lam)

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
