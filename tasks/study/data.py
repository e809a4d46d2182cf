"""The study's data: its runs (read by :mod:`tasks.results.records`), planned runs, and the numbers
behind its tables and claims -- GLUE cells and paired differences, DomainBed tables per dataset and
paired differences, end-of-training routing stability.

Statistics: :mod:`tasks.results.stats` (mean ± SE over seeds, SE = sample std / √n; paired
differences over seeds).

Which records count (:func:`load_study`): a benchmark's ``meta.json`` names the study's version
(``study_version``, 1 when absent) and each record its own (the ``study_version=N`` override it was
launched with, :attr:`tasks.results.records.RunRecord.study_version`; 1 when absent). Records of an
older version than their benchmark's are *superseded*: listed (``Study.superseded``), left out of
every table, figure and verdict. Records below ``ceiling/`` are the GLUE full-fine-tune ceilings
(``Study.ceiling``), kept apart from the GLUE study's runs although their ``benchmark`` is ``glue``.

Also here: the paper's numbers (SPEC §5) behind the claimed gaps (:data:`PAPER`, :func:`paper_gap`),
the ceilings (:func:`ceiling_rows`), the GLUE gates (:func:`glue_gate`, :func:`constant_baseline`,
:func:`degenerate`) and the DomainBed floors (:func:`db_floors`).
"""

from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from tasks.results.domainbed import domainbed_records, environment_names, selected_accs
from tasks.results.glue import cells as glue_cells
from tasks.results.glue import glue_summaries, heldout_epoch
from tasks.results.labels import glue_task_label, sort_benchmarks, sort_glue_tasks, variant_label
from tasks.results.records import VERSION_KEY, RunRecord, read_metas, scan
from tasks.results.selection import IIDAccuracySelectionMethod, OracleSelectionMethod, Record, SelectionMethod
from tasks.results.stats import Paired, mean_se, paired_difference
from tasks.results.table import Table, fmt_score

Run = RunRecord
DB_METHODS: list[type[SelectionMethod]] = [IIDAccuracySelectionMethod, OracleSelectionMethod]
#: (summary.json stability key, column label, decimals)
STABILITY_KEYS = (("load_cv", "load CV", 3), ("dead_experts", "dead experts", 2),
                  ("active_experts", "active experts", 2), ("top1_flip_rate", "top-1 flip rate", 3),
                  ("jaccard_churn", "Jaccard churn", 3), ("fusion_drift", "fusion drift", 4))
#: Paired comparisons per benchmark: (method, baseline) -- the paper's claims.
GLUE_COMPARISONS = (("rmoe", "dynmoe"), ("rmoe", "moe_cosine"))
DB_COMPARISONS = (("rmoe", "dynmoe"), ("rmoe", "gmoe"))
#: Comparisons shown beside them that no paper claim is about (the auxiliary-loss-free baseline).
EXTRA_COMPARISONS = (("rmoe", "lossfree"),)
CEILING = "ceiling"  # docs/results/ceiling/: the GLUE full-fine-tune ceilings

#: The paper's numbers (SPEC §5, x100): GLUE dev (its MoE row = the released scripts' cosine-router MoE,
#: ``moe=moe_cosine``; STS-B is not in its table) and DomainBed test accuracy
#: (training-domain validation). The paper has no RotatedMNIST / ColoredMNIST numbers and no ablation
#: or loss-free numbers.
PAPER = {
    "glue": {"moe_cosine": {"cola": 64.30, "mrpc": 89.94, "qnli": 92.49, "mnli": 86.61, "rte": 74.07},
             "dynmoe": {"cola": 65.17, "mrpc": 90.64, "qnli": 92.59, "mnli": 86.37, "rte": 73.41},
             "rmoe": {"cola": 66.69, "mrpc": 91.55, "qnli": 93.18, "mnli": 88.29, "rte": 75.45}},
    "domainbed": {"gmoe": {"PACS": 88.1, "VLCS": 80.2, "OfficeHome": 74.2, "DomainNet": 48.7},
                  "dynmoe": {"PACS": 88.4, "VLCS": 79.4, "OfficeHome": 73.6, "DomainNet": 47.4},
                  "rmoe": {"PACS": 88.8, "VLCS": 81.5, "OfficeHome": 74.5, "DomainNet": 49.1}},
}

