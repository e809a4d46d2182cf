"""DynMoE adaptive expert pool (SPEC §1): drives ``record`` / ``adapt`` of every
:class:`rmoe.routing.TopAnyRouter` in the model. A no-op for models without one.

Modes:

* ``epoch`` (GLUE): with ``n`` training batches per epoch, record batches ``n // 2`` to ``3n // 4``,
  both included (DynMoE's GLUE script), then call ``router.adapt()`` after batch ``3n // 4`` (the
  last batch when ``3n // 4`` is past the end).
* ``every_step`` (DomainBed): record every batch and ``adapt()`` after every optimizer step
  (every ``accumulate_grad_batches`` batches), then open the next window.

After each update the active expert count of each router is logged as ``routing/moe<j>/active_experts``, the
routing callback's name for the same fact (``j``: the layer's position among the MoE layers).
The recording window lives in router buffers, so it is saved in checkpoints. Lightning writes a value
logged from a callback hook again at every later step of the same epoch; the values logged this epoch
are checkpointed and logged again at the first step of a run resumed in that epoch (as the stability
callback does), so its rows match the uninterrupted run's.
"""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback

from rmoe import find_moe_layers
from rmoe.routing import TopAnyRouter

MODES = ("epoch", "every_step")


class AdaptiveExpertsCallback(Callback):
    def __init__(self, mode: str = "epoch", log: bool = True):
        if mode not in MODES:
            raise ValueError(f"invalid callbacks.adaptive_experts.mode={mode!r}; allowed: {'|'.join(MODES)}")
        self.mode = mode
        self.log = log
        self.updates: list[dict] = []
        self._logged: dict[str, float] = {}  # the values logged this epoch (replayed after a mid-epoch resume)
        self._logged_epoch: int | None = None
        self._replay: tuple[int | None, dict[str, float]] | None = None

    def state_dict(self) -> dict[str, Any]:
        return {"logged": dict(self._logged), "logged_epoch": self._logged_epoch}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._logged, self._logged_epoch = dict(state_dict.get("logged", {})), state_dict.get("logged_epoch")
        self._replay = (self._logged_epoch, dict(self._logged))

    def _log(self, pl_module: L.LightningModule, values: dict[str, float], epoch: int) -> None:
        # the routing callback's arguments for the same keys (Lightning refuses a key logged twice in one hook with
        # different arguments), the replay after a resume included
        sync = pl_module._trainer is not None and pl_module.trainer.world_size > 1
        pl_module.log_dict(values, on_step=True, on_epoch=False, logger=True, batch_size=1, sync_dist=sync)
        if epoch != self._logged_epoch:
            self._logged, self._logged_epoch = {}, epoch
        self._logged.update(values)

    @staticmethod
    def routers(pl_module: L.LightningModule) -> list[TopAnyRouter]:
        return [m for m in pl_module.modules() if isinstance(m, TopAnyRouter)]

    @staticmethod
    def layer_names(pl_module: L.LightningModule) -> dict[int, str]:
        """``id(router) -> "moe<j>"``, ``j`` the layer's position among the MoE layers (callbacks.stability's names)."""
        return {id(getattr(m, "router", None)): f"moe{j}" for j, (_, m) in enumerate(find_moe_layers(pl_module))}

    @staticmethod
    def window(num_batches: int) -> tuple[int, int]:
        """``(start, end)`` batch indices of the epoch-mode recording window: record batches
        ``start .. end-1`` (= ``n // 2 .. 3n // 4`` inclusive), adapt after batch ``end - 1``."""
        start = num_batches // 2
        return start, max(min((3 * num_batches) // 4 + 1, num_batches), start + 1)

    def _num_batches(self, trainer: L.Trainer) -> int:
        n = trainer.num_training_batches
        return int(n) if n != float("inf") else 0

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        routers = self.routers(pl_module)
        if not routers:
            return
        if self.mode == "epoch":
            start, _ = self.window(self._num_batches(trainer))
            if batch_idx == start:
                for r in routers:
                    r.start_recording()
        elif not all(bool(r.recording) for r in routers):
            for r in routers:
                r.start_recording()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        routers = self.routers(pl_module)
        if not routers:
            return
        if self._replay is not None:
            epoch, values = self._replay
            self._replay = None
            if self.log and values and epoch == int(trainer.current_epoch):
                self._log(pl_module, values, epoch)
        if self.mode == "epoch":
            n = self._num_batches(trainer)
            _, end = self.window(n)
            do = batch_idx == end - 1 and end <= n
        else:
            acc = max(int(trainer.accumulate_grad_batches), 1)
            do = (batch_idx + 1) % acc == 0 or batch_idx + 1 == self._num_batches(trainer)
        if not do:
            return
        logged = {}
        names = self.layer_names(pl_module)
        for i, r in enumerate(routers):
            if not bool(r.recording):
                continue
            change = r.adapt()
            self.updates.append({"step": int(trainer.global_step), "router": i, **change})
            # the routing callback's key for the same fact (callbacks.stability): the latest pool size wins
            logged[f"routing/{names.get(id(r), f'moe{i}')}/active_experts"] = float(r.expert_mask.sum())
        if self.log and logged:
            self._log(pl_module, logged, int(trainer.current_epoch))
