"""The study's data: its runs (read by :mod:`tasks.results.records`), planned runs, and the numbers
behind its tables and claims -- GLUE cells and paired differences, DomainBed tables per dataset and
paired differences, end-of-training routing stability.

Statistics: :mod:`tasks.results.stats` (mean ± SE over seeds, SE = sample std / √n; paired
differences over seeds).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from tasks.results.domainbed import domainbed_records, environment_names, selected_accs
from tasks.results.glue import cells as glue_cells
from tasks.results.glue import glue_summaries
from tasks.results.labels import sort_benchmarks, sort_glue_tasks, variant_label
from tasks.results.records import RunRecord, read_metas, scan
from tasks.results.selection import IIDAccuracySelectionMethod, OracleSelectionMethod, Record, SelectionMethod
from tasks.results.stats import Paired, mean_se, paired_difference
from tasks.results.table import Table, fmt_score

Run = RunRecord
DB_METHODS: list[type[SelectionMethod]] = [IIDAccuracySelectionMethod, OracleSelectionMethod]
#: (summary.json stability key, column label, decimals)
STABILITY_KEYS = (("load_cv", "load CV", 3), ("dead_experts", "dead experts", 2),
                  ("active_experts", "active experts", 2), ("top1_flip_rate", "top-1 flip rate", 3),
                  ("jaccard_churn", "Jaccard churn", 3), ("fusion_drift", "fusion drift", 4))
#: Paired comparisons per benchmark: (method, baseline).
GLUE_COMPARISONS = (("rmoe", "dynmoe"), ("rmoe", "moe_topk"))
DB_COMPARISONS = (("rmoe", "dynmoe"), ("rmoe", "gmoe"))
ABLATIONS = (("rmoe", "rmoe_nofusion"), ("rmoe", "rmoe_nocurriculum"))
#: Stability claim: (key, label, claimed sign of RMoE − baseline).
STABILITY_CLAIMS = (("top1_flip_rate", "top-1 flip rate on the probe batch", -1),
                    ("dead_experts", "dead experts", -1), ("load_cv", "load CV", -1))


# --- loading ------------------------------------------------------------------------------------
def plan_key(run: Run) -> tuple:
    """The planned-run key: GLUE (task, variant, seed); DomainBed (task, variant, test_env, trial_seed)."""
    s = run.summary or {}
    if run.benchmark == "glue":
        return (run.task, run.variant, s.get("seed"))
    if s:
        envs, trial = s.get("test_envs") or [None], s.get("trial_seed")
    else:
        a = run.raw_records[0]["args"]
        envs, trial = a["test_envs"], a["trial_seed"]
    return (run.task, run.variant, envs[0] if len(envs) == 1 else tuple(envs), trial)


def pair_key(run: Run) -> tuple:
    """Key pairing a run with the same-condition run of another method (stability)."""
    s = run.summary or {}
    if run.benchmark == "glue":
        return (run.task, s.get("lr"), s.get("seed"))
    return (run.task,) + plan_key(run)[2:]


@dataclass
class Study:
    results_dir: str
    runs: list[Run]
    incomplete: list[str]
    meta: dict[str, dict[str, Any]]
    debug: list[str]

    def bench_runs(self, bench: str) -> list[Run]:
        return [r for r in self.runs if r.benchmark == bench]

    def benchmarks(self) -> list[str]:
        return sort_benchmarks(set(self.meta) | {r.benchmark for r in self.runs})


def load_study(results_dir: str) -> Study:
    """The complete, non-debug runs below ``results_dir`` and the ``<bench>/meta.json`` files."""
    s = scan(results_dir)
    return Study(results_dir, s.runs, s.incomplete, read_metas(results_dir), s.debug)


# --- planned runs -------------------------------------------------------------------------------
def expected_keys(meta: Mapping[str, Any] | None, bench: str) -> list[tuple]:
    out = []
    for e in (meta or {}).get("expected") or []:
        if bench == "glue":
            out.append((str(e["task"]), str(e["variant"]), e.get("seed")))
        else:
            out.append((str(e["task"]), str(e["variant"]), e.get("test_env"), e.get("trial_seed")))
    return sorted(set(out), key=repr)


# --- GLUE ---------------------------------------------------------------------------------------
def glue_seed_scores(runs: list[dict], selection: str) -> dict[tuple[str, str], dict[Any, float]]:
    """``{(task, variant): {seed: reported dev score}}`` at the cell's kept learning rate."""
    return {k: c["scores"] for k, c in glue_cells(runs, selection).items()}


def glue_paired(runs: list[dict], selection: str, a: str, b: str, tasks: Sequence[str] | None = None
                ) -> tuple[dict[str, Paired], Paired]:
    """Per task and pooled over (task, seed): paired difference of the dev scores ``a − b``."""
    sc = glue_seed_scores(runs, selection)
    all_tasks = sort_glue_tasks({t for t, _ in sc})
    per_task, pa, pb = {}, {}, {}
    for t in tasks or all_tasks:
        sa, sb = sc.get((t, a), {}), sc.get((t, b), {})
        per_task[t] = paired_difference(sa, sb)
        pa.update({(t, s): v for s, v in sa.items()})
        pb.update({(t, s): v for s, v in sb.items()})
    return per_task, paired_difference(pa, pb)