#: "Models that learn" on DomainBed: the dense model must reach these test accuracies (training-domain
#: validation): (dataset, test env or "avg", threshold). GLUE's gates: :func:`glue_gate`.
DB_FLOORS = (("RotatedMNIST", "avg", 0.85), ("ColoredMNIST", 0, 0.65), ("ColoredMNIST", 1, 0.65))
ABLATIONS = (("rmoe", "rmoe_nofusion"), ("rmoe", "rmoe_nocurriculum"))
#: Stability claim: (key, label, claimed sign of RMoE − baseline).
STABILITY_CLAIMS = (("top1_flip_rate", "top-1 flip rate on the probe batch", -1),
                    ("dead_experts", "dead experts", -1), ("load_cv", "load CV", -1))


# --- loading ------------------------------------------------------------------------------------
def plan_key(run: Run, bench: str | None = None) -> tuple:
    """The planned-run key: GLUE (task, variant, seed); DomainBed (task, variant, test_env,
    trial_seed); the ceiling (task, lr)."""
    s = run.summary or {}
    if bench == CEILING:
        return (run.task, s.get("lr"))
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
    """``runs``: the complete, current, non-debug runs of the study (not the ceiling); ``ceiling``:
    those below ``ceiling/``; ``superseded``: records (relative paths) of an older study version;
    ``versions``: each benchmark's current study version."""

    results_dir: str
    runs: list[Run]
    incomplete: list[str]
    meta: dict[str, dict[str, Any]]
    debug: list[str]
    ceiling: list[Run] = field(default_factory=list)
    superseded: list[str] = field(default_factory=list)
    versions: dict[str, int] = field(default_factory=dict)

    def bench_runs(self, bench: str) -> list[Run]:
        if bench == CEILING:
            return list(self.ceiling)
        return [r for r in self.runs if r.benchmark == bench]

    def benchmarks(self) -> list[str]:
        """The study's benchmarks (the ceiling is not one)."""
        return sort_benchmarks((set(self.meta) - {CEILING}) | {r.benchmark for r in self.runs})

    def superseded_in(self, bench: str) -> list[str]:
        return [d for d in self.superseded if d.split("/")[0] == bench]


def record_bench(run: Run) -> str:
    """The benchmark a record belongs to in docs/results: ``ceiling`` below ``ceiling/``, else its own."""
    return CEILING if run.rel.split("/")[0] == CEILING else run.benchmark


def load_study(results_dir: str) -> Study:
    """The complete, non-debug runs below ``results_dir`` split into the study's current runs, the
    ceiling runs and superseded records, and the ``<bench>/meta.json`` files."""
    s = scan(results_dir)
    metas = read_metas(results_dir)
    versions = {b: int(m.get(VERSION_KEY, 1)) for b, m in metas.items()}
    runs, ceiling, superseded = [], [], []
    for r in s.runs:
        bench = record_bench(r)
        if r.study_version < versions.get(bench, 1):
            superseded.append(r.rel)
        elif bench == CEILING:
            ceiling.append(r)
        else:
            runs.append(r)
    return Study(results_dir, runs, s.incomplete, metas, s.debug, ceiling, sorted(superseded), versions)


# --- planned runs -------------------------------------------------------------------------------
def expected_keys(meta: Mapping[str, Any] | None, bench: str) -> list[tuple]:
    out = []
    for e in (meta or {}).get("expected") or []:
        if bench == CEILING:
            out.append((str(e["task"]), e.get("lr")))
        elif bench == "glue":
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
    for t in all_tasks if tasks is None else tasks:
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


# --- the paper's gaps ---------------------------------------------------------------------------
def paper_gap(bench: str, a: str, b: str, task: str) -> float | None:
    """The paper's ``a − b`` on ``task`` in points (x100), None when the paper has no such number."""
    p = PAPER.get(bench, {})
    if task in p.get(a, {}) and task in p.get(b, {}):
        return round(p[a][task] - p[b][task], 2)
    return None


