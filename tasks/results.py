"""Shared pieces for reading finished runs and summarising them over seeds.

* Run records: every run folder holds ``summary.json`` (schema 1: benchmark, task, method, variant,
  seed, lr, per-epoch dev/held-out scores for GLUE, end-of-training routing stability, series) and
  is *complete* when it also holds the file ``done``; :func:`load_summaries` reads the complete ones
  and reports the others.
* Statistics over seeds: :func:`mean_se` (``SE = std(x, ddof=1) / sqrt(n)``) and
  :func:`paired_difference` (the same on the per-seed differences of two methods), with the noise
  rule of :func:`noise_verdict` (``|mean| > 2 SE`` -> larger than noise).
* Display order and labels of methods (``variant``) and GLUE tasks.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from tasks.domainbed.selection import find_run_dirs

SUMMARY_FILE = "summary.json"

#: Row order of methods; ablations (``rmoe_*``) follow ``rmoe``, other names follow alphabetically.
VARIANT_ORDER = ("dense", "moe_topk", "gmoe", "dynmoe", "rmoe", "rmoe_nofusion", "rmoe_nocurriculum")
VARIANT_LABELS = {"dense": "Dense", "moe_topk": "MoE (top-k)", "gmoe": "GMoE", "dynmoe": "DynMoE", "rmoe": "RMoE",
                  "rmoe_nofusion": "RMoE w/o fusion", "rmoe_nocurriculum": "RMoE w/o curriculum",
                  "ERM": "ERM", "MoE": "MoE", "GMoE": "GMoE", "DynMoE": "DynMoE", "RMoE": "RMoE"}
#: Column order of GLUE tasks: the paper's table (CoLA, MRPC, QNLI, MNLI, RTE), then the others.
GLUE_TASK_ORDER = ("cola", "mrpc", "qnli", "mnli", "rte", "sst2", "stsb", "qqp", "wnli")
GLUE_TASK_LABELS = {"cola": "CoLA", "mrpc": "MRPC", "qnli": "QNLI", "mnli": "MNLI", "rte": "RTE", "sst2": "SST-2",
                    "stsb": "STS-B", "qqp": "QQP", "wnli": "WNLI"}


def variant_label(v: str) -> str:
    return VARIANT_LABELS.get(v, v)


def sort_variants(names: Iterable[str]) -> list[str]:
    names = set(names)
    known = [v for v in VARIANT_ORDER if v in names]
    return known + sorted(n for n in names if n not in VARIANT_ORDER)


def sort_glue_tasks(names: Iterable[str]) -> list[str]:
    names = set(names)
    return [t for t in GLUE_TASK_ORDER if t in names] + sorted(n for n in names if n not in GLUE_TASK_ORDER)


def glue_task_label(t: str) -> str:
    return GLUE_TASK_LABELS.get(t, t)


# --- run folders --------------------------------------------------------------------------------
def load_summaries(input_dir: str, benchmark: str | None = None) -> tuple[list[dict[str, Any]], list[str]]:
    """``(runs, incomplete)``: the ``summary.json`` of every complete run folder below ``input_dir``
    (optionally only those of ``benchmark``), sorted by folder, each with ``run_dir`` set to its folder;
    and the folders holding a ``summary.json`` but no ``done`` file (ignored)."""
    complete, incomplete = find_run_dirs(input_dir, SUMMARY_FILE)
    runs = []
    for d in complete:
        with open(os.path.join(d, SUMMARY_FILE)) as f:
            s = json.load(f)
        if not isinstance(s, dict) or (benchmark is not None and s.get("benchmark") != benchmark):
            continue
        s["run_dir"] = d
        runs.append(s)
    return runs, incomplete


# --- statistics ---------------------------------------------------------------------------------
def mean_se(values: Iterable[float]) -> tuple[float | None, float | None, int]:
    """``(mean, SE, n)`` with ``SE = sample std (ddof 1) / sqrt(n)``; SE is None for n < 2, both None for n = 0."""
    xs = [float(v) for v in values]
    n = len(xs)
    if n == 0:
        return None, None, 0
    m = math.fsum(xs) / n
    if n < 2:
        return m, None, n
    var = math.fsum((x - m) ** 2 for x in xs) / (n - 1)
    return m, math.sqrt(var) / math.sqrt(n), n


@dataclass(frozen=True)
class Paired:
    """Paired difference ``a - b`` over the keys both have."""

    mean: float | None
    se: float | None
    n: int
    keys: tuple


def paired_difference(a: Mapping[Hashable, float], b: Mapping[Hashable, float]) -> Paired:
    """Mean and SE (sample std / sqrt(n)) of ``a[k] - b[k]`` over the keys (e.g. seeds) in both."""
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


# --- formatting ---------------------------------------------------------------------------------
def fmt_score(mean: float | None, se: float | None, latex: bool = False, scale: float = 100.0,
              digits: int = 1) -> str:
    """``"66.7 ± 0.4"`` (scores x100, one decimal); just the mean when SE is undefined."""
    if mean is None:
        return "--" if latex else "—"
    text = f"{scale * mean:.{digits}f}"
    if se is not None:
        text += (" $\\pm$ " if latex else " ± ") + f"{scale * se:.{digits}f}"
    return text


def fmt_lr(lr: Any) -> str:
    try:
        return f"{float(lr):g}"
    except (TypeError, ValueError):
        return str(lr)
