"""GLUE dev metrics with torchmetrics, and the headline score of each task.

* CoLA: Matthews correlation (``mcc``) — headline.
* MRPC, QQP: accuracy (``acc``), F1 of the positive class (``f1``) and ``acc_f1 = (acc + f1) / 2`` — headline.
* STS-B: Pearson (``pearson``), Spearman (``spearman``) and ``pearson_spearman = (pearson + spearman) / 2``
  — headline (the GLUE benchmark's STS-B score).
* every other task: accuracy (``acc``) — headline.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import MetricCollection
from torchmetrics.classification import BinaryF1Score, MatthewsCorrCoef, MulticlassAccuracy
from torchmetrics.regression import PearsonCorrCoef, SpearmanCorrCoef

from .tasks import GlueTask


def build_metrics(task: GlueTask) -> MetricCollection:
    """The metric collection of ``task``; update with ``(preds, labels)``: class indices, or
    float scores for STS-B."""
    if task.is_regression:
        return MetricCollection({"pearson": PearsonCorrCoef(), "spearman": SpearmanCorrCoef()})
    metrics = {"acc": MulticlassAccuracy(num_classes=task.num_labels, average="micro")}
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
