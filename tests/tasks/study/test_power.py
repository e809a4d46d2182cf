"""Minimum detectable effect, paired t-test p-values and Holm's adjustment against tabulated and
hand-computed values (not against the code under test).

Student t quantiles from the standard table (e.g. Montgomery, Appendix; two-decimal tables agree):
t_{.975,4} = 2.776, t_{.80,4} = 0.941; t_{.975,14} = 2.145, t_{.80,14} = 0.868; t_{.975,1} = 12.706,
t_{.80,1} = 1.376.
"""

import math

import pytest

from tasks.results.stats import Paired
from tasks.study.power import holm, holm_verdicts, mde, mde_factor, paired_p


@pytest.mark.parametrize("n, factor", [(5, 2.776 + 0.941), (15, 2.145 + 0.868), (2, 12.706 + 1.376)])
def test_mde_factor_matches_the_t_table(n, factor):
    assert mde_factor(n) == pytest.approx(factor, abs=2e-3)


def test_mde_is_factor_times_se_and_undefined_below_two_pairs():
    # n = 15, SE 0.5 -> (2.145 + 0.868) * 0.5 = 1.5065
    assert mde(Paired(0.1, 0.5, 15, ())) == pytest.approx(1.5065, abs=1e-3)
    assert mde(Paired(0.1, None, 1, ())) is None
    assert mde_factor(1) is None


def test_paired_p_two_sided():
    # t = 2.776 with 4 df is the 0.975 quantile -> two-sided p = 0.05; t = 0.941 -> p = 2 * 0.2 = 0.4
    assert paired_p(Paired(2.776, 1.0, 5, ())) == pytest.approx(0.05, abs=1e-4)
    assert paired_p(Paired(-0.941, 1.0, 5, ())) == pytest.approx(0.40, abs=1e-3)
    assert paired_p(Paired(0.0, 0.0, 3, ())) == 1.0 and paired_p(Paired(0.2, 0.0, 3, ())) == 0.0
    assert paired_p(Paired(0.2, None, 1, ())) is None


def test_holm_by_hand():
    # sorted .005 .01 .03 .04 -> x4 .02, x3 .03, x2 .06, x1 .04 -> running max .02 .03 .06 .06
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, 0.6]) == pytest.approx([1.0, 1.0])  # capped at 1
    assert holm([]) == []


def test_holm_verdicts_adjust_over_the_claims_comparisons():
    # p = .05 (t 2.776, 4 df) alone holds? no: .05 is not < .05. p of t = 4.604 (t_{.995,4}) = .01;
    # with a second comparison p = .40, Holm: .01 * 2 = .02 < .05 -> holds; .40 * 1 -> max(.02, .40) = .40.
    a, b = Paired(4.604, 1.0, 5, ()), Paired(-0.941, 1.0, 5, ())
    (va, pa), (vb, pb) = holm_verdicts([(a, 1), (b, 1)])
    assert (va, vb) == ("holds", "within noise")
    assert pa == pytest.approx(0.02, abs=2e-4) and pb == pytest.approx(0.40, abs=1e-3)
    # the same difference against the claimed sign is "against"; no SE -> "no data", not in the family
    (vc, _), (vd, pd) = holm_verdicts([(a, -1), (Paired(1.0, None, 1, ()), 1)])
    assert vc == "against" and (vd, pd) == ("no data", None)
    assert not math.isnan(pa)