def paper_gap_pooled(bench: str, a: str, b: str, pairs: Mapping[str, int]) -> float | None:
    """The paper's gap for a comparison pooled over tasks: its per-task gaps weighted as the pooled
    paired difference weighs them, by the number of pairs per task (``pairs``); None when a pooled
    task has no paper number or nothing is pooled."""
    used = {t: n for t, n in pairs.items() if n > 0}
    gaps = {t: paper_gap(bench, a, b, t) for t in used}
    if not used or any(g is None for g in gaps.values()):
        return None
    return math.fsum(used[t] * (gaps[t] or 0.0) for t in used) / sum(used.values())


def paper_gaps_text(bench: str, a: str, b: str) -> str:
    """``"PACS +0.40, VLCS +2.10, ..."``: every gap the paper reports for ``a − b``."""
    p = PAPER.get(bench, {})
    tasks = [t for t in p.get(a, {}) if t in p.get(b, {})]
    label = glue_task_label if bench == "glue" else str
    return ", ".join(f"{label(t)} {paper_gap(bench, a, b, t):+.2f}" for t in tasks)


# --- ceilings and floors ------------------------------------------------------------------------
@dataclass
class CeilingRow:
    """One (task, lr) of the full fine-tune: dev score after the last epoch and the best over
    epochs, each the mean over its runs (seeds); ``best_epoch`` (1-based) when there is one run."""

    task: str
    lr: Any
    n: int
    epochs: int
    last: float
    best: float
    best_epoch: int | None
    headline: str | None
    wall_s: float | None = None  # mean wall time of its runs (summary ``wall_time_s``)


def mean_wall_s(summaries: Sequence[Mapping[str, Any] | None]) -> float | None:
    """The mean ``wall_time_s`` of the summaries that have one; None when none has."""
    vals = [float(s["wall_time_s"]) for s in summaries if s and s.get("wall_time_s") is not None]
    return math.fsum(vals) / len(vals) if vals else None


def _dev_scores(summary: Mapping[str, Any]) -> list[float]:
    out = []
    for e in summary.get("epochs") or []:
        d = e.get("dev") if isinstance(e, Mapping) else None
        if isinstance(d, Mapping) and d.get("score") is not None:
            out.append(float(d["score"]))
    return out


def _lr_key(lr: Any) -> tuple:
    try:
        return (0, float(lr), "")
    except (TypeError, ValueError):
        return (1, 0.0, str(lr))


def ceiling_rows(runs: Sequence[Run]) -> list[CeilingRow]:
    by: dict[tuple[str, Any], list[tuple[list[float], Mapping[str, Any]]]] = defaultdict(list)
    for r in sorted(runs, key=lambda r: r.rel):
        summary = r.summary or {}
        scores = _dev_scores(summary)
        if scores:
            by[(r.task, summary.get("lr"))].append((scores, summary))
    rows = []
    for task in sort_glue_tasks({t for t, _ in by}):
        for lr in sorted((lr for t, lr in by if t == task), key=_lr_key):
            rs = by[(task, lr)]
            last = math.fsum(s[-1] for s, _ in rs) / len(rs)
            best = math.fsum(max(s) for s, _ in rs) / len(rs)
            best_epoch = rs[0][0].index(max(rs[0][0])) + 1 if len(rs) == 1 else None
            heads = sorted({sm["headline"] for _, sm in rs if sm.get("headline")})
            rows.append(CeilingRow(task, lr, len(rs), max(len(s) for s, _ in rs), last, best, best_epoch,
                                   "/".join(heads) or None, mean_wall_s([sm for _, sm in rs])))
    return rows


def ceilings(rows: Sequence[CeilingRow]) -> dict[str, CeilingRow]:
    """Per task the row of the best lr: the highest last-epoch dev score (ties: the smallest lr)."""
    out: dict[str, CeilingRow] = {}
    for r in rows:  # lr ascending within a task
        if r.task not in out or r.last > out[r.task].last:
            out[r.task] = r
    return out


@dataclass
class Floor:
    """One floor: ``status`` is holds | misses | does not learn | no ceiling | no runs; values x1."""

    bench: str
    what: str
    required: float | None
    measured: float | None
    se: float | None
    n: int
    status: str
    detail: str
    key: str = ""  # the GLUE task or DomainBed dataset
    part: str = ""  # the DomainBed column of a per-domain floor ("+90%"); "" for an average or a GLUE task


