"""Stop (or skip) on numerical faults before they reach the weights.

Checked right before every optimizer step: each MoE layer's router logits of the last forward,
the loss, and every gradient — as one fused check on the device (one host sync a step: per-tensor
``isfinite(...).all()`` flags and one ``_foreach_norm`` over the gradients, reduced to a single
flag); only when it fails is the slower scan run that names the fault. On a fault:

* ``on_fault="stop"``: raise :class:`NumericalFaultError` naming the step and the layer (or the
  first bad parameter); the optimizer step does not happen, so the last checkpoint on disk is the
  last good state and no checkpoint is written from the faulty state.
* ``on_fault="skip"``: drop the batch — every gradient is set to ``None`` so the optimizer leaves
  weights and moments untouched — and log ``numerics/skipped_batches``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn

from rmoe import find_moe_layers

ON_FAULT = ("stop", "skip")


class NumericalFaultError(RuntimeError):
    """A NaN/Inf appeared in a loss, a router output or a gradient."""


class NumericalFaultCallback(Callback):
    def __init__(self, on_fault: str = "stop", check_grads: bool = True):
        if on_fault not in ON_FAULT:
            raise ValueError(f"callbacks.numerics.on_fault={on_fault!r}; allowed: {'|'.join(ON_FAULT)}")
        self.on_fault = on_fault
        self.check_grads = check_grads
        self.skipped = 0
        self._loss: float | None = None

    def state_dict(self) -> dict:
        return {"skipped": self.skipped}

    def load_state_dict(self, state: dict) -> None:
        self.skipped = int(state.get("skipped", 0))

    def find_fault(self, pl_module: LightningModule, loss: torch.Tensor | None = None) -> str | None:
        """A description of the first non-finite value, or None."""
        for i, (name, moe) in enumerate(find_moe_layers(pl_module)):
            rec = moe.last_routing
            if rec is None:
                continue
            logits = rec.router_logits.detach()
            finite = torch.isfinite(logits) | torch.isneginf(logits)  # −inf marks inactive experts
            if not bool(finite.all()) or not bool(torch.isfinite(rec.router_probs.detach()).all()):
                return f"non-finite router output in MoE layer moe{i} ({name})"
            if not bool(torch.isfinite(rec.aux_loss.detach())):
                return f"non-finite aux loss in MoE layer moe{i} ({name})"
        if loss is not None and not math.isfinite(float(loss)):
            return f"non-finite loss ({float(loss)})"
        if self.check_grads:
            for pname, p in pl_module.named_parameters():
                if p.grad is not None and not bool(torch.isfinite(p.grad).all()):
                    return f"non-finite gradient in parameter {pname}"
        return None

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self._loss = None

    def on_before_backward(self, trainer: Trainer, pl_module: LightningModule, loss: torch.Tensor) -> None:
        self._loss = loss.detach()

    def all_finite(self, pl_module: LightningModule, loss: torch.Tensor | None = None) -> bool:
        """True when nothing :meth:`find_fault` checks can be non-finite, in one host sync. A
        gradient norm that overflows (finite values, huge norm) reads as a possible fault here; the
        caller then runs :meth:`find_fault`, which checks the values themselves."""
        flags = []
        for _, moe in find_moe_layers(pl_module):
            rec = moe.last_routing
            if rec is None:
                continue
            logits = rec.router_logits.detach()
            flags += [(torch.isfinite(logits) | torch.isneginf(logits)).all(),
                      torch.isfinite(rec.router_probs.detach()).all(), torch.isfinite(rec.aux_loss.detach()).all()]
        if loss is not None:
            flags.append(torch.isfinite(loss.detach()).all())
        if self.check_grads:
            grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
            if grads:
                norms = torch._foreach_norm(grads)
                flags.append(torch.isfinite(torch.stack([n.float() for n in norms])).all())
        if not flags:
            return True
        device = flags[0].device
        return bool(torch.stack([f.to(device) for f in flags]).all())

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer) -> None:
        if self.all_finite(pl_module, self._loss):
            return
        fault = self.find_fault(pl_module, self._loss)
        if fault is None:
            return
        step = trainer.global_step
        if self.on_fault == "stop":
            raise NumericalFaultError(
                f"numerical fault at optimizer step {step} (epoch {trainer.current_epoch}): {fault}. "
                "The step was not applied; the last checkpoint on disk is the last good state. "
                "Set callbacks.numerics.on_fault=skip to drop such batches instead.")
        for p in pl_module.parameters():
            p.grad = None
        self.skipped += 1
        pl_module.log("numerics/skipped_batches", float(self.skipped), on_step=True, batch_size=1)
        rank_zero_warn(f"skipped batch at optimizer step {step}: {fault}")
