"""GLUE LightningModule: a Hugging Face encoder with MoE FFNs, a classification/regression head.

Loss (:class:`tasks.run.moe_module.MoEModule`): ``task_loss + λ · block_weight · Σ_layers aux +
z_loss_weight · Σ_layers z`` where ``task_loss`` is cross-entropy (MSE for STS-B) and λ is set every
step by the curriculum callback (``set_lambda``). Optimiser: AdamW, linear decay to 0 over the
planned steps, optional warm-up (SPEC §5: weight decay 0, no warm-up). Logged:
``train/{loss,task_loss,aux_loss,z_loss}``, ``val/loss``, ``val/<metric>``, ``val/score``
(headline, see :mod:`tasks.glue.metrics`) and ``val/score_best`` (its running max, a buffer so it
survives resume); for MNLI the mismatched split is logged under ``val_mismatched/``.

``freeze_layers = n > 0``: the embeddings and encoder layers ``0..n-1`` are a fixed feature extractor
(no gradient, not in the optimizer, always in eval mode: no dropout), and the forward runs them, then
layers ``n..`` itself. ``cache_frozen``: during ``fit``, the output of that frozen prefix is kept per
example (the data module's ``row`` ids) and reused in later epochs and validations instead of being
recomputed; the result is the same up to float rounding (pad positions are never attended to, and
the MoE layers skip them through the attention mask), the cost of the frozen layers is paid once.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.masking_utils import create_bidirectional_mask

from callbacks.run_summary import RunSummaryCallback
from rmoe import moefy_bert
from tasks.run.common import split_moe_config
from tasks.run.console import dev_summary
from tasks.run.models import build_hf_encoder, linear_decay
from tasks.run.moe_module import MoEModule, fused_if_supported

from .metrics import build_metrics, predictions, with_headline
from .tasks import get_task


class GLUEModule(MoEModule):
    """``backbone``: ``{pretrained, config, ...}`` (see ``conf/backbone``); ``moe``: the ``moe``
    config group (``layers``, ``init`` and the :class:`rmoe.MoEConfig` fields, None for the dense model);
    ``backend``: ``torch|megablocks``. Every argument is required: their defaults have one home,
    ``conf/module/glue.yaml`` (and the protocol for ``block_weight``), which ``rmoe-train`` instantiates."""

    def __init__(self, task: str, backbone: Mapping[str, Any], moe: Mapping[str, Any] | None, backend: str,
                 heldout_samples: int | None, freeze_layers: int, lr: float, weight_decay: float,
                 warmup_ratio: float, adam_eps: float, block_weight: float, z_loss_weight: float,
                 classifier_dropout: float | None, cache_frozen: bool):
        super().__init__(lr=lr, weight_decay=weight_decay, block_weight=block_weight, z_loss_weight=z_loss_weight)
        self.save_hyperparameters()
        self.task = get_task(task)
        if not (0.0 <= warmup_ratio < 1.0):
            raise ValueError(f"invalid module.warmup_ratio={warmup_ratio!r}; allowed: a number in [0, 1)")
        self.encoder = build_hf_encoder(backbone.get("pretrained"), backbone.get("config"))
        layers, init, layer_cfg = split_moe_config(moe, backend)
        self.moe_layers = moefy_bert(self.encoder, layers, layer_cfg, init=init) if layer_cfg is not None else []
        self._freeze(int(freeze_layers), layers or [])
        if not isinstance(cache_frozen, bool) or (cache_frozen and not self._n_frozen):
            raise ValueError(f"invalid module.cache_frozen={cache_frozen!r} with "
                             f"module.freeze_layers={freeze_layers!r}; allowed: false, or true with freeze_layers >= 1 "
                             "(there is no frozen prefix to cache)")
        self.cache_frozen = cache_frozen
        self._frozen_cache: dict[int, Tensor] = {}  # row id -> frozen-prefix output [length, hidden]
        hidden = self.encoder.config.hidden_size
        drop = classifier_dropout if classifier_dropout is not None else self.encoder.config.hidden_dropout_prob
        self.head = nn.Sequential(nn.Dropout(drop), nn.Linear(hidden, self.task.num_labels))
        self.val_names = [s for s, _ in self.task.val_splits] + (["heldout"] if heldout_samples else [])
        self.val_metrics = nn.ModuleList([build_metrics(self.task) for _ in self.val_names])
        self._val_loss = [[0.0, 0] for _ in self.val_names]
        self._dev_scores: list[dict[str, Any]] = []  # this process's validations (the summary's fallback)
        # from_pretrained returns the encoder in eval mode and Lightning keeps submodule modes:
        # without this, dropout, routing noise, fusion updates and pool recording stay off in training
        self.train()

    def _freeze(self, n: int, moe_layers: list[int]) -> None:
        """Freeze the embeddings and encoder layers ``0..n-1`` (no gradients, not in the optimizer)."""
        blocks = self.encoder.encoder.layer
        self._n_frozen = 0
        if isinstance(n, bool) or not 0 <= n <= len(blocks):
            raise ValueError(f"invalid module.freeze_layers={n!r}; allowed: an integer in [0, {len(blocks)}]")
        if n == 0:
            return
        frozen_moe = [i for i in moe_layers if i < n]
        if frozen_moe:
            raise ValueError(f"invalid module.freeze_layers={n}: it would freeze the MoE layer(s) {frozen_moe} "
                             f"(moe.layers={list(moe_layers)}); allowed: <= {min(moe_layers)}")
        for mod in [self.encoder.embeddings, *blocks[:n]]:
            for p in mod.parameters():
                p.requires_grad_(False)
        self._n_frozen = n

    def train(self, mode: bool = True) -> GLUEModule:
        """The frozen prefix stays in eval mode (a fixed feature extractor: no dropout)."""
        super().train(mode)
        if getattr(self, "_n_frozen", 0):
            for mod in [self.encoder.embeddings, *self.encoder.encoder.layer[:self._n_frozen]]:
                mod.eval()
        return self

    # --- forward / losses -------------------------------------------------------------------
    def forward(self, batch: Mapping[str, Tensor]) -> Tensor:
        if self._n_frozen:
            return self.head(self._forward_after_frozen(batch))
        inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        out = self.encoder(**inputs)
        pooled = getattr(out, "pooler_output", None)
        if pooled is None:
            pooled = out.last_hidden_state[:, 0]
        return self.head(pooled)

    def _forward_after_frozen(self, batch: Mapping[str, Tensor]) -> Tensor:
        """The pooled output: the frozen prefix (or its cached output), then layers ``n..``."""
        enc, n = self.encoder, self._n_frozen
        attention_mask = batch["attention_mask"]
        hidden = self._frozen_prefix(batch)
        mask = create_bidirectional_mask(config=enc.config, inputs_embeds=hidden, attention_mask=attention_mask)
        token_mask = getattr(enc, "_rmoe_token_mask", None)  # the MoE layers route the real tokens only
        if token_mask is not None:
            token_mask.mask = attention_mask.bool()
        for layer in enc.encoder.layer[n:]:
            hidden = layer(hidden, mask)
        return enc.pooler(hidden) if getattr(enc, "pooler", None) is not None else hidden[:, 0]

    def _frozen_prefix(self, batch: Mapping[str, Tensor]) -> Tensor:
        enc, n = self.encoder, self._n_frozen
        ids, attention_mask = batch["input_ids"], batch["attention_mask"]
        rows = batch.get("row") if self.cache_frozen and self._trainer is not None \
            and self.trainer.state.fn == "fit" else None
        lengths = attention_mask.sum(1).tolist()
        cache = self._frozen_cache
        if rows is not None and all(int(r) in cache for r in rows.tolist()):
            hidden = ids.new_zeros((*ids.shape, enc.config.hidden_size), dtype=torch.float32)
            for i, (r, length) in enumerate(zip(rows.tolist(), lengths)):
                cached = cache[int(r)]
                if cached.shape[0] != length:
                    raise RuntimeError(f"frozen-prefix cache: row {int(r)} has {cached.shape[0]} tokens cached and "
                                       f"{length} in this batch (the data module's row ids must be unique per example)")
                hidden[i, :length] = cached
            return hidden
        with torch.no_grad():
            hidden = enc.embeddings(input_ids=ids, token_type_ids=batch.get("token_type_ids"))
            mask = create_bidirectional_mask(config=enc.config, inputs_embeds=hidden, attention_mask=attention_mask)
            for layer in enc.encoder.layer[:n]:
                hidden = layer(hidden, mask)
        if rows is not None:
            for i, (r, length) in enumerate(zip(rows.tolist(), lengths)):
                cache.setdefault(int(r), hidden[i, :length].clone())
        return hidden

    def task_loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        if self.task.is_regression:
            return F.mse_loss(logits.squeeze(-1).float(), labels.float())
        return F.cross_entropy(logits.float(), labels)

    def training_forward(self, batch: Mapping[str, Tensor]) -> Tensor:
        """The forward of :meth:`training_step` (also the global-batch routing pre-pass's)."""
        return self(batch)

    def training_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> Tensor:
        logits = self.training_forward(batch)
        task_loss = self.task_loss(logits, batch["labels"])
        loss, aux, z = self.moe_loss(task_loss, self.encoder)
        bs = batch["labels"].shape[0]
        self.log("train/loss", loss, on_step=True, on_epoch=False, batch_size=bs, prog_bar=True)
        self.log_dict({"train/task_loss": task_loss, "train/aux_loss": aux, "train/z_loss": z},
                      on_step=True, on_epoch=False, batch_size=bs, prog_bar=False)
        return loss

    def on_train_epoch_start(self) -> None:
        self._epoch_t0, self._val_secs = time.perf_counter(), 0.0

    def on_train_epoch_end(self) -> None:
        # wall time of the epoch: training batches (validation excluded) and its validation
        if getattr(self, "_epoch_t0", None) is not None:
            total = time.perf_counter() - self._epoch_t0
            self.log_dict({"time/train_epoch_s": total - self._val_secs, "time/val_s": self._val_secs},
                          on_epoch=True, on_step=False)

    # --- validation ---------------------------------------------------------------------------
    def _prefix(self, idx: int) -> str:
        return "val" if idx == 0 else "val_" + self.val_names[idx].removeprefix("dev_")

    def on_validation_epoch_start(self) -> None:
        self._val_loss = [[0.0, 0] for _ in self.val_names]
        self._val_t0 = time.perf_counter()

    def validation_step(self, batch: Mapping[str, Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        logits = self(batch)
        labels = batch["labels"]
        loss = self.task_loss(logits, labels)
        self._val_loss[dataloader_idx][0] += float(loss) * labels.shape[0]
        self._val_loss[dataloader_idx][1] += labels.shape[0]
        self.val_metrics[dataloader_idx].update(predictions(self.task, logits), labels)

    def on_validation_epoch_end(self) -> None:
        for idx, coll in enumerate(self.val_metrics):
            total, n = self._val_loss[idx]
            if n == 0:
                coll.reset()
                continue
            values = with_headline(self.task, coll.compute())
            coll.reset()
            prefix = self._prefix(idx)
            logged = {f"{prefix}/{k}": v.float() for k, v in values.items()}
            logged[f"{prefix}/loss"] = torch.tensor(total / n)
            if idx == 0:
                logged["val/score_best"] = torch.tensor(self.update_best_score(float(values["score"])))
                self.log("val/score", logged.pop("val/score"), prog_bar=True, sync_dist=True)
                if not self.trainer.sanity_checking:
                    self._dev_scores.append({"epoch": int(self.trainer.current_epoch),
                                             "step": int(self.trainer.global_step), "score": float(values["score"])})
            self.log_dict(logged, sync_dist=True)
        if not self.trainer.sanity_checking:
            self._val_secs = getattr(self, "_val_secs", 0.0) + time.perf_counter() - self._val_t0

    # --- prediction (rmoe-eval: GLUE test sets) ------------------------------------------------
    def predict_step(self, batch: Mapping[str, Tensor], batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        """Class index (argmax) of each example, or its score for STS-B (:func:`tasks.glue.metrics.predictions`)."""
        return predictions(self.task, self(batch))

    def on_fit_end(self) -> None:
        """Rank 0 prints the run's dev scores: the best (and its epoch), the last, the run folder."""
        self._frozen_cache.clear()
        if not self.trainer.is_global_zero:
            return
        cbs = [c for c in self.trainer.callbacks if isinstance(c, RunSummaryCallback)]
        # the run summary's records survive a resume; without that callback, this process's validations
        epochs = ([{"epoch": e["epoch"], "step": e["step"], "score": (e.get("dev") or {}).get("score")}
                   for e in cbs[0].epochs] if cbs else self._dev_scores)
        hp = self.hparams
        title = f"GLUE {self.task.dir_name} / {(hp.moe or {}).get('name', 'dense')} / lr {hp.lr:g}"
        print("\n" + "\n".join(dev_summary(epochs, self.task.headline, self.trainer.default_root_dir, title))
              + "\n", flush=True)

    # --- optimisation ------------------------------------------------------------------------
    def configure_optimizers(self) -> dict:
        hp = self.hparams
        trainable = [p for p in self.parameters() if p.requires_grad]  # module.freeze_layers leaves some out
        opt = torch.optim.AdamW(trainable, lr=hp.lr, weight_decay=hp.weight_decay, eps=hp.adam_eps,
                                **fused_if_supported(trainable))
        total = int(self.trainer.estimated_stepping_batches)
        sched = linear_decay(opt, total, int(hp.warmup_ratio * total))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
