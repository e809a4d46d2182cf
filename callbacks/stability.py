"""Routing-stability metrics per MoE layer (SPEC §6), logged through ``pl_module.log`` so every
attached logger gets them, plus plots written into the run folder.

Keys (``<layer>`` is the MoE layer's index among the model's MoE layers, e.g. ``moe0``):

* training stream, every ``log_every_n_steps``: ``routing/<layer>/{load_cv, max_vio, load_entropy,
  dead_experts, active_experts, experts_per_token, no_expert_share, dropped_rate, router_entropy,
  router_confidence, aux_loss, z_loss, fusion_entropy}``;
* fixed probe batch, every ``probe_every_n_steps``: ``routing/<layer>/{top1_flip_rate, jaccard_churn,
  last_fluctuation_step, fusion_drift}`` (the top-1 is the expert the router selects first: by the
  probabilities, or by the biased scores ``s + b`` of the loss-free router);
* validation pass: ``routing/<layer>/{val_dead_experts, val_load_cv, domain_js}`` (domain_js when
  there are several validation dataloaders, e.g. DomainBed domains).

Route trace (``route_trace: true``): at every probe the probe tokens' expert indices per layer are
written to ``<run>/route_trace/step_<step>.npz`` (``route_trace_dir`` to change the folder; format,
reader and OLMoE's router saturation in :mod:`callbacks.route_trace`).

Plots (:mod:`callbacks.plots`, from :meth:`RoutingStabilityCallback.series`, the history that
``summary.json`` keeps too): written to ``<run>/plots/*.png`` and sent to every image-capable
logger (W&B ``log_image``, TensorBoard ``add_image``) after every validation, and once more at
the end of training if steps were taken since; titled with ``info`` (task, method, variant, seed).

Token counts are summed over data-parallel ranks before the statistics are computed.

Lightning writes every ``on_step`` value logged from a callback hook again at each later step of the
same epoch (the last value, until it is logged anew), so between two probes the CSV repeats the last
probe's values. The values logged this epoch are checkpointed; a run resumed mid-epoch logs them
once more at its first step, so its rows are those of the uninterrupted run.
"""

from __future__ import annotations

import copy
import logging
import os
import re
from collections.abc import Mapping
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from callbacks.contract import DomainEvalData, LambdaReader, RoutingProbe
from callbacks.curriculum import CurriculumCallback
from callbacks.plots import close_figures, draw_routing_plots, render_figures, save_images, send_to_loggers
from callbacks.route_trace import write_step
from rmoe import find_moe_layers
from rmoe import metrics as M


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, Tensor):
        return obj.detach().cpu().clone()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return copy.deepcopy(obj)


def _to_device(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_device(v, device) for v in obj)
    return obj


def run_probe(pl_module: LightningModule, batch: Any) -> None:
    """Forward the probe batch through the model (no grad, eval mode).

    Uses ``pl_module.routing_probe(batch)`` when the module is a :class:`callbacks.contract.RoutingProbe`, else
    ``pl_module(batch)``.
    """
    if isinstance(pl_module, RoutingProbe):
        pl_module.routing_probe(batch)
    else:
        pl_module(batch)