# --- DomainBed ----------------------------------------------------------------------------------
def db_records(runs: list[Run]) -> list[Record]:
    """The DomainBed records, ``args.algorithm`` = the run's row (:func:`tasks.results.domainbed.domainbed_records`)."""
    return domainbed_records(runs)


def db_columns(dataset: str, records: list[Record], expected: list[tuple]) -> list[int]:
    envs = {k[2] for k in expected if k[0] == dataset and isinstance(k[2], int)}
    envs |= {r["args"]["test_envs"][0] for r in records
             if r["args"]["dataset"] == dataset and len(r["args"]["test_envs"]) == 1}
    if not envs:
        envs = set(range(len(_env_names(dataset, records))))
    return sorted(envs)


def _env_names(dataset: str, records: list[Record]) -> list[str]:
    try:
        return environment_names(dataset, records)
    except ValueError:  # an unknown dataset without records
        return []


def db_env_label(dataset: str, records: list[Record], env: int) -> str:
    names = _env_names(dataset, records)
    return names[env] if 0 <= env < len(names) else str(env)


def db_trial_means(accs: Mapping[tuple, float], dataset: str, variant: str, envs: Sequence[int]) -> dict[Any, float]:
    """``{trial_seed: mean over envs of the selected test accuracy}`` for trial seeds with every env."""
    by_trial: dict[Any, dict[int, float]] = defaultdict(dict)
    for (d, v, t, trial), acc in accs.items():
        if (d, v) == (dataset, variant) and t in envs:
            by_trial[trial][t] = acc
    return {trial: math.fsum(e.values()) / len(envs) for trial, e in by_trial.items() if len(e) == len(envs)}


def db_table(records: list[Record], dataset: str, method: type[SelectionMethod], expected: list[tuple],
             variants: Sequence[str], envs: Sequence[int]) -> Table:
    accs = selected_accs(records, method) if records else {}
    planned = bool(expected)
    exp_trials: dict[tuple, set] = defaultdict(set)
    for d, v, t, trial in expected:
        exp_trials[(d, v, t)].add(trial)
        exp_trials[(d, v, "avg")].add(trial)
    rows = []
    for v in variants:
        row = [variant_label(v)]
        for t in list(envs) + ["avg"]:
            if t == "avg":
                vals = db_trial_means(accs, dataset, v, envs)
            else:
                vals = {trial: a for (d, vv, tt, trial), a in accs.items() if (d, vv, tt) == (dataset, v, t)}
            n_plan = len(exp_trials.get((dataset, v, t), ())) if planned else None
            m, se, n = mean_se(vals[k] for k in sorted(vals, key=repr))
            if n == 0:
                row.append(f"— (0/{n_plan})" if n_plan else "")
                continue
            text = fmt_score(m, se)
            if n_plan and n < n_plan:
                text += f" ({n}/{n_plan})"
            row.append(text)
        rows.append(row)
    header = ["Method"] + [f"{db_env_label(dataset, records, t)}" for t in envs] + ["Avg"]
    notes = [f"Test-domain accuracy x100 selected by {method.name}; column = held-out test domain; mean ± SE "
             "over trial seeds (SE = sample std / √n). Avg = mean over the test domains per trial seed, then "
             "mean ± SE over the trial seeds that have every test domain."]
    if planned:
        notes.append("(k/n): k of n planned trial seeds finished; — (0/n): planned, none finished; "
                     "blank: not planned.")
    return Table(title=f"{dataset}: {method.name}", header=header, rows=rows, section=dataset, notes=notes)


def db_paired(records: list[Record], method: type[SelectionMethod], a: str, b: str, datasets: Sequence[str],
              envs_of: Mapping[str, Sequence[int]]) -> tuple[dict[str, Paired], Paired]:
    accs = selected_accs(records, method) if records else {}
    per, pa, pb = {}, {}, {}
    for d in datasets:
        ma, mb = db_trial_means(accs, d, a, envs_of[d]), db_trial_means(accs, d, b, envs_of[d])
        per[d] = paired_difference(ma, mb)
        pa.update({(d, k): x for k, x in ma.items()})
        pb.update({(d, k): x for k, x in mb.items()})
    return per, paired_difference(pa, pb)


# --- stability ----------------------------------------------------------------------------------
def run_stability(summary: Mapping[str, Any] | None, key: str) -> float | None:
    """Mean over MoE layers of the run's end-of-training ``stability[layer][key]`` (None if absent)."""
    stab = (summary or {}).get("stability") or {}
    vals = [float(stab[layer][key]) for layer in sorted(stab)
            if isinstance(stab[layer], Mapping) and stab[layer].get(key) is not None]
    return math.fsum(vals) / len(vals) if vals else None


def stability_values(runs: list[Run], variant: str, key: str) -> dict[tuple, float]:
    """``{pair_key: value}`` (several runs with one key: their mean)."""
    acc: dict[tuple, list[float]] = defaultdict(list)
    for r in runs:
        if r.variant == variant:
            v = run_stability(r.summary, key)
            if v is not None:
                acc[pair_key(r)].append(v)
    return {k: math.fsum(v) / len(v) for k, v in acc.items()}


def glue_runs(study: Study) -> list[dict[str, Any]]:
    """The GLUE summaries, each with its row (:func:`tasks.results.glue.glue_summaries`)."""
    return glue_summaries(study.bench_runs("glue"))
