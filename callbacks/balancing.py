"""Auxiliary-loss-free balancing (DeepSeek-V3, SPEC §1): calls ``update_bias()`` of every router
that has one (:class:`rmoe.routing.LossFreeRouter`) once after each optimizer step, and logs each
layer's bias range. A no-op for models without such routers.

An optimizer step ends after every ``accumulate_grad_batches`` training batches and after the last
batch of an epoch (Lightning steps on the epoch's last, partial accumulation too), the rule of
``callbacks/adaptive_experts.py``. The routers count the selections of every training forward
(all micro-batches, summed over data-parallel ranks) in a buffer, so the update uses the whole
step's load; bias and counts are router buffers and travel in checkpoints.

Logged per MoE layer ``moe<i>`` (index among the model's MoE layers, as ``callbacks.stability``):
``balancing/moe<i>/bias_min``, ``balancing/moe<i>/bias_max``.

Also refuses, before training, a layer whose aux loss is ``global_batch`` under
``accumulate_grad_batches > 1`` (see :func:`check_global_batch_accumulation`).
"""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback

from rmoe import ConfigError, find_moe_layers


def check_global_batch_accumulation(aux_losses: list[str], accumulate_grad_batches: int) -> None:
    """``global_batch`` needs one forward per rank and optimizer step: its ``f_e`` counts the whole
    global batch, and under gradient accumulation an earlier micro-batch runs its backward before the
    later micro-batches' counts exist — an exact gradient would need retained graphs or a routing
    pre-pass. Raises :class:`rmoe.ConfigError` naming both keys."""
    if "global_batch" in aux_losses and int(accumulate_grad_batches) > 1:
        raise ConfigError(
            f"invalid config: moe.aux_loss='global_batch' with trainer.accumulate_grad_batches="
            f"{int(accumulate_grad_batches)} (the global-batch loss needs every micro-batch's expert counts before "
            "the first backward of the step; with accumulation they are not known yet); allowed: "
            "trainer.accumulate_grad_batches=1 with global_batch (scale the global batch with more data-parallel "
            "ranks or a larger batch), or another moe.aux_loss")


class BalancingCallback(Callback):
    def __init__(self, log: bool = True):
        self.log = log
        self.updates = 0

    @staticmethod
    def layers(pl_module: L.LightningModule) -> list[tuple[str, Any]]:
        """``(moe<i>, router)`` for every MoE layer whose router has ``update_bias``."""
        return [(f"moe{i}", m.router) for i, (_, m) in enumerate(find_moe_layers(pl_module))
                if callable(getattr(m.router, "update_bias", None))]

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        aux = [m.cfg.aux_loss for _, m in find_moe_layers(pl_module)]
        check_global_batch_accumulation(aux, max(int(trainer.accumulate_grad_batches), 1))

    @staticmethod
    def _num_batches(trainer: L.Trainer) -> int:
        n = trainer.num_training_batches
        return int(n) if n != float("inf") else 0

    def step_ends(self, trainer: L.Trainer, batch_idx: int) -> bool:
        """True when an optimizer step was taken after training batch ``batch_idx``."""
        acc = max(int(trainer.accumulate_grad_batches), 1)
        return (batch_idx + 1) % acc == 0 or batch_idx + 1 == self._num_batches(trainer)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        routers = self.layers(pl_module)
        if not routers or not self.step_ends(trainer, batch_idx):
            return
        logged = {}
        for name, r in routers:
            r.update_bias()
            logged[f"balancing/{name}/bias_min"] = float(r.bias.min())
            logged[f"balancing/{name}/bias_max"] = float(r.bias.max())
        self.updates += 1
        if self.log:
            pl_module.log_dict(logged, on_step=True, on_epoch=False, batch_size=1)