class RoutingStabilityCallback(Callback):
    """``plots``: draw the routing plots (``plot_dir``, default ``<run>/plots``) after every
    validation and send them to the image-capable loggers; ``info``: the run identity that titles
    them (``task``, ``method``, ``variant``, ``seed``)."""

    def __init__(self, log_every_n_steps: int | None = None, probe_every_n_steps: int = 50,
                 probe_size: int = 64, plots: bool = True, plot_dir: str | None = None,
                 info: Mapping[str, Any] | None = None,
                 route_trace: bool = False, route_trace_dir: str | None = None):
        if probe_every_n_steps < 1:
            raise ValueError(f"probe_every_n_steps={probe_every_n_steps}; allowed: an integer >= 1")
        self.log_every_n_steps = log_every_n_steps
        self.probe_every_n_steps = probe_every_n_steps
        self.probe_size = probe_size
        self.plots = plots
        self.plot_dir = plot_dir
        self.route_trace = bool(route_trace)
        self.route_trace_dir = route_trace_dir
        self.info = dict(info or {})
        self._plotted_step: int | None = None
        self.plot_write_errors: list[dict[str, Any]] = []  # {step, plot_dir, error} of plot writes that failed
        self._reset_state()

    def _reset_state(self) -> None:
        self.probe_batch: Any = None
        self.prev_top1: dict[str, Tensor] = {}
        self.prev_sets: dict[str, Tensor] = {}
        self.prev_pi: dict[str, Tensor] = {}
        self.last_fluctuation: dict[str, int] = {}
        self.history: dict[str, Any] = {"step": [], "lambda": [], "phase": [], "load": {}, "pi": {}, "probe": {},
                                        "active": {}}
        self._val_counts: dict[str, dict[int, Tensor]] = {}
        # on_step values logged this epoch ({key: value}, epoch) and, after a resume, those to log again
        self._epoch_logged: dict[str, float] = {}
        self._epoch_logged_epoch: int | None = None
        self._replay: tuple[int | None, dict[str, float]] | None = None

    # --- helpers -------------------------------------------------------------------------------
    @staticmethod
    def _layers(pl_module: LightningModule) -> list[tuple[str, Any]]:
        return [(f"moe{i}", m) for i, (_, m) in enumerate(find_moe_layers(pl_module))]

    @staticmethod
    def _domain_rows(trainer: Trainer, n: int) -> list[dict[str, Any]]:
        """What the ``n`` validation sets are: ``{name, split, test}`` from the datamodule's
        ``eval_names`` (``env<i>_<split>``), ``environments`` and ``test_envs`` when it has them."""
        dm = getattr(trainer, "datamodule", None)
        domains = isinstance(dm, DomainEvalData)  # callbacks.contract: optional, DomainBed's datamodule
        names = list(dm.eval_names or []) if domains else []
        envs = list(dm.environments or []) if domains else []
        test = {int(t) for t in dm.test_envs or []} if domains else set()
        rows = []
        for k in range(n):
            name = names[k] if k < len(names) else f"set {k}"
            m = re.fullmatch(r"env(\d+)_(\w+)", name)
            if m and int(m[1]) < len(envs):
                rows.append({"name": str(envs[int(m[1])]), "split": m[2], "test": int(m[1]) in test})
            else:
                rows.append({"name": name, "split": None, "test": False})
        return rows

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.history["layers"] = {f"moe{i}": name for i, (name, _) in enumerate(find_moe_layers(pl_module))}
        curriculum = next((cb for cb in trainer.callbacks if isinstance(cb, CurriculumCallback)), None)
        if curriculum is not None:  # λ is drawn from the schedule over the whole run
            self.history["schedule"] = curriculum.schedule_record(trainer)

    @staticmethod
    def _reduce_sum(trainer: Trainer, t: Tensor) -> Tensor:
        if trainer.world_size > 1:
            return trainer.strategy.reduce(t.clone(), reduce_op="sum")
        return t

    def _log(self, pl_module: LightningModule, key: str, value: float) -> None:
        # one set of arguments for every key, the replay after a resume included (Lightning refuses a key logged
        # twice in one hook with different arguments); the values are global (counts summed over the ranks, one
        # probe batch), so syncing them under DDP averages equal numbers
        trainer = pl_module._trainer
        sync = trainer is not None and trainer.world_size > 1
        pl_module.log(key, float(value), on_step=True, on_epoch=False, logger=True, batch_size=1, sync_dist=sync)
        epoch = int(pl_module.trainer.current_epoch) if pl_module._trainer is not None else None
        if epoch != self._epoch_logged_epoch:
            self._epoch_logged, self._epoch_logged_epoch = {}, epoch
        self._epoch_logged[key] = float(value)

    def _replay_after_resume(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Log again the values the interrupted run had logged in this epoch (see the module docstring)."""
        epoch, values = self._replay
        self._replay = None
        if epoch is not None and epoch == int(trainer.current_epoch):
            for k, v in values.items():
                self._log(pl_module, k, v)

    # --- training stream -----------------------------------------------------------------------
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if self.probe_batch is None:
            self.probe_batch = self._slice(_to_cpu(batch))
            if trainer.world_size > 1:  # one probe batch for all data-parallel ranks: rank 0's
                self.probe_batch = trainer.strategy.broadcast(self.probe_batch, src=0)

    def _slice(self, batch: Any) -> Any:
        n = self.probe_size
        if isinstance(batch, Tensor):
            return batch[:n]
        if isinstance(batch, dict):
            return {k: self._slice(v) for k, v in batch.items()}
        if isinstance(batch, (list, tuple)):
            return type(batch)(self._slice(v) for v in batch)
        return batch

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        every = self.log_every_n_steps or trainer.log_every_n_steps or 50
        layers = self._layers(pl_module)
        if not layers:
            return
        if self._replay is not None:
            self._replay_after_resume(trainer, pl_module)
        if step % every == 0 or step == 1:
            self._log_stream(trainer, pl_module, layers, step)
        if step % self.probe_every_n_steps == 0 or step == 1:
            self._probe(trainer, pl_module, layers, step)

    def _log_stream(self, trainer: Trainer, pl_module: LightningModule, layers, step: int) -> None:
        self.history["step"].append(step)
        self.history["lambda"].append(float(pl_module.lambda_aux) if isinstance(pl_module, LambdaReader)
                                      else float("nan"))
        self.history["phase"].append(next((cb.phase for cb in trainer.callbacks if isinstance(cb, CurriculumCallback)),
                                          None))
        for name, moe in layers:
            rec = moe.last_routing
            if rec is None:
                continue
            counts = self._reduce_sum(trainer, rec.tokens_per_expert.detach().double())
            vals = M.record_metrics(rec.replace(tokens_per_expert=counts), moe.cfg.top_k)
            mask = getattr(getattr(moe, "router", None), "expert_mask", None)
            if mask is not None and "active_experts" in vals:  # the pool now, after this step's adaptation: the
                vals["active_experts"] = float(mask.bool().sum())  # value callbacks.adaptive_experts logs too
            for k, v in vals.items():
                self._log(pl_module, f"routing/{name}/{k}", v)
            tot = counts.sum().clamp_min(1)
            self.history["load"].setdefault(name, []).append((counts / tot).cpu().tolist())
            self.history.setdefault("active", {}).setdefault(name, []).append(
                rec.active_mask.detach().cpu().bool().tolist())
            if moe.fusion is not None:
                self.history["pi"].setdefault(name, []).append(moe.fusion.pi.detach().cpu().tolist())

    @torch.no_grad()
    def _probe(self, trainer: Trainer, pl_module: LightningModule, layers, step: int) -> None:
        if self.probe_batch is None:
            return
        # the probe must not change any state: snapshot buffers (fusion m, DynMoE records)
        saved = {name: {k: v.clone() for k, v in moe.named_buffers()} for name, moe in layers}
        last = {name: moe.last_routing for name, moe in layers}
        was_training = pl_module.training
        pl_module.eval()
        try:
            run_probe(pl_module, _to_device(self.probe_batch, pl_module.device))
            for name, moe in layers:
                rec = moe.last_routing
                # the top-1 the router selects by: the biased s + b for the loss-free router
                scores = rec.selection_scores if rec.selection_scores is not None else rec.router_probs
                top1 = scores.masked_fill(~rec.active_mask, float("-inf")).argmax(-1)
                sets = rec.expert_indices
                out = {}
                if name in self.prev_top1 and self.prev_top1[name].shape == top1.shape:
                    flips = self._reduce_sum(trainer, (self.prev_top1[name].to(top1.device) != top1).sum().double())
                    n = self._reduce_sum(trainer, torch.tensor(float(top1.numel()), device=top1.device))
                    out["top1_flip_rate"] = float(flips / n.clamp_min(1))
                    prev = self.prev_sets[name].to(sets.device)
                    k = max(sets.shape[1], prev.shape[1])
                    a = torch.nn.functional.pad(prev, (0, k - prev.shape[1]), value=-1)
                    b = torch.nn.functional.pad(sets, (0, k - sets.shape[1]), value=-1)
                    # token-weighted mean over the ranks' probe tokens, as the flip rate
                    churn = M.jaccard_churn(a, b, moe.max_experts) * a.shape[0]
                    churn = self._reduce_sum(trainer, torch.tensor(churn, dtype=torch.float64, device=top1.device))
                    out["jaccard_churn"] = float(churn / n.clamp_min(1))
                    if out["top1_flip_rate"] > 0:
                        self.last_fluctuation[name] = step
                self.prev_top1[name], self.prev_sets[name] = top1.cpu(), sets.cpu()
                out["last_fluctuation_step"] = float(self.last_fluctuation.get(name, 0))
                if moe.fusion is not None:
                    pi = moe.fusion.pi.detach().cpu()
                    if name in self.prev_pi:
                        out["fusion_drift"] = M.fusion_drift(pi, self.prev_pi[name])
                    self.prev_pi[name] = pi
                for k, v in out.items():
                    self._log(pl_module, f"routing/{name}/{k}", v)
                self.history["probe"].setdefault(name, []).append((step, out.get("top1_flip_rate"),
                                                                   out.get("jaccard_churn")))
            if self.route_trace and trainer.is_global_zero:
                self._write_route_trace(trainer, step, {n: m.last_routing.expert_indices for n, m in layers})
        finally:
            for name, moe in layers:
                for k, v in moe.named_buffers():
                    v.copy_(saved[name][k])
                moe.last_routing = last[name]
            pl_module.train(was_training)

    def _write_route_trace(self, trainer: Trainer, step: int, indices: dict[str, Tensor]) -> None:
        write_step(self.route_trace_dir or os.path.join(trainer.default_root_dir, "route_trace"), step, indices)

    # --- validation --------------------------------------------------------------------------
    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._val_counts = {}

    def on_validation_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        for name, moe in self._layers(pl_module):
            rec = moe.last_routing
            if rec is None:
                continue
            per = self._val_counts.setdefault(name, {})
            c = rec.tokens_per_expert.detach().double().cpu()
            per[dataloader_idx] = per.get(dataloader_idx, torch.zeros_like(c)) + c

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking:
            return
        for name, moe in self._layers(pl_module):
            per = self._val_counts.get(name)
            if not per:
                continue
            loads = torch.stack([per[i] for i in sorted(per)])
            loads = self._reduce_sum(trainer, loads.to(pl_module.device)).cpu()
            total = loads.sum(0)
            active = moe.router.active_mask.detach().cpu()
            vals = {"val_dead_experts": M.dead_experts(total, active), "val_load_cv": M.load_cv(total, active)}
            if loads.shape[0] > 1:
                vals["domain_js"] = M.mean_pairwise_js(loads[:, active] + 0.0)
                self.history.setdefault("domain_loads", {})[name] = loads.tolist()
                self.history["domain_rows"] = self._domain_rows(trainer, loads.shape[0])
            for k, v in vals.items():
                pl_module.log(f"routing/{name}/{k}", float(v), on_step=False, on_epoch=True, batch_size=1)
        if self.plots and trainer.is_global_zero and trainer.state.fn == "fit":
            self._write_plots(trainer)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # the last validation drew the final history unless steps were taken after it
        if self.plots and trainer.is_global_zero and self._plotted_step != int(trainer.global_step):
            self._write_plots(trainer)

    # --- plots ---------------------------------------------------------------------------------
    def series(self) -> dict[str, Any]:
        """The history as plain JSON data (``summary.json``'s ``series``; what the plots draw)."""
        h = self.history
        out = {k: copy.deepcopy(v) for k, v in h.items() if k != "probe"}
        out["probe"] = {n: [list(p) for p in v] for n, v in h.get("probe", {}).items()}
        return out

    def _write_plots(self, trainer: Trainer) -> dict[str, str]:
        """Draw the plots, write the PNGs and send them to the image-capable loggers."""
        out_dir = self.plot_dir or os.path.join(trainer.default_root_dir, "plots")
        figs = draw_routing_plots(self.series(), self.info)
        try:
            images = render_figures(figs)
        finally:
            close_figures(figs)
        try:
            paths = save_images(images, out_dir)
        except OSError as e:  # a full disk or a bad plot_dir must not end the run: warn, record, go on
            self.plot_write_errors.append({"step": int(trainer.global_step), "plot_dir": out_dir,
                                           "error": f"{type(e).__name__}: {e}"})
            msg = (f"routing plots not written to {out_dir} at step {trainer.global_step} ({type(e).__name__}: {e}); "
                   "training goes on (redraw later: python -m tasks.plots <run>)")
            logging.getLogger(__name__).warning(msg)  # in the run's log
            rank_zero_warn(msg)
            return {}
        if images:
            send_to_loggers(trainer.loggers, images, paths, int(trainer.global_step))
        self._plotted_step = int(trainer.global_step)
        return paths

    # --- resume --------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "probe_batch": self.probe_batch,
            "prev_top1": self.prev_top1,
            "prev_sets": self.prev_sets,
            "prev_pi": self.prev_pi,
            "last_fluctuation": self.last_fluctuation,
            "history": self.history,
            "epoch_logged": dict(self._epoch_logged),
            "epoch_logged_epoch": self._epoch_logged_epoch,
        }

    def load_state_dict(self, state: dict) -> None:
        self.probe_batch = state["probe_batch"]
        self.prev_top1 = state["prev_top1"]
        self.prev_sets = state["prev_sets"]
        self.prev_pi = state["prev_pi"]
        self.last_fluctuation = state["last_fluctuation"]
        self.history = state["history"]
        self._epoch_logged = dict(state.get("epoch_logged", {}))
        self._epoch_logged_epoch = state.get("epoch_logged_epoch")
        self._replay = (self._epoch_logged_epoch, dict(self._epoch_logged))
