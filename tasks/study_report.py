"""The reproduction study's report, regenerated from the exported run records only.

``python -m tasks.study_report docs/results --output docs/RESULTS.md`` (plots go to
``docs/plots/``; ``--plots DIR`` to change) reads, below ``docs/results/``:

* ``<bench>/meta.json``: the command, invocations (start, end, wall time, commit, jobs run), the
  planned runs (``expected``) and what differs from the paper (``shortened``);
* every run folder: ``summary.json`` (schema 1) and, for DomainBed, ``results.jsonl``; folders
  without a ``done`` file are incomplete and ignored (and counted).

and writes Markdown with: provenance per benchmark, the paper's claims each with a verdict, the
GLUE table (best dev epoch = paper protocol; dev score at the best held-out epoch), the DomainBed
tables per dataset (training-domain validation, oracle), paired differences RMoE − baseline over
seeds, the routing-stability table at the end of training and figures from the logged series.

Deterministic: the same ``docs/results/`` gives the same bytes (everything sorted, no clock, no
absolute paths; PNGs written by matplotlib's Agg without a Software/date stamp). Statistics: mean ±
SE over seeds with ``SE = std(ddof=1) / sqrt(n)``; a paired difference is the mean of the per-seed
differences with SE = std(differences, ddof=1) / sqrt(n); "larger than noise" = ``|mean| > 2 SE``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from tasks.domainbed.reporting import Table, environment_names, selected_accs
from tasks.domainbed.selection import (
    DONE_FILE,
    IIDAccuracySelectionMethod,
    OracleSelectionMethod,
    Record,
    SelectionMethod,
)
from tasks.glue.collect import SELECTIONS as GLUE_SELECTIONS
from tasks.glue.collect import cells as glue_cells
from tasks.glue.collect import glue_planned, glue_table, run_variant
from tasks.results import (
    SUMMARY_FILE,
    Paired,
    direction_verdict,
    fmt_score,
    glue_task_label,
    mean_se,
    noise_verdict,
    paired_difference,
    sort_glue_tasks,
    sort_variants,
    variant_label,
)

DEFAULT_COMMAND = "python -m tasks.study_report docs/results --output docs/RESULTS.md"
BENCH_LABELS = {"glue": "GLUE", "domainbed": "DomainBed"}
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
VARIANT_STYLES = {"dense": ("tab:gray", ":"), "moe_topk": ("tab:blue", "-"), "gmoe": ("tab:green", "-"),
                  "dynmoe": ("tab:orange", "--"), "rmoe": ("tab:red", "-"), "rmoe_nofusion": ("tab:purple", "-."),
                  "rmoe_nocurriculum": ("tab:brown", ":")}


# --- loading ------------------------------------------------------------------------------------
@dataclass
class Run:
    """One run folder: its ``summary.json`` (or None) and DomainBed records."""

    dir: str  # relative to the results folder, with "/" separators
    summary: dict[str, Any] | None
    records: list[Record] = field(default_factory=list)

    @property
    def benchmark(self) -> str:
        if self.summary and self.summary.get("benchmark"):
            return str(self.summary["benchmark"])
        return "domainbed" if self.records else "?"

    @property
    def variant(self) -> str:
        if self.summary:
            return run_variant(self.summary)
        return str(self.records[0]["args"]["algorithm"])

    @property
    def task(self) -> str:
        if self.summary and self.summary.get("task") is not None:
            return str(self.summary["task"])
        return str(self.records[0]["args"]["dataset"])

    def key(self) -> tuple:
        """The planned-run key: GLUE (task, variant, seed); DomainBed (task, variant, test_env, trial_seed)."""
        s = self.summary or {}
        if self.benchmark == "glue":
            return (self.task, self.variant, s.get("seed"))
        if s:
            envs, trial = s.get("test_envs") or [None], s.get("trial_seed")
        else:
            a = self.records[0]["args"]
            envs, trial = a["test_envs"], a["trial_seed"]
        return (self.task, self.variant, envs[0] if len(envs) == 1 else tuple(envs), trial)

    def pair_key(self) -> tuple:
        """Key pairing a run with the same-condition run of another method (stability)."""
        s = self.summary or {}
        if self.benchmark == "glue":
            return (self.task, s.get("lr"), s.get("seed"))
        return (self.task,) + self.key()[2:]


@dataclass
class Study:
    results_dir: str
    runs: list[Run]
    incomplete: list[str]
    meta: dict[str, dict[str, Any]]

    def bench_runs(self, bench: str) -> list[Run]:
        return [r for r in self.runs if r.benchmark == bench]

    def benchmarks(self) -> list[str]:
        names = set(self.meta) | {r.benchmark for r in self.runs}
        return [b for b in ("glue", "domainbed") if b in names] + sorted(names - {"glue", "domainbed"})


def _rel(path: str, root: str) -> str:
    return os.path.relpath(path, root).replace(os.sep, "/")


def load_study(results_dir: str) -> Study:
    runs, incomplete = [], []
    for dirpath, dirs, files in os.walk(results_dir, followlinks=True):
        dirs.sort()
        if SUMMARY_FILE not in files and "results.jsonl" not in files:
            continue
        rel = _rel(dirpath, results_dir)
        if DONE_FILE not in files:
            incomplete.append(rel)
            continue
        summary = None
        if SUMMARY_FILE in files:
            with open(os.path.join(dirpath, SUMMARY_FILE)) as f:
                summary = json.load(f)
        records = []
        if "results.jsonl" in files:
            with open(os.path.join(dirpath, "results.jsonl")) as f:
                records = [json.loads(line) for line in f if line.strip()]
            if summary and (summary.get("variant") or summary.get("method")):
                for r in records:  # ablations share the moe name: label DomainBed records by variant
                    r["args"] = dict(r["args"], algorithm=run_variant(summary))
        if summary is None and not records:
            continue
        runs.append(Run(rel, summary, records))
    meta = {}
    for name in sorted(os.listdir(results_dir)) if os.path.isdir(results_dir) else []:
        path = os.path.join(results_dir, name, "meta.json")
        if os.path.isfile(path):
            with open(path) as f:
                m = json.load(f)
            meta[str(m.get("benchmark") or name)] = m
    return Study(results_dir, sorted(runs, key=lambda r: r.dir), sorted(incomplete), meta)


# --- planned runs -------------------------------------------------------------------------------
def expected_keys(meta: Mapping[str, Any] | None, bench: str) -> list[tuple]:
    out = []
    for e in (meta or {}).get("expected") or []:
        if bench == "glue":
            out.append((str(e["task"]), str(e["variant"]), e.get("seed")))
        else:
            out.append((str(e["task"]), str(e["variant"]), e.get("test_env"), e.get("trial_seed")))
    return sorted(set(out), key=repr)


# --- formatting helpers -------------------------------------------------------------------------
def md_table(header: Sequence[str], rows: Iterable[Sequence[str]], align: str | None = None) -> list[str]:
    align = align or ("l" + "r" * (len(header) - 1))
    esc = [str(h).replace("|", "\\|") for h in header]
    lines = ["| " + " | ".join(esc) + " |", "|" + "|".join("---" if a == "l" else "---:" for a in align) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |")
    return lines


def paired_table(labels: Sequence[str], rows: list[Sequence[str]]) -> list[str]:
    """A paired-differences table: three label columns, then mean diff, SE, n and the verdict."""
    if not rows:
        return ["No paired runs yet."]
    return md_table([*labels, "mean diff", "SE", "n", "verdict"], rows, "lllrrrl")


def render_table(t: Table) -> list[str]:
    return md_table(t.header, t.rows) + [""] + [f"{n}" for n in t.notes]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces -> '-'."""
    s = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return s.replace(" ", "-")


