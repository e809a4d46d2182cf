"""DomainBed LightningModule: a ViT with MoE blocks trained ERM-style over the training domains.

Step: ``x, y`` = the concatenated batches of all training domains;
``loss = CE(f(x), y) + λ · block_weight · Σ_layers aux + z_loss_weight · Σ_layers z``
(SPEC §2, :class:`tasks.run.moe_module.MoEModule`; λ is set every optimizer step by
``callbacks.curriculum`` through ``set_lambda``; vision uses ``block_weight = 0.01``). Optimiser:
Adam (SPEC §5), constant learning rate.

Evaluation over the datamodule's ``[env_i in..., env_i out...]`` loaders: accuracy per loader,
logged as ``val/env{i}_{in,out}_acc``; ``val/score`` = mean ``out`` accuracy of the training
domains (training-domain validation), ``val/score_best`` its running max (a buffer, survives
resume). The last evaluation is kept in ``self.last_eval`` for ``callbacks.domainbed_results``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from tasks.run.moe_module import MoEModule, fused_if_supported

from .model import build_moe_vit


class DomainBedModule(MoEModule):
    """Every argument stated in ``conf/module/domainbed.yaml`` is required here: its value has one home, that
    file (the task file for the data-dependent ones, the protocol for ``block_weight``); ``adam_betas``, which
    no config file states, keeps its default here (Adam's)."""

    def __init__(self, backbone: Mapping[str, Any], input_shape: Sequence[int], num_classes: int,
                 moe: Mapping[str, Any] | None, backend: str, algorithm: str, lr: float, weight_decay: float,
                 block_weight: float, z_loss_weight: float, num_threads: int | None,
                 adam_betas: Sequence[float] = (0.9, 0.999)):
        super().__init__(lr=lr, weight_decay=weight_decay, block_weight=block_weight, z_loss_weight=z_loss_weight)
        self.save_hyperparameters()
        if not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"invalid module.num_classes={num_classes!r}; allowed: an integer >= 2")
        if num_threads is not None and (not isinstance(num_threads, int) or num_threads < 1):
            raise ValueError(f"invalid module.num_threads={num_threads!r}; allowed: an integer >= 1 or null")
        self.num_threads = num_threads
        self.model, self.moe_layers = build_moe_vit(backbone, moe, input_shape, num_classes, backend)
        self.algorithm = algorithm
        self.last_eval: dict[str, float] = {}
        self._correct: dict[int, Tensor] = {}
        self._total: dict[int, Tensor] = {}

    def setup(self, stage: str) -> None:
        """The data must match the classifier built from the config (fails before training);
        ``num_threads`` sets torch's intra-op CPU threads (small models run fastest with 1)."""
        if self.num_threads is not None:
            torch.set_num_threads(self.num_threads)
        data = getattr(getattr(self.trainer, "datamodule", None), "data", None) if self._trainer else None
        if data is None:
            return
        if data.num_classes != self.hparams.num_classes:
            raise ValueError(f"module.num_classes={self.hparams.num_classes} but the {type(data).__name__} data "
                             f"has {data.num_classes} classes")
        if tuple(data.input_shape) != tuple(self.hparams.input_shape):
            raise ValueError(f"module.input_shape={list(self.hparams.input_shape)} but the "
                             f"{type(data).__name__} data has images of shape {list(data.input_shape)}")

    # --- forward / training -------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def routing_probe(self, batch: Any) -> None:
        """Forward the images of a (training or evaluation) batch; used by the stability callback."""
        x = torch.cat([b[0] for b in batch]) if isinstance(batch[0], (list, tuple)) else batch[0]
        self.model(x.to(self.device))

    def training_forward(self, batch: list[tuple[Tensor, Tensor]]) -> Tensor:
        """The forward of :meth:`training_step`: all training domains' images in one batch (also the
        global-batch routing pre-pass's)."""
        return self.model(torch.cat([b[0] for b in batch]))

    def training_step(self, batch: list[tuple[Tensor, Tensor]], batch_idx: int) -> Tensor:
        y = torch.cat([b[1] for b in batch])
        logits = self.training_forward(batch)
        task_loss = F.cross_entropy(logits, y)
        loss, aux, z = self.moe_loss(task_loss, self.model)
        acc = (logits.argmax(-1) == y).float().mean()
        self.log("train/loss", loss.detach(), on_step=True, on_epoch=False, batch_size=len(y), prog_bar=True)
        self.log_dict({"train/task_loss": task_loss.detach(), "train/aux_loss": aux.detach(),
                       "train/z_loss": z.detach(), "train/acc": acc},
                      on_step=True, on_epoch=False, batch_size=len(y), prog_bar=False)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        hp = self.hparams
        params = list(self.parameters())
        return torch.optim.Adam(params, lr=float(hp.lr), weight_decay=float(hp.weight_decay),
                                betas=tuple(float(b) for b in hp.adam_betas), **fused_if_supported(params))

    # --- evaluation ---------------------------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        self._correct, self._total = {}, {}

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        x, y = batch
        pred = self.model(x).argmax(-1)
        c = (pred == y).sum().detach()
        self._correct[dataloader_idx] = self._correct.get(dataloader_idx, 0) + c
        self._total[dataloader_idx] = self._total.get(dataloader_idx, 0) + torch.tensor(len(y), device=c.device)

    def _eval_names(self) -> list[str]:
        dm = getattr(self.trainer, "datamodule", None)
        names = getattr(dm, "eval_names", None)
        return list(names) if names else [f"loader{i}" for i in sorted(self._total)]

    def _test_envs(self) -> list[int]:
        return list(getattr(getattr(self.trainer, "datamodule", None), "test_envs", []))

    def on_validation_epoch_end(self) -> None:
        if not self._total:
            return
        names = self._eval_names()
        accs: dict[str, float] = {}
        for i in sorted(self._total):
            c = self.trainer.strategy.reduce(torch.as_tensor(self._correct[i], device=self.device).double(),
                                             reduce_op="sum")
            t = self.trainer.strategy.reduce(torch.as_tensor(self._total[i], device=self.device).double(),
                                             reduce_op="sum")
            accs[f"{names[i]}_acc"] = float(c / t.clamp_min(1))
        test_envs = set(self._test_envs())
        outs = [v for k, v in accs.items() if k.endswith("_out_acc") and int(k[3:].split("_")[0]) not in test_envs]
        score = sum(outs) / len(outs) if outs else float("nan")
        self.last_eval = accs
        if self.trainer.sanity_checking:
            return
        logged = {f"val/{k}": v for k, v in accs.items()}
        logged["val/score_best"] = self.update_best_score(score)
        self.log("val/score", score, on_step=False, on_epoch=True, batch_size=1, prog_bar=True)
        self.log_dict(logged, on_step=False, on_epoch=True, batch_size=1)

