"""GLUE dev metrics against scikit-learn / scipy on fixed predictions."""

import math

import numpy as np
import pytest
import torch
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from tasks.glue.metrics import compute_metrics, predictions
from tasks.glue.tasks import get_task

LABELS = np.array([1, 0, 1, 1, 0, 1, 0, 0, 1, 1, 1, 0])
PREDS = np.array([1, 0, 0, 1, 1, 1, 0, 1, 1, 0, 1, 0])


def test_cola_mcc_matches_sklearn():
    got = compute_metrics(get_task("cola"), torch.tensor(PREDS), torch.tensor(LABELS))
    want = matthews_corrcoef(LABELS, PREDS)
    assert got["mcc"] == pytest.approx(want, abs=1e-6)
    assert got["score"] == pytest.approx(want, abs=1e-6)
    assert got["acc"] == pytest.approx(accuracy_score(LABELS, PREDS), abs=1e-6)


def test_cola_mcc_by_hand():
    # tp=5 tn=3 fp=2 fn=2 -> (5*3 - 2*2) / sqrt((tp+fp)(tp+fn)(tn+fp)(tn+fn)) = 11 / sqrt(7*7*5*5)
    got = compute_metrics(get_task("cola"), torch.tensor(PREDS), torch.tensor(LABELS))
    assert got["mcc"] == pytest.approx(11 / 35, abs=1e-6)


@pytest.mark.parametrize("task", ["mrpc", "qqp"])
def test_acc_f1_mean_matches_sklearn(task):
    got = compute_metrics(get_task(task), torch.tensor(PREDS), torch.tensor(LABELS))
    acc, f1 = accuracy_score(LABELS, PREDS), f1_score(LABELS, PREDS)
    assert got["acc"] == pytest.approx(acc, abs=1e-6)
    assert got["f1"] == pytest.approx(f1, abs=1e-6)
    assert got["acc_f1"] == pytest.approx((acc + f1) / 2, abs=1e-6)
    assert got["score"] == pytest.approx((acc + f1) / 2, abs=1e-6)


def test_stsb_pearson_spearman_match_scipy():
    labels = np.array([0.0, 1.2, 2.5, 3.3, 4.8, 5.0, 2.2, 0.4])
    preds = np.array([0.3, 1.0, 2.9, 3.0, 4.0, 4.9, 1.5, 1.1])
    got = compute_metrics(get_task("stsb"), torch.tensor(preds, dtype=torch.float32),
                          torch.tensor(labels, dtype=torch.float32))
    p, s = pearsonr(preds, labels)[0], spearmanr(preds, labels)[0]
    assert got["pearson"] == pytest.approx(p, abs=1e-5)
    assert got["spearman"] == pytest.approx(s, abs=1e-5)
    assert got["score"] == pytest.approx((p + s) / 2, abs=1e-5)


@pytest.mark.parametrize("task", ["rte", "qnli", "sst2", "wnli", "mnli"])
def test_accuracy_tasks(task):
    t = get_task(task)
    rng = np.random.default_rng(0)
    labels = rng.integers(0, t.num_labels, 50)
    preds = rng.integers(0, t.num_labels, 50)
    got = compute_metrics(t, torch.tensor(preds), torch.tensor(labels))
    assert got["score"] == pytest.approx(accuracy_score(labels, preds), abs=1e-6)
    assert set(got) == {"acc", "pred_top_share", "score"}


def test_predictions_argmax_and_regression():
    logits = torch.tensor([[0.1, 2.0], [3.0, -1.0]])
    assert predictions(get_task("cola"), logits).tolist() == [1, 0]
    out = predictions(get_task("stsb"), torch.tensor([[1.5], [2.5]]))
    assert out.tolist() == [1.5, 2.5] and out.dtype == torch.float32
    assert math.isclose(float(out.sum()), 4.0)


def test_prediction_spread_classification_by_hand():
    # PREDS: 7 ones, 5 zeros -> the most-predicted class holds 7 of 12
    got = compute_metrics(get_task("cola"), torch.tensor(PREDS), torch.tensor(LABELS))
    assert got["pred_top_share"] == pytest.approx(7 / 12, abs=1e-6)
    const = compute_metrics(get_task("mrpc"), torch.ones(12, dtype=torch.long), torch.tensor(LABELS))
    assert const["pred_top_share"] == 1.0
    three = compute_metrics(get_task("mnli"), torch.tensor([0, 1, 2, 2]), torch.tensor([0, 0, 0, 0]))
    assert three["pred_top_share"] == pytest.approx(0.5)


def test_prediction_spread_regression_is_the_population_std():
    preds = np.array([0.3, 1.0, 2.9, 3.0, 4.0, 4.9, 1.5, 1.1])
    labels = np.linspace(0.0, 5.0, 8)
    got = compute_metrics(get_task("stsb"), torch.tensor(preds, dtype=torch.float32),
                          torch.tensor(labels, dtype=torch.float32))
    assert got["pred_std"] == pytest.approx(float(np.std(preds)), abs=1e-6)
    flat = compute_metrics(get_task("stsb"), torch.full((8,), 2.5), torch.tensor(labels, dtype=torch.float32))
    assert flat["pred_std"] == pytest.approx(0.0, abs=1e-6)