def link(heading: str) -> str:
    return f"[{heading}](#{slug(heading)})"


def fmt_duration(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    s = int(round(float(seconds)))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h} h {m:02d} min {sec:02d} s" if h else f"{m} min {sec:02d} s"


def fmt_diff(p: Paired, scale: float = 100.0, digits: int = 2) -> tuple[str, str, str]:
    if p.mean is None:
        return "—", "—", "0"
    mean = f"{scale * p.mean:+.{digits}f}"
    se = "—" if p.se is None else f"{scale * p.se:.{digits}f}"
    return mean, se, str(p.n)


def fmt_key(bench: str, key: tuple) -> str:
    """A planned-run key for people: ``cola/rmoe/seed 2``, ``RotatedMNIST/gmoe/test env 1/trial seed 0``."""
    if bench == "glue":
        return f"{key[0]}/{key[1]}/seed {key[2]}"
    if len(key) == 4:
        return f"{key[0]}/{key[1]}/test env {key[2]}/trial seed {key[3]}"
    return "/".join(str(x) for x in key)


def fmt_num(x: float | None, digits: int) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def diff_sentence(a: str, b: str, p: Paired, unit: str, scale: float = 100.0, digits: int = 2) -> str:
    mean, se, n = fmt_diff(p, scale, digits)
    if p.mean is None:
        return f"{variant_label(a)} − {variant_label(b)}: no paired runs"
    se_text = "" if p.se is None else f" ± {se}"
    unit = f" {unit}" if unit else ""
    return f"{variant_label(a)} − {variant_label(b)} = {mean}{se_text}{unit} (n = {n})"


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
    return [r for run in runs for r in run.records]


