"""Power and multiplicity for the study's paired comparisons.

* :func:`mde`: the minimum detectable effect of a paired mean at power ``1 − β`` and two-sided level
  ``α`` with ``n`` pairs, t-based: ``MDE = (t_{1−α/2, n−1} + t_{1−β, n−1}) · SE`` (SE = the paired
  mean's standard error, sample std / √n). With ``α = 0.05`` and 80 % power a true difference of that
  size is found 80 % of the time; 2 SE is only the significance threshold (found about half the time).
* :func:`paired_p`: the two-sided one-sample t-test p-value of a paired mean (``t = mean / SE``,
  ``n − 1`` degrees of freedom).
* :func:`holm`: Holm's step-down adjustment of a family's p-values (controls the family-wise error
  rate): sort ascending, ``p_(i) · (m − i + 1)``, running maximum, capped at 1; returned in input order.

The t quantiles and tail probabilities are scipy's (``scipy.stats.t``); scipy is installed with the pinned
scikit-learn, which requires it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from scipy import stats

from tasks.results.stats import Paired

ALPHA = 0.05
POWER = 0.8


def mde_factor(n: int, alpha: float = ALPHA, power: float = POWER) -> float | None:
    """``t_{1−α/2, n−1} + t_{power, n−1}``; None for n < 2 (no SE)."""
    if n < 2:
        return None
    df = n - 1
    return float(stats.t.ppf(1 - alpha / 2, df) + stats.t.ppf(power, df))


def mde(p: Paired, alpha: float = ALPHA, power: float = POWER) -> float | None:
    """The minimum detectable effect (same units as ``p.mean``) of the paired mean ``p``; None when
    it has no SE."""
    f = mde_factor(p.n, alpha, power)
    if f is None or p.se is None:
        return None
    return f * p.se


def paired_p(p: Paired) -> float | None:
    """Two-sided t-test p-value of ``p.mean`` against 0 (``n − 1`` df); None for n < 2. A zero SE
    gives 1.0 for a zero mean, else 0.0."""
    if p.n < 2 or p.se is None or p.mean is None:
        return None
    if p.se == 0:
        return 1.0 if p.mean == 0 else 0.0
    return float(2 * stats.t.sf(abs(p.mean / p.se), p.n - 1))


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm-adjusted p-values, in input order."""
    m = len(pvalues)
    order = sorted(range(m), key=lambda i: pvalues[i])
    out = [0.0] * m
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        out[i] = running
    return out


def holm_verdicts(items: Sequence[tuple[Paired, int]], alpha: float = ALPHA) -> list[tuple[str, float | None]]:
    """Per ``(paired difference, claimed sign)`` of one claim: ``(verdict, Holm-adjusted p)`` with
    the adjustment over the claim's comparisons that have a p-value. Verdict: "holds" (adjusted p <
    ``alpha``, difference in the claimed direction), "against" (adjusted p < ``alpha``, the other
    way), "within noise", or "no data" (n < 2)."""
    ps = [paired_p(p) for p, _ in items]
    idx = [i for i, x in enumerate(ps) if x is not None]
    adj = holm([ps[i] for i in idx])
    out: list[tuple[str, float | None]] = [("no data", None)] * len(items)
    for i, a in zip(idx, adj):
        p, sign = items[i]
        if a < alpha:
            out[i] = ("holds" if sign * (p.mean or 0.0) > 0 else "against", a)
        else:
            out[i] = ("within noise", a)
    return out


def fmt_p(x: float | None) -> str:
    if x is None:
        return "—"
    if math.isnan(x):
        return "—"
    return "< 0.001" if x < 0.001 else f"{x:.3f}"
