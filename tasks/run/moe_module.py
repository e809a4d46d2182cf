"""The LightningModule base of every MoE task (GLUE, DomainBed): loss formula, λ, best score.

Loss: ``loss = task_loss + λ · block_weight · Σ_layers aux + z_loss_weight · Σ_layers z``, with
``Σ aux`` and ``Σ z`` the sums over the MoE layers' last forward (:func:`rmoe.moe_losses`); the
z term is left out when ``z_loss_weight == 0``.

λ is set before every optimizer step by ``callbacks.curriculum`` through :meth:`MoEModule.set_lambda`
(0 until then) and read back as ``lambda_aux``. It is not saved here: the curriculum callback owns
the schedule and saves λ once, in its state, and puts it back through ``set_lambda`` on resume.

``best_score`` (a buffer, so it survives resume) is the running maximum of ``val/score`` outside
the sanity check; :meth:`MoEModule.update_best_score` returns the value logged as
``val/score_best``.
"""

from __future__ import annotations

import math

import lightning as L
import torch
from torch import Tensor, nn

from callbacks.balancing import BalancingCallback
from rmoe import ConfigError, moe_losses
from rmoe.accumulation import global_batch_layers, megatron_global_batch_layers
from rmoe.fusion import frozen_fusion
from tasks.run.checks import check_module_hparams


def fused_if_supported(params: list[nn.Parameter]) -> dict[str, bool]:
    """``{"fused": True}`` for torch's fused Adam/AdamW when every parameter is a floating tensor on the CPU
    or CUDA (one kernel over all tensors: the same update, several times faster than the per-tensor loop
    on CPU, where torch would not pick it by itself), else ``{}`` (torch's default)."""
    ok = params and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    return {"fused": True} if ok else {}


class MoEModule(L.LightningModule):
    """Base of the task modules: subclasses call ``super().__init__(lr=..., weight_decay=...,
    block_weight=..., z_loss_weight=...)`` first, compute their task loss and call
    :meth:`moe_loss`; their validation calls :meth:`update_best_score`."""

    def __init__(self, lr: float, weight_decay: float, block_weight: float, z_loss_weight: float):
        super().__init__()
        check_module_hparams({"lr": lr, "weight_decay": weight_decay, "block_weight": block_weight,
                              "z_loss_weight": z_loss_weight})
        self.block_weight = float(block_weight)
        self.z_loss_weight = float(z_loss_weight)
        self._lambda = 0.0
        self.register_buffer("best_score", torch.tensor(float("-inf")))

    # --- λ ---------------------------------------------------------------------------------------
    def set_lambda(self, value: float) -> None:
        """Set the load-balancing weight λ used by the next :meth:`moe_loss` (a finite number >= 0)."""
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ValueError(f"invalid λ={value!r}; allowed: a finite number >= 0")
        self._lambda = float(value)

    @property
    def lambda_aux(self) -> float:
        """The current λ (read-only: set it with :meth:`set_lambda`)."""
        return self._lambda

    @property
    def aux_weight(self) -> float:
        """The effective weight of ``Σ aux`` in the loss, ``λ · block_weight`` (computed here only: λ and the
        block weight both come from the run's protocol, ``conf/protocol/<benchmark>/``)."""
        return self._lambda * self.block_weight

    # --- loss ------------------------------------------------------------------------------------
    def moe_loss(self, task_loss: Tensor, model: nn.Module) -> tuple[Tensor, Tensor, Tensor]:
        """``(loss, Σ aux, Σ z)`` for ``task_loss`` and the MoE layers of ``model`` (module docstring)."""
        aux, z = moe_losses(model)
        aux, z = aux.to(task_loss.device), z.to(task_loss.device)
        loss = task_loss + self.aux_weight * aux
        if self.z_loss_weight:
            loss = loss + self.z_loss_weight * z
        return loss, aux, z

    # --- global_batch under gradient accumulation ---------------------------------------------------
    def on_fit_start(self) -> None:
        """``moe.aux_loss=global_batch`` with ``trainer.accumulate_grad_batches > 1`` is exact only with the
        routing pre-pass of ``callbacks.balancing.BalancingCallback``; without it each micro-batch's
        ``f_e`` would count that micro-batch alone, so the run is refused."""
        acc = max(int(self.trainer.accumulate_grad_batches), 1)
        balancing = any(isinstance(c, BalancingCallback) for c in self.trainer.callbacks)
        if acc > 1 and global_batch_layers(self) and not balancing:
            raise ConfigError(f"invalid config: trainer.accumulate_grad_batches={acc} with moe.aux_loss='global_batch' "
                              "and no callbacks.balancing.BalancingCallback (its routing pre-pass gives every "
                              "micro-batch the global batch's f_e); allowed: the balancing callback "
                              "(callbacks=default), or trainer.accumulate_grad_batches=1")
        if megatron_global_batch_layers(self) and not balancing:
            raise ConfigError("invalid config: moe.global_batch_mode='megatron' and no "
                              "callbacks.balancing.BalancingCallback (it clears the running counts after every "
                              "optimizer step); allowed: the balancing callback (callbacks=default), or "
                              "moe.global_batch_mode=window")

    # --- sanity check ----------------------------------------------------------------------------
    def on_validation_start(self) -> None:
        """Lightning's sanity check (before training, and again when a run resumes) is not part of the
        method: Stateful Fusion with ``update_in_eval`` must not move ``m`` during it."""
        if self._trainer is not None and self.trainer.sanity_checking:
            self._sanity_freeze = frozen_fusion(self)
            self._sanity_freeze.__enter__()

    def on_validation_end(self) -> None:
        freeze = getattr(self, "_sanity_freeze", None)
        if freeze is not None:
            self._sanity_freeze = None
            freeze.__exit__(None, None, None)

    # --- best score ------------------------------------------------------------------------------
    def update_best_score(self, score: float) -> float:
        """``best_score = max(best_score, score)`` outside the sanity check (a NaN score never
        counts); returns the value to log as ``val/score_best``: ``best_score``, or ``score`` while
        there is no best yet (the sanity check before the first evaluation)."""
        trainer = self._trainer
        if not (trainer is not None and trainer.sanity_checking) and score > float(self.best_score):
            self.best_score.fill_(score)
        best = float(self.best_score)
        return best if math.isfinite(best) else float(score)
