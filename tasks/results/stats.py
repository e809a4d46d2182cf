"""Statistics over seeds: the one standard-error convention of every table and report.

:func:`mean_se` is the platform's SE: ``SE = s / sqrt(n)`` with ``s`` the *sample* standard deviation
(``ddof = 1``: ``s^2 = sum (x - mean)^2 / (n - 1)``). This is the convention ``docs/RESULTS.md`` states,
used for the GLUE tables and the study's paired statistics. A single value has no SE (tables show the
mean only). :func:`mean_se_domainbed` is DomainBed's own (``collect_results.format_mean``): the
*population* std (divides by ``n``) / ``sqrt(n)``, smaller by ``sqrt((n-1)/n)``; the DomainBed tables of
``tasks.collect`` use it, so they sit beside published DomainBed tables (one value: no SE, where DomainBed
prints ``± 0.0``).

:func:`paired_difference` applies the same to the per-key (e.g. per-seed) differences of two
methods; :func:`noise_verdict`: ``|mean| > 2 SE`` -> "larger than noise".
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass


def _mean_se(values: Iterable[float], ddof: int) -> tuple[float | None, float | None, int]:
    xs = [float(v) for v in values]
    n = len(xs)
    if n == 0:
        return None, None, 0
    m = math.fsum(xs) / n
    if n < 2:
        return m, None, n
    var = math.fsum((x - m) ** 2 for x in xs) / (n - ddof)
    return m, math.sqrt(var) / math.sqrt(n), n


def mean_se(values: Iterable[float]) -> tuple[float | None, float | None, int]:
    """``(mean, SE, n)`` with ``SE = sample std (ddof 1) / sqrt(n)``; SE is None for n < 2, both None for n = 0."""
    return _mean_se(values, ddof=1)


def mean_se_domainbed(values: Iterable[float]) -> tuple[float | None, float | None, int]:
    """``(mean, SE, n)`` as DomainBed's ``domainbed/scripts/collect_results.py`` ``format_mean``:
    ``np.std(data / sqrt(n))`` = population std (ddof 0) / ``sqrt(n)``; SE None for n < 2 (DomainBed prints 0.0
    there; the tables show the mean only), both None for n = 0."""
    return _mean_se(values, ddof=0)


@dataclass(frozen=True)
class Paired:
    """Paired difference ``a - b`` over the keys both have."""

    mean: float | None
    se: float | None
    n: int
    keys: tuple


def paired_difference(a: Mapping[Hashable, float], b: Mapping[Hashable, float]) -> Paired:
    """Mean and SE (:func:`mean_se`) of ``a[k] - b[k]`` over the keys (e.g. seeds) in both."""
    keys = tuple(sorted((k for k in a if k in b), key=repr))
    m, se, n = mean_se(a[k] - b[k] for k in keys)
    return Paired(m, se, n, keys)


def noise_verdict(p: Paired) -> str:
    """``|mean| > 2 SE`` -> "larger than noise", else "within noise"; "n < 2" when SE is undefined."""
    if p.n < 2 or p.se is None or p.mean is None:
        return "n < 2"
    return "larger than noise" if abs(p.mean) > 2 * p.se else "within noise"


def direction_verdict(p: Paired, sign: int = 1) -> str:
    """For a claim that ``a - b`` has sign ``sign``: "holds" (difference beyond 2 SE in the claimed
    direction), "against" (beyond 2 SE the other way), "within noise", or "no data" (n < 2)."""
    v = noise_verdict(p)
    if v == "n < 2":
        return "no data"
    if v == "within noise":
        return "within noise"
    return "holds" if sign * p.mean > 0 else "against"
