"""Balancing at optimizer-step boundaries: the loss-free bias update, and the global-batch loss under
gradient accumulation.

**Loss-free balancing** (DeepSeek-V3, SPEC §1): calls ``update_bias()`` of every router that has one
(:class:`rmoe.routing.LossFreeRouter`) once after each optimizer step, and logs each layer's bias range.
An optimizer step ends after every ``accumulate_grad_batches`` training batches and after the last
batch of an epoch (Lightning steps on the epoch's last, partial accumulation too), the rule of
``callbacks/adaptive_experts.py``. The routers count the selections of every training forward
(all micro-batches, summed over data-parallel ranks) in a buffer, so the update uses the whole
step's load; bias and counts are router buffers and travel in checkpoints.
Logged per MoE layer ``moe<i>`` (index among the model's MoE layers, as ``callbacks.stability``):
``balancing/moe<i>/bias_min``, ``balancing/moe<i>/bias_max``.

**Global-batch loss under gradient accumulation** (``moe.aux_loss=global_batch`` with
``trainer.accumulate_grad_batches = A > 1``): the routing pre-pass of :mod:`rmoe.accumulation`, which
makes the step's gradient exactly that of one forward over the global batch. At the first training
batch of each window (``batch_idx % A == 0``; ``M = min(A, batches left in the epoch)`` micro-batches —
the epoch's last window may be shorter, Lightning steps on it too) the callback reads the window's
other ``M - 1`` batches from the fit loop's batch iterator before Lightning fetches them (a look-ahead
wrapper on that iterator: the very batches the loop then trains on, sampled and augmented once),
moves them to the device as the loop does, runs ``pl_module.training_forward(batch)`` — the forward
``training_step`` runs, which the module must define — for each under the precision plugin's
train-step context, and hands each micro-batch its window (:meth:`AccumulationWindow.begin` in
``on_train_batch_start``, ``end`` in ``on_train_batch_end``: keep this callback before callbacks whose
``on_train_batch_end`` draws random numbers or writes checkpoints; Lightning puts ``ModelCheckpoint``
last). Refused before training (:func:`check_global_batch_accumulation`, a :class:`rmoe.ConfigError`
naming the keys): a strategy other than single-device or DDP, a module without ``training_forward``, a
``training_step`` that takes ``dataloader_iter``.

**Global-batch loss, Megatron-Core's rule** (``moe.global_batch_mode=megatron``, SPEC §2): no pre-pass; each
router keeps the running counts of the step's micro-batches in buffers, which this callback clears after every
optimizer step (``reset_global_batch_counts``, as Megatron-Core's ``finalize_model_grads``).

A checkpoint written between two micro-batches of a window (Lightning's and this project's checkpoint
callbacks write after optimizer steps; this is for explicit saves): with one process and a train
loader whose position is checkpointed (``state_dict``), the callback's state holds the window's global
counts, the random-number states of its remaining micro-batches and the batches it had read ahead
(which the loader's saved position counts as consumed); the resumed run trains the remaining
micro-batches on the same batches, random numbers and ``f_e``. (Lightning does not checkpoint the
gradients the earlier micro-batches had accumulated, for any loss: that one step is not the
uninterrupted run's.) Any other resume inside a window is refused at its first batch.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
from lightning.pytorch.utilities.signature_utils import is_param_in_hook_signature

from callbacks.contract import TrainingForward
from callbacks.lightning_internals import (
    as_training_step_sees_it,
    check_lightning_version,
    fetcher_iterator,
    prefetch_fetcher,
    prefetched_batches,
    set_fetcher_iterator,
    train_dataloaders,
)
from rmoe import ConfigError, find_moe_layers
from rmoe.accumulation import (
    AccumulationWindow,
    global_batch_layers,
    megatron_global_batch_layers,
    open_window,
    resume_window,
)
from rmoe.losses import WINDOW_REQUIRED


def check_global_batch_accumulation(trainer: L.Trainer, pl_module: L.LightningModule) -> None:
    """What the routing pre-pass needs when a layer's aux loss is ``global_batch`` and
    ``accumulate_grad_batches > 1``; raises :class:`rmoe.ConfigError` naming the keys otherwise."""
    acc = max(int(trainer.accumulate_grad_batches), 1)
    if acc == 1 or not global_batch_layers(pl_module):
        return
    with_acc = f"with moe.aux_loss='global_batch' and trainer.accumulate_grad_batches={acc}"
    strategy = trainer.strategy
    if not isinstance(strategy, (SingleDeviceStrategy, DDPStrategy)) or type(strategy).__name__ == "DeepSpeedStrategy":
        raise ConfigError(
            f"invalid config: trainer.strategy={type(strategy).__name__} {with_acc} (the routing pre-pass runs the "
            "module's own forward, unwrapped); allowed: a single-device or DDP strategy, or "
            "trainer.accumulate_grad_batches=1")
    if not isinstance(pl_module, TrainingForward):  # callbacks.contract
        raise ConfigError(
            f"invalid config: {type(pl_module).__name__} has no training_forward(batch) {with_acc} (the routing "
            "pre-pass runs the forward training_step runs on each micro-batch of the window); allowed: a module "
            "that defines training_forward, or trainer.accumulate_grad_batches=1")
    if is_param_in_hook_signature(pl_module.training_step, "dataloader_iter", explicit=True):
        raise ConfigError(
            f"invalid config: training_step(dataloader_iter) {with_acc} (the routing pre-pass reads the window's "
            "batches ahead from Lightning's batch fetcher); allowed: training_step(batch, batch_idx), or "
            "trainer.accumulate_grad_batches=1")


class _LookAhead(Iterator):
    """The fit loop's batch iterator, readable ahead: :meth:`peek` pulls items into ``buffer``, which
    ``next`` serves first."""

    def __init__(self, source: Iterator) -> None:
        self.source, self.buffer, self.exhausted = source, [], False

    def __next__(self) -> Any:
        if self.buffer:
            return self.buffer.pop(0)
        if self.exhausted:
            raise StopIteration
        try:
            return next(self.source)
        except StopIteration:
            self.exhausted = True
            raise

    def peek(self, n: int) -> list[Any]:
        while len(self.buffer) < n and not self.exhausted:
            try:
                self.buffer.append(next(self.source))
            except StopIteration:
                self.exhausted = True
        return self.buffer[:n]


class BalancingCallback(Callback):
    def __init__(self, log: bool = True):
        self.log = log
        self.updates = 0
        self._layers: list[Any] = []          # MoE layers with the global_batch loss (set at train start)
        self._window: AccumulationWindow | None = None
        self._window_at: tuple[int, int] | None = None  # (epoch, batch_idx of the window's first micro-batch)
        self._next = 0                        # the window's next micro-batch to begin
        self._fetcher: Any = None             # the fit loop's batch fetcher (callbacks.lightning_internals)
        self._stateful_loader = False
        self._resume: dict[str, Any] | None = None

    @staticmethod
    def layers(pl_module: L.LightningModule) -> list[tuple[str, Any]]:
        """``(moe<i>, router)`` for every MoE layer whose router has ``update_bias``."""
        return [(f"moe{i}", m.router) for i, (_, m) in enumerate(find_moe_layers(pl_module))
                if callable(getattr(m.router, "update_bias", None))]

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            check_lightning_version()
            check_global_batch_accumulation(trainer, pl_module)

    @staticmethod
    def _num_batches(trainer: L.Trainer) -> int:
        n = trainer.num_training_batches
        return int(n) if n != float("inf") else 0

    def step_ends(self, trainer: L.Trainer, batch_idx: int) -> bool:
        """True when an optimizer step was taken after training batch ``batch_idx``."""
        acc = max(int(trainer.accumulate_grad_batches), 1)
        return (batch_idx + 1) % acc == 0 or batch_idx + 1 == self._num_batches(trainer)

    # --- global_batch under gradient accumulation ------------------------------------------------
    def _accumulating(self, trainer: L.Trainer) -> bool:
        return bool(self._layers) and max(int(trainer.accumulate_grad_batches), 1) > 1

    def _arm(self, on: bool) -> None:
        for m in self._layers:
            m.router.global_batch_window = WINDOW_REQUIRED if on else None

    def _look_ahead(self, trainer: L.Trainer) -> tuple[Any, _LookAhead]:
        fetcher = prefetch_fetcher(trainer)
        if not isinstance(fetcher_iterator(fetcher), _LookAhead):  # a new iterator each epoch
            set_fetcher_iterator(fetcher, _LookAhead(fetcher_iterator(fetcher)))
        self._fetcher = fetcher
        return fetcher, fetcher_iterator(fetcher)

    def _read_ahead(self, trainer: L.Trainer, n: int) -> list[Any]:
        """The next ``n`` raw items ``(batch, batch_idx, dataloader_idx)`` the fit loop will fetch (fewer at
        the end of the data): those the fetcher already prefetched, then read ahead from its iterator."""
        if n <= 0:
            return []
        fetcher, ahead = self._look_ahead(trainer)
        items = prefetched_batches(fetcher)[:n]
        return items + ahead.peek(n - len(items))

    @staticmethod
    def _forwards(trainer: L.Trainer, pl_module: L.LightningModule, batches: list[Any]) -> list[Any]:
        def run(batch: Any) -> None:
            with trainer.precision_plugin.train_step_context():
                pl_module.training_forward(batch)

        return [functools.partial(run, b) for b in batches]

    def _open(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int, acc: int) -> None:
        total = trainer.num_training_batches
        size = acc if total == float("inf") else max(1, min(acc, int(total) - batch_idx))
        ahead = self._read_ahead(trainer, size - 1)
        batches = [batch] + [as_training_step_sees_it(trainer, pl_module, item[0]) for item in ahead]
        self._window = open_window(pl_module, self._forwards(trainer, pl_module, batches), device=pl_module.device)
        self._window_at = (int(trainer.current_epoch), batch_idx)

    def _open_resumed(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        state, self._resume = self._resume, None
        at = (int(state["epoch"]), int(state["start"]) + int(state["next"]))
        if at != (int(trainer.current_epoch), batch_idx):
            raise RuntimeError(f"global_batch accumulation: the checkpoint's window continues at (epoch, batch) {at} "
                               f"but training resumed at {(int(trainer.current_epoch), batch_idx)}")
        first, size = int(state["next"]), int(state["size"])
        ahead = self._read_ahead(trainer, size - first - 1)
        batches = [batch] + [as_training_step_sees_it(trainer, pl_module, item[0]) for item in ahead]
        self._window = resume_window(pl_module, self._forwards(trainer, pl_module, batches), state["counts"], size,
                                     int(state["world"]), first, [tuple(s) for s in state["rng"]],
                                     device=pl_module.device)
        self._window_at = (int(state["epoch"]), int(state["start"]))

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._layers = global_batch_layers(pl_module)
        self._window, self._window_at, self._next = None, None, 0
        loaders = train_dataloaders(trainer)
        self._stateful_loader = bool(loaders) and all(callable(getattr(dl, "state_dict", None)) and
                                                      callable(getattr(dl, "load_state_dict", None)) for dl in loaders)
        self._arm(self._accumulating(trainer))
        if self._resume is not None and self._accumulating(trainer):
            fetcher, ahead = self._look_ahead(trainer)
            if prefetched_batches(fetcher):  # prefetched before this hook: the read-ahead batches cannot go first
                raise RuntimeError("global_batch accumulation: cannot resume inside an accumulation window with a "
                                   "train loader without a length (Lightning prefetched a batch before the window's "
                                   "saved batches could be put back); resume from a checkpoint written after an "
                                   "optimizer step")
            ahead.buffer[:0] = list(self._resume["pending"])
        elif self._resume is not None:
            self._resume = None

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if not self._layers:
            return
        acc = max(int(trainer.accumulate_grad_batches), 1)
        if acc == 1:  # (a GradientAccumulationScheduler may change it between epochs)
            self._window = None
            self._arm(False)
            return
        epoch, start = int(trainer.current_epoch), batch_idx - batch_idx % acc
        if self._resume is not None:
            self._open_resumed(trainer, pl_module, batch, batch_idx)
        elif batch_idx == start:
            self._open(trainer, pl_module, batch, batch_idx, acc)
        if self._window is None or self._window_at != (epoch, start):
            raise RuntimeError(
                f"global_batch accumulation: no routing pre-pass for training batch {batch_idx} of epoch {epoch} (its "
                f"window starts at batch {start}): training resumed inside an accumulation window from a checkpoint "
                "without the window's state (saved only by one process with a train loader whose position is "
                "checkpointed); resume from a checkpoint written after an optimizer step")
        self._window.begin(batch_idx - start)
        self._next = batch_idx - start + 1

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._window, self._window_at = None, None
        self._arm(False)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._arm(False)

    def state_dict(self) -> dict[str, Any]:
        """The open accumulation window when the checkpoint is written between two of its micro-batches
        (module docstring), else ``{"window": None}``."""
        w = self._window
        if w is None or self._next >= w.size or w.world != 1 or not self._stateful_loader or self._fetcher is None:
            return {"window": None}
        prefetched = prefetched_batches(self._fetcher)
        pending = prefetched + list(getattr(fetcher_iterator(self._fetcher), "buffer", []))
        if prefetched or len(pending) != w.size - self._next:
            return {"window": None}
        epoch, start = self._window_at
        return {"window": {"epoch": epoch, "start": start, "size": w.size, "next": self._next, "world": w.world,
                           "counts": [c.detach().cpu() for c in w.counts],
                           "rng": [tuple(s) for s in w.rng[self._next - w.first:]], "pending": pending}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._resume = state_dict.get("window")

    # --- every optimizer step --------------------------------------------------------------------
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        w = self._window
        if w is not None and w.current is not None:
            last = w.current == w.size - 1
            w.end(required=True)
            if last:
                self._window, self._window_at = None, None
        routers = self.layers(pl_module)
        running = megatron_global_batch_layers(pl_module)
        if not (routers or running) or not self.step_ends(trainer, batch_idx):
            return
        for m in running:
            m.router.reset_global_batch_counts()
        if not routers:
            return
        logged = {}
        for name, r in routers:
            r.update_bias()
            logged[f"balancing/{name}/bias_min"] = float(r.bias.min())
            logged[f"balancing/{name}/bias_max"] = float(r.bias.max())
        self.updates += 1
        if self.log:
            pl_module.log_dict(logged, on_step=True, on_epoch=False, batch_size=1)
