"""The GLUE gates' pieces against hand-computed values: the constant-prediction score and the gate's SE,
the prediction counts reconstructed from the recorded dev metrics (degenerate runs), the gate itself."""

import math

import pytest

from tasks.study.data import constant_baseline, degenerate, glue_gate, prediction_share

MRPC = {"n": 408, "counts": [129, 279]}
COLA = {"n": 1043, "counts": [322, 721]}
RTE = {"n": 277, "counts": [146, 131]}


def test_constant_scores_and_ses():
    # MRPC, always "paraphrase": acc 279/408 = .683824, F1 = 2*279 / (2*279 + 129) = 558/687 = .812227;
    # score (.683824 + .812227) / 2 = .748025; SE sqrt(.683824 * .316176 / 408) = .023020
    b = constant_baseline("mrpc", "acc_f1", MRPC)
    assert b.score == pytest.approx(0.748025, abs=1e-6) and b.se == pytest.approx(0.023020, abs=1e-6)
    assert b.what == "always the positive class"
    # RTE: majority 146/277 = .527076, SE sqrt(.527076 * .472924 / 277) = .029998
    b = constant_baseline("rte", "acc", RTE)
    assert b.score == pytest.approx(0.527076, abs=1e-6) and b.se == pytest.approx(0.029998, abs=1e-6)
    # CoLA MCC: 0, SE 1/sqrt(1043) = .030964; STS-B: 0, SE 1/sqrt(1499) = 1/38.717 = .025828
    b = constant_baseline("cola", "mcc", COLA)
    assert (b.score, round(b.se, 6)) == (0.0, 0.030964)
    b = constant_baseline("stsb", "pearson_spearman", {"n": 1500, "regression": True})
    assert (b.score, round(b.se, 6)) == (0.0, 0.025828)
    # unknown metric or no counts: no baseline
    assert constant_baseline("mrpc", "f1", MRPC) is None and constant_baseline("rte", "acc", None) is None


def test_prediction_counts_from_the_recorded_metrics():
    # the float32 metrics an MRPC record holds for the all-"paraphrase" classifier: 408 of 408 one class
    assert prediction_share({"acc": 0.6838235259056091, "f1": 0.8122270703315735}, MRPC["counts"]) == (1.0, 1.0)
    # same accuracy, TP 270 FP 120 TN 9 FN 9: F1 540/669 = .807175 -> 390 predicted positive = 95.6 %: not degenerate
    share = prediction_share({"acc": 279 / 408, "f1": 0.807175}, MRPC["counts"])
    assert share == pytest.approx((390 / 408, 390 / 408))
    assert degenerate({"acc": 279 / 408, "f1": 0.807175}, MRPC) == "no"
    assert degenerate({"acc": 0.6838235259056091, "f1": 0.8122270703315735}, MRPC) == "yes"
    # CoLA, TP 650 TN 100 FP 222 FN 71: acc 750/1043 = .719080, MCC .264636 -> 872 predicted acceptable
    assert prediction_share({"acc": 0.719080, "mcc": 0.264636}, COLA["counts"]) == pytest.approx((872 / 1043,) * 2)
    # RTE, accuracy only. 146 correct: TP t (of 131) and TN 146 - t -> 2t predicted "not_entailment", t = 0..131:
    # from 139/277 = .5018 (t = 69) to 277/277 (t = 0): possibly degenerate. 100 correct: 2t + 46 predicted
    # positive, t = 0..100 -> at most 246/277 = .888: not degenerate.
    assert prediction_share({"acc": 146 / 277}, RTE["counts"]) == pytest.approx((139 / 277, 1.0))
    assert degenerate({"acc": 146 / 277}, RTE) == "possibly"
    assert degenerate({"acc": 100 / 277}, RTE) == "no"
    # cannot tell: no accuracy, no counts, regression
    assert degenerate({"mcc": 0.2}, COLA) is None and degenerate({"acc": 0.5}, None) is None
    assert degenerate({"acc": 0.5}, {"n": 10, "regression": True}) is None


def test_degenerate_from_the_recorded_prediction_spread():
    # a run that recorded its spread is told exactly, whatever its metrics would reconstruct to
    assert degenerate({"acc": 146 / 277, "pred_top_share": 0.99}, RTE) == "yes"
    assert degenerate({"acc": 146 / 277, "pred_top_share": 0.97}, RTE) == "no"
    assert degenerate({"acc": 0.5, "pred_top_share": 0.98}, None) == "yes"  # no label counts needed
    stsb = {"n": 1500, "regression": True, "std": 1.5}
    # threshold: 5 % of the labels' std = 0.075
    assert degenerate({"pearson": 0.1, "pred_std": 0.07}, stsb) == "yes"
    assert degenerate({"pearson": 0.1, "pred_std": 0.08}, stsb) == "no"
    assert degenerate({"pearson": 0.1, "pred_std": 0.07}, {"n": 1500, "regression": True}) is None


def test_glue_gate():
    b = constant_baseline("rte", "acc", RTE)  # .527076 + 3 x .029998 = .617070
    g = glue_gate("rte", b, [0.51, 0.52], 0.552)
    assert g.status == "does not learn" and g.bar == pytest.approx(0.617070, abs=1e-6)
    # CoLA: bar 3 / sqrt(1043) = .092892; dense .146 (mean of .14, .152) recovers .146 / .286 = 51 %: fails
    b = constant_baseline("cola", "mcc", COLA)
    g = glue_gate("cola", b, [0.14, 0.152], 0.286)
    assert g.status == "fails" and g.recovery == pytest.approx(0.146 / 0.286)
    assert "recovers 51 % of the ceiling's gain (needs ≥ 80 %)" in g.detail
    # dense .24 recovers .24 / .286 = 84 % and beats the bar: passes
    assert glue_gate("cola", b, [0.23, 0.25], 0.286).status == "passes"
    # just below the bar though recovering everything: fails
    assert glue_gate("cola", b, [0.09, 0.09], 0.1).status == "fails"
    assert glue_gate("cola", None, [0.2], 0.3).status == "cannot check"
    assert not math.isnan(glue_gate("cola", b, [0.2], None).bar)