def _floor_detail(m: float, req: float) -> tuple[str, str]:
    if m >= req:
        return "holds", f"holds ({100 * (m - req):+.1f} points above)"
    return "misses", f"misses by {100 * (req - m):.1f} points"


def gate_floor(g: Gate) -> Floor:
    """A GLUE gate as a row of the floors table (``misses`` when the dense model fails it)."""
    what = (f"{glue_task_label(g.task)}: dense ≥ constant + {GATE_SES:.0f} SE and ≥ "
            f"{100 * GATE_RECOVERY:.0f} % of the ceiling's gain")
    status = {"passes": "holds", "fails": "misses"}.get(g.status, g.status)
    req = None
    if g.base is not None and g.ceiling is not None and g.status in ("passes", "fails"):
        req = max(g.bar, g.base.score + GATE_RECOVERY * (g.ceiling - g.base.score))
    if status == "misses" and req is not None and g.dense is not None:
        g_detail = f"misses by {100 * (req - g.dense):.1f} points; " + g.detail
    else:
        g_detail = g.detail
    return Floor("glue", what, req, g.dense, g.dense_se, g.n, status, g_detail, g.task)


def db_floors(records: list[Record], envs_of: Mapping[str, Sequence[int]]) -> list[Floor]:
    """The dense model's test accuracy under training-domain validation against :data:`DB_FLOORS`."""
    accs = selected_accs(records, IIDAccuracySelectionMethod) if records else {}
    out = []
    for dataset, col, thr in DB_FLOORS:
        if col == "avg":
            vals = db_trial_means(accs, dataset, "dense", envs_of.get(dataset) or db_columns(dataset, records, []))
            part, what = "", f"{dataset}: dense average test accuracy ≥ {100 * thr:.0f} %"
        else:
            vals = {tr: a for (d, v, t, tr), a in accs.items() if (d, v, t) == (dataset, "dense", col)}
            part = db_env_label(dataset, records, int(col))
            what = f"{dataset} {part}: dense test accuracy ≥ {100 * thr:.0f} %"
        m, se, n = mean_se(vals[k] for k in sorted(vals, key=repr))
        if m is None:
            out.append(Floor("domainbed", what, thr, None, None, 0, "no runs", "no dense run yet", dataset, part))
            continue
        status, detail = _floor_detail(m, thr)
        out.append(Floor("domainbed", what, thr, m, se, n, status, detail, dataset, part))
    return out


# --- gates: did a model learn? --------------------------------------------------------------------
#: ``docs/results/glue_dev_labels.json`` (:mod:`tasks.study.devlabels`): the dev sets' label counts.
DEV_LABELS_FILE = "glue_dev_labels.json"
#: A GLUE task enters the verdicts when its dense model beats the constant-prediction score by at least
#: ``GATE_SES`` of the dev set's SEs and recovers at least ``GATE_RECOVERY`` of the full fine-tune's gain
#: over that score; a run is degenerate when at least ``DEGENERATE_SHARE`` of its dev predictions are one class.
GATE_SES = 3.0
GATE_RECOVERY = 0.8
DEGENERATE_SHARE = 0.98
#: A regression run is degenerate when its dev predictions' standard deviation is below this share of the
#: dev labels' (near-zero prediction variance: a nearly constant answer).
DEGENERATE_STD = 0.05


def read_dev_labels(results_dir: str) -> dict[str, dict[str, Any]]:
    """``{task: {"n", "counts", "labels"} | {"n", "regression"}}`` from ``<results_dir>/glue_dev_labels.json``
    ({} without one)."""
    path = os.path.join(results_dir, DEV_LABELS_FILE)
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return dict(json.load(f).get("tasks") or {})


@dataclass
class Baseline:
    """A task's constant-prediction score and the SE the gate uses, both on the headline's scale (x1)."""

    task: str
    metric: str
    n: int
    score: float
    se: float
    what: str  # how the score was made, for people
    se_what: str