def db_columns(dataset: str, records: list[Record], expected: list[tuple]) -> list[int]:
    envs = {k[2] for k in expected if k[0] == dataset and isinstance(k[2], int)}
    envs |= {r["args"]["test_envs"][0] for r in records
             if r["args"]["dataset"] == dataset and len(r["args"]["test_envs"]) == 1}
    if not envs:
        envs = set(range(len(_env_names(dataset, records))))
    return sorted(envs)


def _env_names(dataset: str, records: list[Record]) -> list[str]:
    mine = [r for r in records if r["args"]["dataset"] == dataset]
    try:
        return environment_names(dataset, mine)
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
                acc[r.pair_key()].append(v)
    return {k: math.fsum(v) / len(v) for k, v in acc.items()}


# --- plots --------------------------------------------------------------------------------------
def _series(run: Run) -> dict[str, Any]:
    return ((run.summary or {}).get("series") or {}) if run.summary else {}


def representative(runs: list[Run], has: Callable[[Run], bool], task_order: Callable[[Iterable[str]], list[str]]
                   ) -> tuple[str | None, dict[str, Run]]:
    """The task with the most methods having ``has(run)`` (ties: the first in ``task_order``) and, per
    method, its first run by (seed, lr, test envs, trial seed, folder)."""
    by_task: dict[str, dict[str, list[Run]]] = defaultdict(lambda: defaultdict(list))
    for r in runs:
        if has(r):
            by_task[r.task][r.variant].append(r)
    if not by_task:
        return None, {}
    order = task_order(by_task)
    task = max(order, key=lambda t: (len(by_task[t]), -order.index(t)))

    def rank(r: Run) -> tuple:
        s = r.summary or {}
        return (repr(s.get("seed")), repr(s.get("lr")), repr(s.get("test_envs")), repr(s.get("trial_seed")), r.dir)

    return task, {v: sorted(rs, key=rank)[0] for v, rs in by_task[task].items()}


def _task_order(bench: str) -> Callable[[Iterable[str]], list[str]]:
    return sort_glue_tasks if bench == "glue" else (lambda names: sorted(names))


def _task_label(bench: str, task: str) -> str:
    return glue_task_label(task) if bench == "glue" else task


def _run_caption(r: Run) -> str:
    s = r.summary or {}
    bits = [f"seed {s.get('seed')}"]
    if s.get("test_envs") is not None:
        bits = [f"test env {s.get('test_envs')}", f"trial seed {s.get('trial_seed')}"]
    return f"{variant_label(r.variant)} ({', '.join(bits)}; `{r.dir}`)"


def _save(fig: Any, path: str) -> None:
    fig.savefig(path, format="png", dpi=100, metadata={"Software": None})


