"""DomainBed result tables (as DomainBed's ``collect_results``), as data for ``tasks.collect``.

Per dataset and selection method: one row per method -- the run's variant plus the overrides that
set its runs apart (:func:`domainbed_records`, :mod:`tasks.results.grouping`), so an ablation
``variant=rmoe_nofusion`` gets its own row -- one column per test domain holding
``100 * mean ± 100 * SE (n=k)`` over the k trial seeds of the selected test accuracy, with DomainBed's
SE convention (:func:`tasks.results.stats.mean_se_domainbed`: *population* std / √n, as DomainBed's
``collect_results.format_mean``, so a table sits beside a published DomainBed table), and ``Avg`` = mean of the
per-domain means ("X" where a domain has no result). An "Averages" table gives, per dataset, mean ±
SE over trial seeds of the per-trial mean over test domains.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from .grouping import (
    REPLICATION_KEYS,
    SELECTION_KEYS,
    configurations,
    drop_duplicates,
    row_name,
    sweep_values,
    varying,
)
from .labels import environment_names as _environment_names
from .labels import sort_datasets, sort_variants, variant_label
from .records import RunRecord
from .selection import SELECTION_METHODS, Record, SelectionMethod, group_records, n_envs
from .stats import mean_se_domainbed
from .table import Table, fmt_score, render_markdown

SE_NOTE = ("100 · mean ± 100 · SE (n=k) over the k trial seeds, SE = population std (n) / √n as DomainBed's "
           "collect_results; one trial seed: the mean.")


def format_mean(data: Sequence[float], latex: bool) -> tuple[float | None, float | None, str]:
    """``(100*mean, 100*SE, text)`` with ``SE`` per :func:`tasks.results.stats.mean_se_domainbed` (population
    std / √n, DomainBed's; None for one value) and the text ``"62.0 ± 1.0 (n=2)"``; ``"X"`` for no data."""
    m, se, n = mean_se_domainbed(data)
    if m is None:
        return None, None, "X"
    return 100 * m, None if se is None else 100 * se, f"{fmt_score(m, se, latex)} (n={n})"


#: replication / selection overrides DomainBed's own records already carry (args.trial_seed, test_envs, hparams_seed)
_DOMAINBED_AXES = frozenset({"trial_seed", "data.trial_seed", "test_envs", "data.test_envs", "data.hparams_seed"})


def domainbed_records(runs: Sequence[RunRecord]) -> list[Record]:
    """The DomainBed records of ``runs`` with ``args.algorithm`` = the run's row (variant plus the
    overrides that vary within its (dataset, variant) cell). Of runs with the same (dataset, row, test
    envs, trial seed, hparams seed and every other seed / selection override) the first folder is kept and
    a warning names them all. Other swept axes join DomainBed's: a swept training ``seed`` makes each
    (trial seed, seed) a replicate the table averages over (``args.trial_seed``, ``args.replicate_keys``);
    a swept ``module.lr`` makes each (hparams seed, lr) a candidate model selection chooses among
    (``args.hparams_seed``, ``args.candidate_keys``)."""
    runs = [r for r in runs if r.raw_records]
    configs = configurations(runs, lambda r: (r.task, r.variant))

    def full_key(r: RunRecord) -> tuple:
        a = r.raw_records[0]["args"]
        return (str(a["dataset"]), row_name(r.variant, configs[r.rel]), tuple(a["test_envs"]), a["trial_seed"],
                a.get("hparams_seed", 0), sweep_values(r))

    kept, _ = drop_duplicates(runs, full_key)
    cells: dict[tuple, list[RunRecord]] = {}
    for r in kept:
        cells.setdefault((r.raw_records[0]["args"]["dataset"], row_name(r.variant, configs[r.rel])), []).append(r)
    out = []
    for (_, row), members in cells.items():
        rep = varying(members, REPLICATION_KEYS - _DOMAINBED_AXES)
        cand = varying(members, SELECTION_KEYS - _DOMAINBED_AXES)
        for r in members:
            def tag(base: Any, keys: list[str], r: RunRecord = r) -> Any:
                return base if not keys else f"{base} " + ",".join(f"{k}={r.override_dict.get(k, '-')}" for k in keys)

            for rec in r.raw_records:
                a = dict(rec["args"], algorithm=row)
                if rep:
                    a.update(trial_seed=tag(a["trial_seed"], rep), replicate_keys=["trial_seed", *rep])
                if cand:
                    a.update(hparams_seed=tag(a.get("hparams_seed", 0), cand), candidate_keys=["hparams_seed", *cand])
                out.append(dict(rec, args=a))
    return out


def averaging_notes(records: Sequence[Record]) -> list[str]:
    """How the table averaged, where a swept seed or learning rate joined DomainBed's axes."""
    notes = []
    rep = sorted({" × ".join(r["args"]["replicate_keys"]) for r in records if r["args"].get("replicate_keys")})
    cand = sorted({" × ".join(r["args"]["candidate_keys"]) for r in records if r["args"].get("candidate_keys")})
    if rep:
        notes.append(f"n counts replicates ({'; '.join(rep)}): each training seed of a trial seed is one.")
    if cand:
        notes.append(f"Model selection chooses among the candidates {'; '.join(cand)} (each learning rate is one).")
    return notes


def is_domainbed_record(r: Record) -> bool:
    return isinstance(r.get("args"), dict) and "test_envs" in r["args"] and "env0_out_acc" in r


def environment_names(dataset: str, records: list[Record]) -> list[str]:
    """The domain names of ``dataset`` (:mod:`tasks.results.labels`; unknown: numbered from its records)."""
    mine = [n_envs(r) for r in records if r["args"]["dataset"] == dataset]
    return _environment_names(dataset, max(mine) if mine else None)


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
    algorithms = sort_variants({r["args"]["algorithm"] for r in records})
    datasets = sort_datasets({r["args"]["dataset"] for r in records})
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
            rows.append([variant_label(alg), *cells, avg])
        tables.append(Table(title=f"Dataset: {dataset}, model selection method: {method.name}",
                            header=["Algorithm", *envs, "Avg"], rows=rows, section=dataset,
                            notes=[SE_NOTE, *averaging_notes(records)]))
    rows = []
    for alg in algorithms:
        cells, means = [], []
        for dataset in datasets:
            per_trial: dict[Any, list[float]] = {}
            for g in groups:
                if (g["algorithm"], g["dataset"]) == (alg, dataset):
                    per_trial.setdefault(g["trial_seed"], []).append(g["sweep_acc"])
            mean, _, text = format_mean([math.fsum(v) / len(v) for v in per_trial.values()], latex)
            cells.append(text)
            means.append(mean)
        avg = "X" if None in means or not means else f"{sum(means) / len(means):.1f}"
        rows.append([variant_label(alg), *cells, avg])
    tables.append(Table(title=f"Averages, model selection method: {method.name}",
                        header=["Algorithm", *datasets, "Avg"], rows=rows, section="Averages",
                        notes=["Per trial seed the mean over the test domains it has, then " + SE_NOTE,
                               *averaging_notes(records)]))
    return tables


def all_tables(records: list[Record], latex: bool = False) -> list[tuple[type[SelectionMethod], list[Table]]]:
    return [(m, results_tables(records, m, latex)) for m in SELECTION_METHODS]


def updates_done(record: Record) -> int:
    """The optimizer updates completed at a ``results.jsonl`` record: its ``step`` (DomainBed's 0-based index of
    the update just taken, kept as DomainBed writes it) + 1 -- the step every other record and label uses."""
    return int(record["step"]) + 1


def run_table(records: list[Record], environments: Sequence[str]) -> Table:
    """One run's per-domain accuracies at its last record and at the record picked by
    training-domain validation (max mean ``out`` accuracy over the training domains). Labelled with the
    updates completed (``@N``: ``metrics.csv``'s ``step``, ``summary.json``'s, ``best_step<N>.ckpt``), that is
    :func:`updates_done` of the record's DomainBed ``step``."""
    last = max(records, key=lambda r: r["step"])
    test_envs = set(last["args"]["test_envs"])

    def val(r: Record) -> float:
        accs = [float(r[f"env{i}_out_acc"]) for i in range(n_envs(r)) if i not in test_envs]
        return math.fsum(accs) / len(accs)

    best = max(records, key=val)
    rows = []
    for i, env in enumerate(environments):
        role = "test" if i in test_envs else "train"
        rows.append([f"env{i} ({env})", role,
                     f"{100 * last[f'env{i}_in_acc']:.1f}", f"{100 * last[f'env{i}_out_acc']:.1f}",
                     f"{100 * best[f'env{i}_in_acc']:.1f}", f"{100 * best[f'env{i}_out_acc']:.1f}"])
    # short labels: the table and its notes fit an 80-column terminal
    n_last, n_best = updates_done(last), updates_done(best)
    notes = [f"accuracy (%) at step @N; * step {n_best}: chosen by training-domain validation",
             f"(mean train-domain out acc {100 * val(best):.1f}); last step {n_last}",
             "step N: after N updates (results.jsonl keeps DomainBed's step, N - 1)"]
    header = ["domain", "role", f"in @{n_last}", f"out @{n_last}", f"in @{n_best}*", f"out @{n_best}*"]
    a = last["args"]
    return Table(title=f"{a['dataset']} / {a['algorithm']} / test_envs {sorted(test_envs)} / "
                       f"trial_seed {a['trial_seed']}", header=header, rows=rows, notes=notes)


def run_report(records: list[Record], environments: Sequence[str] | None, path: str) -> str:
    """What ``rmoe-train`` prints at the end of a DomainBed fit: the run's :func:`run_table` (markdown) and the
    file its records are in. ``environments``: the dataset's names (None or empty: their indices)."""
    envs = list(environments or []) or [str(i) for i in range(sum(k.endswith("_out_acc") for k in records[0]))]
    return "\n" + render_markdown(run_table(records, envs)) + f"\nrecords: {path}\n"