def constant_baseline(task: str, metric: str | None, dev: Mapping[str, Any] | None) -> Baseline | None:
    """The best constant prediction's dev score and the gate's SE (None when the metric or the label
    counts are unknown):

    * ``acc``: the majority class's share ``p``; SE = ``sqrt(p (1 − p) / n)`` (binomial);
    * ``acc_f1``: the better of the two constant answers, ``(acc + F1 of the positive class) / 2``
      (answering positive: acc = P / n, F1 = 2P / (2P + N); negative: F1 = 0); SE = the binomial SE
      of that answer's accuracy, ``sqrt(p (1 − p) / n)``, used unchanged on the (acc + F1) / 2 scale;
    * ``mcc``: 0 (a constant prediction has no correlation; torchmetrics returns 0); SE = ``1 / sqrt(n)``,
      the SE of the phi coefficient (= MCC) of two independent binary variables (n · MCC² = χ²₁);
    * ``pearson_spearman`` (STS-B): 0; SE = ``1 / sqrt(n − 1)``, a correlation's SE under independence.
    """
    if not dev or not metric:
        return None
    n = int(dev["n"])
    if metric in ("pearson_spearman", "pearson", "spearman") and dev.get("regression"):
        return Baseline(task, metric, n, 0.0, 1 / math.sqrt(n - 1), "any constant prediction",
                        "1/√(n−1)")
    counts = [int(c) for c in dev.get("counts") or []]
    if len(counts) < 2 or sum(counts) != n:
        return None
    if metric == "acc":
        p = max(counts) / n
        return Baseline(task, metric, n, p, math.sqrt(p * (1 - p) / n), "the majority class",
                        "√(p(1−p)/n), p = the majority share")
    if metric == "mcc":
        return Baseline(task, metric, n, 0.0, 1 / math.sqrt(n), "any constant prediction", "1/√n")
    if metric == "acc_f1" and len(counts) == 2:
        neg, pos = counts
        yes = (pos / n + 2 * pos / (2 * pos + neg)) / 2
        no = (neg / n + 0.0) / 2
        p = pos / n if yes >= no else neg / n
        return Baseline(task, metric, n, max(yes, no), math.sqrt(p * (1 - p) / n),
                        "always the " + ("positive" if yes >= no else "negative") + " class",
                        "√(p(1−p)/n), p = that answer's accuracy")
    return None


def prediction_share(dev_metrics: Mapping[str, Any], counts: Sequence[int], tol: float = 1e-4
                     ) -> tuple[float, float] | None:
    """The range ``(lo, hi)`` of the share of the most-predicted class over every binary confusion
    matrix consistent with the recorded dev metrics (``acc``, and ``f1`` / ``mcc`` where recorded, each
    within ``tol``) and the dev label counts ``[negatives, positives]``; None for a non-binary task or
    without a recorded accuracy. One matrix when F1 or MCC pins it (MRPC, CoLA); accuracy alone (RTE)
    leaves a range."""
    if len(counts) != 2 or dev_metrics.get("acc") is None:
        return None
    neg, pos = int(counts[0]), int(counts[1])
    n = neg + pos
    correct = round(float(dev_metrics["acc"]) * n)
    if abs(float(dev_metrics["acc"]) * n - correct) > 1e-2:
        return None
    shares = []
    for tp in range(max(0, correct - neg), min(pos, correct) + 1):
        tn = correct - tp
        fp, fn = neg - tn, pos - tp
        if dev_metrics.get("f1") is not None:
            f1 = 2 * tp / (2 * tp + fp + fn) if 2 * tp + fp + fn else 0.0
            if abs(f1 - float(dev_metrics["f1"])) > tol:
                continue
        if dev_metrics.get("mcc") is not None:
            den = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
            mcc = (tp * tn - fp * fn) / den if den else 0.0
            if abs(mcc - float(dev_metrics["mcc"])) > tol:
                continue
        pp = tp + fp
        shares.append(max(pp, n - pp) / n)
    if not shares:
        return None
    return min(shares), max(shares)


