"""DomainBed result tables (as DomainBed's ``collect_results``), as data for ``tasks.collect``.

Per dataset and selection method: one row per algorithm, one column per test domain holding
``100 * mean ± 100 * SE`` over trial seeds of the selected test accuracy, with
``SE = std(accs) / sqrt(n)`` (population std, DomainBed's ``format_mean``), and ``Avg`` = mean of
the per-domain means ("X" where a domain has no result). An "Averages" table gives, per dataset,
mean ± SE over trial seeds of the per-trial mean over test domains.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .datasets import DATASETS
from .selection import SELECTION_METHODS, Record, SelectionMethod, group_records, n_envs

#: Preferred row order (DomainBed-style names, then this platform's ``moe`` option names); other
#: algorithms follow alphabetically.
ALGORITHM_ORDER = ("ERM", "MoE", "GMoE", "DynMoE", "RMoE", "dense", "moe_topk", "gmoe", "dynmoe", "rmoe")


@dataclass
class Table:
    """A titled 2-D table of strings: ``header`` (column labels), ``rows`` (first cell = row label)."""

    title: str
    header: list[str]
    rows: list[list[str]]
    section: str = ""
    notes: list[str] = field(default_factory=list)


def format_mean(data: Sequence[float], latex: bool) -> tuple[float | None, float | None, str]:
    """``(100*mean, 100*SE, text)`` with ``SE = std(data) / sqrt(n)``; ``"X"`` for no data."""
    if len(data) == 0:
        return None, None, "X"
    arr = np.asarray(list(data), dtype=float)
    mean = 100 * arr.mean()
    err = 100 * np.std(arr / np.sqrt(len(arr)))
    pm = " $\\pm$ " if latex else " ± "
    return mean, err, f"{mean:.1f}{pm}{err:.1f}"


def is_domainbed_record(r: Record) -> bool:
    return isinstance(r.get("args"), dict) and "test_envs" in r["args"] and "env0_out_acc" in r


def _sorted_algorithms(names: set[str]) -> list[str]:
    return [a for a in ALGORITHM_ORDER if a in names] + sorted(n for n in names if n not in ALGORITHM_ORDER)


def _sorted_datasets(names: set[str]) -> list[str]:
    return [d for d in DATASETS if d in names] + sorted(n for n in names if n not in DATASETS)


def environment_names(dataset: str, records: list[Record]) -> list[str]:
    if dataset in DATASETS:
        return list(DATASETS[dataset].ENVIRONMENTS)
    n = max(n_envs(r) for r in records if r["args"]["dataset"] == dataset)
    return [str(i) for i in range(n)]


def selected_accs(records: list[Record], method: type[SelectionMethod]) -> dict[tuple[str, str, int, Any], float]:
    """``{(dataset, algorithm, test_env, trial_seed): selected test accuracy}`` for one selection
    method (groups where the method selects nothing are left out)."""
    out = {}
    for g in group_records(records):
        acc = method.sweep_acc(g["records"])
        if acc is not None:
            out[(g["dataset"], g["algorithm"], g["test_env"], g["trial_seed"])] = float(acc)
    return out


def results_tables(records: list[Record], method: type[SelectionMethod], latex: bool = False) -> list[Table]:
    """Per-dataset tables and the averages table for one selection method."""
    groups = group_records(records)
    for g in groups:
        g["sweep_acc"] = method.sweep_acc(g["records"])
    groups = [g for g in groups if g["sweep_acc"] is not None]
    algorithms = _sorted_algorithms({r["args"]["algorithm"] for r in records})
    datasets = _sorted_datasets({r["args"]["dataset"] for r in records})
    tables = []
    for dataset in datasets:
        envs = environment_names(dataset, records)
        rows = []
        for alg in algorithms:
            cells, means = [], []
            for t in range(len(envs)):
                accs = [g["sweep_acc"] for g in groups
                        if (g["dataset"], g["algorithm"], g["test_env"]) == (dataset, alg, t)]
                mean, _, text = format_mean(accs, latex)
                cells.append(text)
                means.append(mean)
            avg = "X" if None in means else f"{sum(means) / len(means):.1f}"
            rows.append([alg, *cells, avg])
        tables.append(Table(title=f"Dataset: {dataset}, model selection method: {method.name}",
                            header=["Algorithm", *envs, "Avg"], rows=rows, section=dataset))
    rows = []
    for alg in algorithms:
        cells, means = [], []
        for dataset in datasets:
            per_trial: dict[Any, list[float]] = {}
            for g in groups:
                if (g["algorithm"], g["dataset"]) == (alg, dataset):
                    per_trial.setdefault(g["trial_seed"], []).append(g["sweep_acc"])
            mean, _, text = format_mean([float(np.mean(v)) for v in per_trial.values()], latex)
            cells.append(text)
            means.append(mean)
        avg = "X" if None in means or not means else f"{sum(means) / len(means):.1f}"
        rows.append([alg, *cells, avg])
    tables.append(Table(title=f"Averages, model selection method: {method.name}",
                        header=["Algorithm", *datasets, "Avg"], rows=rows, section="Averages"))
    return tables


def all_tables(records: list[Record], latex: bool = False) -> list[tuple[type[SelectionMethod], list[Table]]]:
    return [(m, results_tables(records, m, latex)) for m in SELECTION_METHODS]


def run_table(records: list[Record], environments: Sequence[str]) -> Table:
    """One run's per-domain accuracies at its last record and at the record picked by
    training-domain validation (max mean ``out`` accuracy over the training domains)."""
    last = max(records, key=lambda r: r["step"])
    test_envs = set(last["args"]["test_envs"])

    def val(r: Record) -> float:
        return float(np.mean([r[f"env{i}_out_acc"] for i in range(n_envs(r)) if i not in test_envs]))

    best = max(records, key=val)
    rows = []
    for i, env in enumerate(environments):
        role = "test" if i in test_envs else "train"
        rows.append([f"env{i} ({env})", role,
                     f"{100 * last[f'env{i}_in_acc']:.1f}", f"{100 * last[f'env{i}_out_acc']:.1f}",
                     f"{100 * best[f'env{i}_in_acc']:.1f}", f"{100 * best[f'env{i}_out_acc']:.1f}"])
    notes = [f"training-domain validation picks step {best['step']} (mean train-domain out acc "
             f"{100 * val(best):.1f}); last step {last['step']}"]
    header = ["domain", "role", f"in acc @{last['step']}", f"out acc @{last['step']}",
              f"in acc @{best['step']} (selected)", f"out acc @{best['step']} (selected)"]
    a = last["args"]
    return Table(title=f"{a['dataset']} / {a['algorithm']} / test_envs {sorted(test_envs)} / "
                       f"trial_seed {a['trial_seed']}", header=header, rows=rows, notes=notes)
