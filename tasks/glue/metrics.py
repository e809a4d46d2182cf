"""GLUE dev metrics with torchmetrics, and the headline score of each task.

* CoLA: Matthews correlation (``mcc``) — headline.
* MRPC, QQP: accuracy (``acc``), F1 of the positive class (``f1``) and ``acc_f1 = (acc + f1) / 2`` — headline.
* STS-B: Pearson (``pearson``), Spearman (``spearman``) and ``pearson_spearman = (pearson + spearman) / 2``
  — headline (the GLUE benchmark's STS-B score).
* every other task: accuracy (``acc``) — headline.

Beside them, how spread the predictions are, so a degenerate model can be told from the records
(:class:`PredictionSpread`): ``pred_top_share`` (classification: the share of the predictions in the
most-predicted class; 1.0 = a constant answer) or ``pred_std`` (regression: the population standard
deviation of the predicted scores; 0 = a constant answer).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric, MetricCollection
from torchmetrics.classification import BinaryF1Score, MatthewsCorrCoef, MulticlassAccuracy
from torchmetrics.regression import PearsonCorrCoef, SpearmanCorrCoef

from .tasks import GlueTask


class PredictionSpread(Metric):
    """``num_classes`` given: the share of the predictions (class indices) in the most-predicted class;
    ``None``: the population standard deviation of the predicted scores (regression). The labels are
    ignored. Summed states, so it syncs across processes like the other metrics."""

    full_state_update = False

    def __init__(self, num_classes: int | None) -> None:
        super().__init__()
        self.num_classes = num_classes
        if num_classes is None:
            for name in ("n", "total", "total_sq"):
                self.add_state(name, default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        else:
            self.add_state("counts", default=torch.zeros(num_classes, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: Tensor, labels: Tensor) -> None:
        if self.num_classes is None:
            p = preds.detach().double().reshape(-1)
            self.n += p.numel()
            self.total += p.sum()
            self.total_sq += (p * p).sum()
        else:
            self.counts += torch.bincount(preds.detach().reshape(-1).long(), minlength=self.num_classes)

    def compute(self) -> Tensor:
        if self.num_classes is None:
            mean = self.total / self.n.clamp_min(1)
            return (self.total_sq / self.n.clamp_min(1) - mean * mean).clamp_min(0).sqrt().float()
        return (self.counts.max() / self.counts.sum().clamp_min(1)).float()


def build_metrics(task: GlueTask) -> MetricCollection:
    """The metric collection of ``task``; update with ``(preds, labels)``: class indices, or
    float scores for STS-B."""
    if task.is_regression:
        return MetricCollection({"pearson": PearsonCorrCoef(), "spearman": SpearmanCorrCoef(),
                                 "pred_std": PredictionSpread(None)})
    metrics = {"acc": MulticlassAccuracy(num_classes=task.num_labels, average="micro"),
               "pred_top_share": PredictionSpread(task.num_labels)}
    if task.headline == "mcc":
        metrics["mcc"] = MatthewsCorrCoef(task="binary")
    if task.headline == "acc_f1":
        metrics["f1"] = BinaryF1Score()
    return MetricCollection(metrics)


def with_headline(task: GlueTask, values: dict[str, Tensor]) -> dict[str, Tensor]:
    """Add the derived mean (``acc_f1`` / ``pearson_spearman``) and ``score`` (the headline)."""
    out = dict(values)
    if task.headline == "acc_f1":
        out["acc_f1"] = (out["acc"] + out["f1"]) / 2
    elif task.headline == "pearson_spearman":
        out["pearson_spearman"] = (out["pearson"] + out["spearman"]) / 2
    out["score"] = out[task.headline].clone() if isinstance(out[task.headline], Tensor) else out[task.headline]
    return out


def predictions(task: GlueTask, logits: Tensor) -> Tensor:
    """Class index (argmax) or, for regression, the single output as a float score."""
    if task.is_regression:
        return logits.squeeze(-1).float()
    return logits.argmax(-1)


def compute_metrics(task: GlueTask, preds: Tensor, labels: Tensor) -> dict[str, float]:
    """One-shot helper: all metrics of ``task`` (with headline) on fixed predictions."""
    m = build_metrics(task)
    m.update(torch.as_tensor(preds), torch.as_tensor(labels))
    return {k: float(v) for k, v in with_headline(task, m.compute()).items()}