def degenerate(dev_metrics: Mapping[str, Any] | None, dev: Mapping[str, Any] | None) -> str | None:
    """"yes" / "no" from the recorded prediction spread when the run recorded it
    (:class:`tasks.glue.metrics.PredictionSpread`: ``pred_top_share`` ≥ :data:`DEGENERATE_SHARE`;
    regression: ``pred_std`` below :data:`DEGENERATE_STD` of the dev labels' standard deviation);
    otherwise reconstructed from the recorded metrics: "yes" (every consistent confusion matrix has
    ≥ :data:`DEGENERATE_SHARE` of the predictions in one class), "possibly" (some has), "no" (none
    has), None (cannot be told: no label counts, a regression or multi-class task without a recorded
    spread, or no recorded accuracy)."""
    if not dev_metrics:
        return None
    if dev_metrics.get("pred_top_share") is not None:
        return "yes" if float(dev_metrics["pred_top_share"]) >= DEGENERATE_SHARE else "no"
    if dev_metrics.get("pred_std") is not None and dev and dev.get("std"):
        return "yes" if float(dev_metrics["pred_std"]) < DEGENERATE_STD * float(dev["std"]) else "no"
    if not dev or dev.get("regression"):
        return None
    r = prediction_share(dev_metrics, dev.get("counts") or [])
    if r is None:
        return None
    lo, hi = r
    return "yes" if lo >= DEGENERATE_SHARE else "possibly" if hi >= DEGENERATE_SHARE else "no"


def selected_epoch(run: Mapping[str, Any], selection: str) -> Mapping[str, Any] | None:
    """The dev metrics of the epoch a selection reports: ``best_dev`` the earliest epoch with the highest
    dev score, ``heldout`` :func:`tasks.results.glue.heldout_epoch`."""
    eps = run.get("epochs") or []
    if selection == "heldout":
        i = heldout_epoch(dict(run))
    else:
        scored = [(float(e["dev"]["score"]), -k) for k, e in enumerate(eps)
                  if isinstance(e.get("dev"), Mapping) and e["dev"].get("score") is not None]
        i = -max(scored)[1] if scored else None
    return None if i is None else eps[i].get("dev")


@dataclass
class Gate:
    """A GLUE task's gate: ``status`` passes | fails | does not learn | cannot check."""

    task: str
    base: Baseline | None
    dense: float | None
    dense_se: float | None
    n: int
    ceiling: float | None
    status: str
    detail: str

    @property
    def bar(self) -> float | None:
        return None if self.base is None else self.base.score + GATE_SES * self.base.se

    @property
    def recovery(self) -> float | None:
        if self.base is None or self.dense is None or self.ceiling is None or self.ceiling <= self.base.score:
            return None
        return (self.dense - self.base.score) / (self.ceiling - self.base.score)


def glue_gate(task: str, base: Baseline | None, dense: Sequence[float], ceiling: float | None) -> Gate:
    """Dense must beat the constant score by :data:`GATE_SES` SEs and recover :data:`GATE_RECOVERY` of
    the ceiling's gain over it; a ceiling that does not itself beat the constant score by
    :data:`GATE_SES` SEs: the task does not learn at this scale."""
    m, se, n = mean_se(dense)
    g = Gate(task, base, m, se, n, ceiling, "cannot check", "")
    if base is None:
        g.detail = "cannot be checked: no dev label counts (`docs/results/glue_dev_labels.json`) for this metric"
        return g
    bar = g.bar
    if ceiling is None:
        g.detail = "cannot be checked: no full-fine-tune record (`make reproduce-ceiling`)"
        return g
    if ceiling < bar:
        g.status = "does not learn"
        g.detail = (f"does not learn at this scale: the full fine-tune's {100 * ceiling:.1f} is below constant + "
                    f"{GATE_SES:.0f} SE = {100 * bar:.1f}")
        return g
    if m is None:
        g.detail = "no dense run yet"
        return g
    rec = g.recovery or 0.0
    beats, recovers = m >= bar, rec >= GATE_RECOVERY
    g.status = "passes" if beats and recovers else "fails"
    g.detail = (f"{'passes' if g.status == 'passes' else 'fails'}: dense − constant = "
                f"{100 * (m - base.score):+.1f} ({(m - base.score) / base.se:+.1f} SE; needs ≥ {GATE_SES:.0f}), "
                f"recovers {100 * rec:.0f} % of the ceiling's gain (needs ≥ {100 * GATE_RECOVERY:.0f} %)")
    return g