def make_plots(study: Study, plots_dir: str) -> list[tuple[str, str, str]]:
    """Write the figures; returns ``[(file name, title, caption)]``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    matplotlib.rcParams.update({"svg.hashsalt": "rmoe", "figure.max_open_warning": 0})
    os.makedirs(plots_dir, exist_ok=True)
    out = []
    benches = [b for b in study.benchmarks() if study.bench_runs(b)]

    # 1. lambda schedule per method (one representative run per method)
    def has_lambda(r: Run) -> bool:
        s = _series(r)
        return bool(s.get("step")) and bool(s.get("lambda"))

    panels = [(b, *representative(study.bench_runs(b), has_lambda, _task_order(b))) for b in benches]
    panels = [p for p in panels if p[1] is not None]
    if panels:
        fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 3.6), squeeze=False)
        caps = []
        for ax, (b, task, reps) in zip(axes[0], panels):
            for v in sort_variants(reps):
                s = _series(reps[v])
                n = min(len(s["step"]), len(s["lambda"]))
                color, ls = VARIANT_STYLES.get(v, (None, "-"))
                ax.plot(s["step"][:n], [float("nan") if x is None else x for x in s["lambda"][:n]],
                        label=variant_label(v), color=color, linestyle=ls)
            ys = [y for line in ax.get_lines() for y in line.get_ydata() if np.isfinite(y)]
            if ys and min(ys) > 0 and max(ys) / min(ys) > 20:
                ax.set_yscale("log")  # exponential decay spans orders of magnitude
            ax.set_title(f"{BENCH_LABELS.get(b, b)}: {_task_label(b, task)}")
            ax.set_xlabel("optimizer step")
            ax.set_ylabel("λ (load-balancing weight)")
            ax.legend(fontsize=8)
            caps.append(f"{BENCH_LABELS.get(b, b)} {_task_label(b, task)}: "
                        + "; ".join(_run_caption(reps[v]) for v in sort_variants(reps)))
        fig.tight_layout()
        _save(fig, os.path.join(plots_dir, "lambda_schedule.png"))
        plt.close(fig)
        out.append(("lambda_schedule.png", "λ schedule per method", "Runs: " + " — ".join(caps) + "."))

    # 2. expert load over time, one heatmap per method (first MoE layer of a representative run)
    def has_load(r: Run) -> bool:
        s = _series(r)
        return bool(s.get("step")) and any(s.get("load", {}).get(k) for k in s.get("load", {}) or {})

    for b in benches:
        task, reps = representative(study.bench_runs(b), has_load, _task_order(b))
        if task is None:
            continue
        variants = sort_variants(reps)
        fig, axes = plt.subplots(1, len(variants), figsize=(3.6 * len(variants), 3.4), squeeze=False)
        caps = []
        for ax, v in zip(axes[0], variants):
            s = _series(reps[v])
            layer = sorted(k for k in s["load"] if s["load"][k])[0]
            rows = s["load"][layer]
            steps = s["step"][:len(rows)]
            width = max(len(r or []) for r in rows)
            mat = np.full((width, len(rows)), np.nan)
            for j, r in enumerate(rows):
                for i, x in enumerate(r or []):
                    mat[i, j] = np.nan if x is None else x
            im = ax.imshow(mat, aspect="auto", interpolation="nearest", origin="lower", cmap="viridis",
                           vmin=0.0, vmax=max(1e-9, float(np.nanmax(mat)) if np.isfinite(mat).any() else 1.0),
                           extent=(float(steps[0]), float(steps[-1]) if len(steps) > 1 else float(steps[0]) + 1,
                                   -0.5, width - 0.5))
            ax.set_title(f"{variant_label(v)} ({layer})", fontsize=9)
            ax.set_xlabel("optimizer step")
            ax.set_ylabel("expert")
            fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="token share")
            caps.append(_run_caption(reps[v]))
        fig.suptitle(f"{BENCH_LABELS.get(b, b)} {_task_label(b, task)}: expert load share over training")
        fig.tight_layout()
        name = f"expert_load_{b}.png"
        _save(fig, os.path.join(plots_dir, name))
        plt.close(fig)
        out.append((name, f"Expert load over time, {BENCH_LABELS.get(b, b)} {_task_label(b, task)}",
                    "Share of the routed tokens per expert (rows) over optimizer steps, first MoE layer. Runs: "
                    + "; ".join(caps) + "."))

    # 3. probe top-1 flip rate over steps per method (mean over the task's runs and MoE layers)
    def has_probe(r: Run) -> bool:
        return any(_series(r).get("probe", {}).get(k) for k in _series(r).get("probe", {}) or {})

    panels = []
    for b in benches:
        task, reps = representative(study.bench_runs(b), has_probe, _task_order(b))
        if task is not None:
            panels.append((b, task, reps))
    if panels:
        fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 3.6), squeeze=False)
        caps = []
        for ax, (b, task, reps) in zip(axes[0], panels):
            parts = []
            for v in sort_variants(reps):
                lr = (reps[v].summary or {}).get("lr")
                runs = [r for r in study.bench_runs(b) if r.task == task and r.variant == v and has_probe(r)
                        and (b != "glue" or (r.summary or {}).get("lr") == lr)]
                by_step: dict[float, list[float]] = defaultdict(list)
                for r in runs:
                    probe = _series(r)["probe"]
                    for layer in sorted(probe):
                        for row in probe[layer] or []:
                            if len(row) > 1 and row[1] is not None:
                                by_step[float(row[0])].append(float(row[1]))
                steps = sorted(by_step)
                if not steps:
                    continue
                color, ls = VARIANT_STYLES.get(v, (None, "-"))
                ax.plot(steps, [math.fsum(by_step[s]) / len(by_step[s]) for s in steps], label=variant_label(v),
                        color=color, linestyle=ls, marker=".", markersize=3)
                parts.append(f"{variant_label(v)} {len(runs)} runs")
            ax.set_title(f"{BENCH_LABELS.get(b, b)}: {_task_label(b, task)}")
            ax.set_xlabel("optimizer step")
            ax.set_ylabel("top-1 flip rate (probe batch)")
            ax.legend(fontsize=8)
            caps.append(f"{BENCH_LABELS.get(b, b)} {_task_label(b, task)} ({', '.join(parts)})")
        fig.tight_layout()
        _save(fig, os.path.join(plots_dir, "probe_flip_rate.png"))
        plt.close(fig)
        out.append(("probe_flip_rate.png", "Routing fluctuation on the probe batch",
                    "Fraction of probe tokens whose top-1 expert changed since the previous probe, mean over "
                    "the runs (seeds / trial seeds and test domains) and MoE layers of one task per benchmark: "
                    + "; ".join(caps) + "."))
    return out


# --- the report ---------------------------------------------------------------------------------
H_GLUE_BEST = "GLUE dev: best dev epoch (paper protocol)"
H_GLUE_HELD = "GLUE dev: epoch chosen on held-out data"
H_GLUE_PAIRED = "GLUE paired differences"
H_DB_PAIRED = "DomainBed paired differences"
H_STAB = "Routing stability at the end of training"
H_STAB_PAIRED = "Paired stability differences"
H_FIGS = "Figures"


@dataclass
class Comparison:
    text: str
    verdict: str  # holds | against | within noise | no data


def join_comparisons(comps: Sequence[Comparison]) -> str:
    """``"A − B = +1.20 ± 0.40 points (n = 9): holds; ..."`` (comparisons without data: just their text)."""
    parts = [c.text if c.verdict == "no data" else f"{c.text}: {c.verdict}" for c in comps]
    return "; ".join(parts) or "no paired runs"


def claim_verdict(comps: Sequence[Comparison]) -> str:
    vs = [c.verdict for c in comps]
    if not vs or all(v == "no data" for v in vs):
        return "cannot tell at this scale (no paired runs)"
    if any(v == "against" for v in vs):
        return "does not hold"
    if all(v == "holds" for v in vs):
        return "holds"
    k = sum(v == "holds" for v in vs)
    return f"cannot tell at this scale ({k} of {len(vs)} comparisons beyond noise in the claimed direction)"


class Report:
    def __init__(self, study: Study, plots_rel: str, figures: list[tuple[str, str, str]], command: str):
        self.s = study
        self.plots_rel = plots_rel
        self.figures = figures
        self.command = command
        self.glue_runs = [r.summary for r in study.bench_runs("glue") if r.summary]
        self.db = study.bench_runs("domainbed")
        self.db_records = db_records(self.db)
        self.db_expected = expected_keys(study.meta.get("domainbed"), "domainbed")
        self.db_datasets = sorted({r["args"]["dataset"] for r in self.db_records} | {k[0] for k in self.db_expected})
        self.db_envs = {d: db_columns(d, self.db_records, self.db_expected) for d in self.db_datasets}

    @property
    def superseded(self) -> list[str]:
        """Why these records no longer stand (``meta.json``'s ``superseded``; a rerun's export drops it)."""
        return [f"{b}: {m['superseded']}" for b, m in sorted(self.s.meta.items()) if m.get("superseded")]

    # -- sections --
    def header(self) -> list[str]:
        n_inc = len(self.s.incomplete)
        banner = []
        if self.superseded:
            banner = ["> **Superseded: these runs were made before the fidelity fixes and are void until the study "
                      "is rerun.** No figure below is a finding about the methods; the verdicts are withheld. "
                      + " ".join(self.superseded), ""]
        return [
            "# Reproduction study: results",
            "",
            *banner,
            f"Generated by `{self.command}` from the exported run records only (run it again to regenerate "
            "this file: the same records give the same bytes).",
            "",
            "Conventions: scores and accuracies x100 with one decimal; mean ± SE over seeds with SE = sample "
            "standard deviation (n − 1) / √n (DomainBed's own `collect_results` uses the population std, "
            "slightly smaller); a single seed shows the mean only. A paired difference A − B is the mean over "
            "seeds of (A − B) for the seeds both methods finished, its SE = sample std of those differences / √n; "
            "it is *larger than noise* when |mean| > 2 SE, else *within noise*. "
            f"Run folders without a `done` file are incomplete and ignored: {n_inc}"
            + (" (" + ", ".join(f"`{d}`" for d in self.s.incomplete) + ")." if n_inc else "."),
            "",
        ]

    def provenance(self) -> list[str]:
        lines = ["## Provenance", ""]
        for b in self.s.benchmarks():
            meta = self.s.meta.get(b)
            runs = self.s.bench_runs(b)
            lines += [f"### {BENCH_LABELS.get(b, b)} runs", ""]
            if meta is None:
                lines += [f"No `{b}/meta.json`: command, wall time and planned runs unknown. "
                          f"Complete runs: {len(runs)}.", ""]
                continue
            lines.append(f"- Command: `{meta.get('command', '?')}`")
            invs = meta.get("invocations") or []
            total = math.fsum(float(i.get("wall_time_s") or 0) for i in invs)
            lines.append(f"- Wall time: {fmt_duration(total)} in total over {len(invs)} invocation(s)")
            commits = sorted({str(i.get("commit")) for i in invs if i.get("commit")})
            run_commits: dict[str, int] = defaultdict(int)
            for r in runs:
                if r.summary and r.summary.get("commit"):
                    run_commits[str(r.summary["commit"])] += 1
            lines.append("- Commit(s) of the invocations: " + (", ".join(f"`{c}`" for c in commits) or "—")
                         + "; of the runs: "
                         + (", ".join(f"`{c}` ({n} runs)" for c, n in sorted(run_commits.items())) or "—"))
            exp = expected_keys(meta, b)
            have = {r.key() for r in runs}
            done = [k for k in exp if k in have]
            extra = sorted({k for k in have if k not in set(exp)}, key=repr)
            missing = [k for k in exp if k not in have]
            inc = [d for d in self.s.incomplete if d.split("/")[0] == b]
            lines.append(f"- Jobs: {len(done)} of {len(exp)} planned runs finished"
                         + (f", {len(extra)} finished runs not in the plan" if extra else "")
                         + f"; incomplete run folders ignored: {len(inc)}")
            if missing:
                shown = ", ".join(fmt_key(b, k) for k in missing[:30])
                lines.append(f"- Planned but not finished ({len(missing)}): {shown}"
                             + (", …" if len(missing) > 30 else ""))
            short = meta.get("shortened") or []
            if short:
                lines.append("- Differs from the paper (shortened):")
                lines += [f"  - {x}" for x in short]
            lines.append("")
            if invs:
                rows = []
                for i, inv in enumerate(invs, 1):
                    rows.append([str(i), str(inv.get("started_utc", "—")), str(inv.get("finished_utc", "—")),
                                 fmt_duration(inv.get("wall_time_s")), f"`{inv.get('commit', '—')}`",
                                 str(inv.get("jobs_run", "—"))])
                lines += md_table(["invocation", "started (UTC)", "finished (UTC)", "wall time", "commit",
                                   "jobs run"], rows, "lllrlr")
                lines.append("")
        return lines

    # GLUE
    def glue_comparisons(self, selection: str, pairs: Sequence[tuple[str, str]]) -> list[tuple[str, str, Paired,
                                                                                                dict[str, Paired]]]:
        out = []
        for a, b in pairs:
            per, pooled = glue_paired(self.glue_runs, selection, a, b)
            out.append((a, b, pooled, per))
        return out

    def glue_section(self) -> list[str]:
        if not self.glue_runs and "glue" not in self.s.meta:
            return []
        planned = glue_planned(self.s.meta.get("glue"))
        lines = ["## GLUE", ""]
        for sel, head in (("best_dev", H_GLUE_BEST), ("heldout", H_GLUE_HELD)):
            lines += [f"### {head}", ""]
            if sel == "heldout" and not any(GLUE_SELECTIONS[sel][1](r) for r in self.glue_runs):
                lines += ["No run recorded held-out scores.", ""]
                continue
            t = glue_table(self.glue_runs, sel, planned=planned, title=head)
            lines += render_table(t) + [""]
        lines += [f"### {H_GLUE_PAIRED}", "",
                  "Dev-score difference in points (x100) over seeds paired by seed, each method at its kept "
                  "learning rate; \"all\" pools the (task, seed) pairs of every task.", ""]
        rows = []
        for sel in ("best_dev", "heldout"):
            for a, b, pooled, per in self.glue_comparisons(sel, GLUE_COMPARISONS + ABLATIONS):
                entries = [(glue_task_label(t), p) for t, p in per.items() if p.n > 0] + [("all", pooled)]
                if pooled.n == 0:
                    continue
                for task, p in entries:
                    rows.append([f"{variant_label(a)} − {variant_label(b)}", GLUE_SELECTIONS[sel][0], task,
                                 *fmt_diff(p), noise_verdict(p)])
        return lines + paired_table(["comparison", "selection", "task"], rows) + [""]

    # DomainBed
    def db_variants(self) -> list[str]:
        return sort_variants({r["args"]["algorithm"] for r in self.db_records} | {k[1] for k in self.db_expected})

    def domainbed_section(self) -> list[str]:
        if not self.db and "domainbed" not in self.s.meta:
            return []
        lines = ["## DomainBed", ""]
        variants = self.db_variants()
        for d in self.db_datasets:
            exp = [k for k in self.db_expected if k[0] == d]
            for m in DB_METHODS:
                t = db_table(self.db_records, d, m, exp, [v for v in variants if any(
                    k[1] == v for k in exp) or any(r["args"]["algorithm"] == v and r["args"]["dataset"] == d
                                                   for r in self.db_records)], self.db_envs[d])
                lines += [f"### {t.title}", ""] + render_table(t) + [""]
        lines += [f"### {H_DB_PAIRED}", "",
                  "Accuracy difference in points (x100): per trial seed, the mean over the test domains of "
                  "(method − baseline) (only trial seeds where both have every test domain), then mean ± SE over "
                  "trial seeds; \"all\" pools the (dataset, trial seed) pairs.", ""]
        rows = []
        for m in DB_METHODS:
            for a, b in DB_COMPARISONS:
                per, pooled = db_paired(self.db_records, m, a, b, self.db_datasets, self.db_envs)
                if pooled.n == 0:
                    continue
                for d, p in list((d, p) for d, p in per.items() if p.n > 0) + [("all", pooled)]:
                    rows.append([f"{variant_label(a)} − {variant_label(b)}", m.name, d, *fmt_diff(p),
                                 noise_verdict(p)])
        return lines + paired_table(["comparison", "model selection", "dataset"], rows) + [""]

    # stability
    def stability_section(self) -> list[str]:
        lines = [f"## {H_STAB}", "",
                 "Last logged value of each routing metric per MoE layer (SPEC §6), averaged over the MoE layers "
                 "of a run, then over runs (all seeds, learning rates, test domains); n = runs. load CV = std/mean "
                 "of the tokens per expert; dead experts = active experts without tokens; top-1 flip rate and "
                 "Jaccard churn on the fixed probe batch since the previous probe; fusion drift = ‖π_τ − π_τ−Δ‖₁ "
                 "(Stateful Fusion only). Dense models have no router and are left out; — = not logged.", ""]
        rows = []
        for b in self.s.benchmarks():
            runs = [r for r in self.s.bench_runs(b) if r.summary]
            for task in _task_order(b)({r.task for r in runs}):
                for v in sort_variants({r.variant for r in runs if r.task == task}):
                    rs = [r for r in runs if r.task == task and r.variant == v]
                    if not any((r.summary or {}).get("stability") for r in rs):
                        continue
                    row = [BENCH_LABELS.get(b, b), _task_label(b, task), variant_label(v), str(len(rs))]
                    for key, _, digits in STABILITY_KEYS:
                        vals = [x for x in (run_stability(r.summary, key) for r in rs) if x is not None]
                        m, _, n = mean_se(vals)
                        row.append(fmt_num(m, digits) + (f" ({n})" if 0 < n < len(rs) else ""))
                    rows.append(row)
        if rows:
            lines += md_table(["benchmark", "task", "method", "n"] + [lab for _, lab, _ in STABILITY_KEYS], rows,
                              "lllr" + "r" * len(STABILITY_KEYS))
            lines.append("")
            lines.append("A value followed by (k) was logged by k of the n runs only.")
        else:
            lines.append("No run logged routing-stability metrics yet.")
        lines += ["", f"### {H_STAB_PAIRED}", "",
                  "RMoE − baseline per metric over runs paired by condition (GLUE: task, learning rate, seed; "
                  "DomainBed: dataset, test domain, trial seed), pooled over tasks; lower is more stable.", ""]
        rows = []
        for b, base, _key, label, p in self.stability_pairs():
            if p.n:
                rows.append([BENCH_LABELS.get(b, b), label, f"RMoE − {variant_label(base)}",
                             *fmt_diff(p, scale=1.0, digits=4), noise_verdict(p)])
        return lines + paired_table(["benchmark", "metric", "comparison"], rows) + [""]

    def stability_pairs(self) -> list[tuple[str, str, str, str, Paired]]:
        out = []
        for b in self.s.benchmarks():
            runs = [r for r in self.s.bench_runs(b) if r.summary]
            bases = [x for _, x in (GLUE_COMPARISONS if b == "glue" else DB_COMPARISONS)]
            for key, label, _ in STABILITY_CLAIMS:
                for base in bases:
                    p = paired_difference(stability_values(runs, "rmoe", key), stability_values(runs, base, key))
                    out.append((b, base, key, label, p))
        return out

    def figures_section(self) -> list[str]:
        lines = [f"## {H_FIGS}", ""]
        if not self.figures:
            return lines + ["No run logged series to plot yet.", ""]
        for name, title, caption in self.figures:
            lines += [f"### {title}", "", f"![{title}]({self.plots_rel}/{name})", "", caption, ""]
        return lines

    # claims
    def claims_section(self) -> list[str]:
        rule = ("Rule used for every verdict: a comparison *holds* when its paired difference (method − baseline, "
                "over seeds paired by seed) lies more than 2 SE from zero in the claimed direction, is *against* "
                "when it lies more than 2 SE from zero the other way, and is *within noise* otherwise. A claim "
                "**holds** when all of its comparisons hold, **does not hold** when any comparison is against, "
                "and otherwise we **cannot tell at this scale**. With three seeds the 2-SE rule is a lenient "
                "screen, not a significance test.")
        lines = ["## The paper's claims at this scale", "", rule, ""]
        if self.superseded:
            return ["## The paper's claims at this scale", "", "Withheld: the records below were made with the "
                    "superseded methods (see the note at the top).", ""]

        # 1. GLUE
        comps = [Comparison(diff_sentence(a, b, p, "points"), direction_verdict(p))
                 for a, b, p, _ in self.glue_comparisons("best_dev", GLUE_COMPARISONS[::-1])]
        held = [diff_sentence(a, b, p, "points") + f" ({direction_verdict(p)})"
                for a, b, p, _ in self.glue_comparisons("heldout", GLUE_COMPARISONS[::-1]) if p.n]
        extra = ("With the epoch chosen on held-out data instead (not used for the verdict): "
                 + "; ".join(held) + ". ") if held else ""
        lines += ["**1. RMoE beats the top-k MoE baseline and DynMoE on GLUE dev (paper: on every task).** "
                  "Paired over (task, seed), best dev epoch, each method at its kept learning rate: "
                  + join_comparisons(comps) + ". " + extra
                  + f"Verdict: **{claim_verdict(comps)}** (see {link(H_GLUE_PAIRED)}, {link(H_GLUE_BEST)}).", ""]
        # 2. DomainBed
        comps = []
        for a, b in DB_COMPARISONS:
            _, pooled = db_paired(self.db_records, IIDAccuracySelectionMethod, a, b, self.db_datasets, self.db_envs)
            comps.append(Comparison(diff_sentence(a, b, pooled, "points"), direction_verdict(pooled)))
        datasets = ", ".join(self.db_datasets) or "no dataset"
        lines += [f"**2. RMoE beats GMoE and DynMoE on DomainBed (paper: PACS, VLCS, OfficeHome, DomainNet; here "
                  f"{datasets}).** Test-domain accuracy under training-domain validation, mean over test domains "
                  "per trial seed, paired over (dataset, trial seed): "
                  + join_comparisons(comps) + f". Verdict: **{claim_verdict(comps)}** (see {link(H_DB_PAIRED)}).", ""]
        # 3. stability
        comps = []
        for b, base, _key, label, p in self.stability_pairs():
            if p.n == 0:
                continue
            same = " (identical in every pair)" if p.mean == 0 and p.se == 0 else ""
            comps.append(Comparison(f"{BENCH_LABELS.get(b, b)} {label} "
                                    + diff_sentence("rmoe", base, p, "", scale=1.0, digits=4) + same,
                                    direction_verdict(p, -1)))
        lines += ["**3. Regulation makes routing more stable: lower routing fluctuation, fewer dead experts, "
                  "more balanced load than the baselines.** End-of-training values, RMoE − baseline paired by run "
                  "condition (lower = more stable): "
                  + join_comparisons(comps)
                  + f". Verdict: **{claim_verdict(comps)}** (see {link(H_STAB_PAIRED)}, {link(H_STAB)} and the "
                  f"probe flip-rate figure under {link(H_FIGS)}).", ""]
        # 4. ablations
        ablations = self.glue_comparisons("best_dev", ABLATIONS)
        comps = [Comparison(diff_sentence(a, b, p, "points"), direction_verdict(p)) for a, b, p, _ in ablations]
        abl_tasks = [glue_task_label(t) for t in sort_glue_tasks({t for _, _, _, per in ablations
                                                                  for t, q in per.items() if q.n > 0})]
        lines += ["**4. Both mechanisms contribute (the paper calls Phased Curriculum and Stateful Fusion "
                  "synergistic): full RMoE beats RMoE without Stateful Fusion and RMoE without the curriculum.** "
                  f"GLUE dev, best dev epoch, paired over (task, seed) on {', '.join(abl_tasks) or 'no task'}: "
                  + join_comparisons([c for c in comps if c.verdict != "no data"])
                  + f". Verdict: **{claim_verdict(comps)}** (see {link(H_GLUE_PAIRED)}).", ""]
        return lines

    def render(self) -> str:
        parts = (self.header() + self.claims_section() + self.provenance() + self.glue_section()
                 + self.domainbed_section() + self.stability_section() + self.figures_section())
        text = "\n".join(parts)
        text = re.sub(r"\n{3,}", "\n\n", text).rstrip() + "\n"
        return text


def generate(results_dir: str, output: str, plots_dir: str | None = None, command: str | None = None) -> str:
    """Write the report (and its plots); returns the report text."""
    if not os.path.isdir(results_dir):
        raise SystemExit(f"results folder {results_dir!r} does not exist")
    out_dir = os.path.dirname(os.path.abspath(output))
    plots_dir = plots_dir or os.path.join(out_dir, "plots")
    study = load_study(results_dir)
    figures = make_plots(study, plots_dir)
    rel = os.path.relpath(os.path.abspath(plots_dir), out_dir).replace(os.sep, "/")
    text = Report(study, rel, figures, command or DEFAULT_COMMAND).render()
    os.makedirs(out_dir, exist_ok=True)
    with open(output, "w", encoding="utf-8", newline="\n") as f:
        f.write(text)
    return text


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Write the study report (RESULTS.md + plots) from exported run records.")
    p.add_argument("results_dir", nargs="?", default="docs/results", help="exported records (default docs/results)")
    p.add_argument("--output", default=None, help="report file (default: <results_dir>/../RESULTS.md)")
    p.add_argument("--plots", default=None, help="plot folder (default: <output folder>/plots)")
    a = p.parse_args(argv)
    output = a.output or os.path.join(os.path.dirname(os.path.abspath(a.results_dir.rstrip("/"))), "RESULTS.md")
    generate(a.results_dir, output, a.plots)
    print(f"wrote {output}", file=sys.stderr)


if __name__ == "__main__":
    main()
