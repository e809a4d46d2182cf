"""The reproduction study's report, regenerated from the exported run records only.

``python -m tasks.study_report docs/results --output docs/RESULTS.md`` (= ``python -m
tasks.study.report``; plots go to ``docs/plots/``, ``--plots DIR`` to change) reads, below
``docs/results/`` (:func:`tasks.study.data.load_study`, i.e. :mod:`tasks.results.records`):

* ``<bench>/meta.json``: the command, invocations (start, end, wall time, commit, jobs run), the
  planned runs (``expected``), what differs from the paper (``shortened``), the study version
  (``study_version``) and a superseded study's provenance (``previous``, or ``superseded`` on a
  meta.json that was itself superseded);
* every run folder: ``summary.json`` (schema 1) and, for DomainBed, ``results.jsonl``; folders
  without a ``done`` file are incomplete and ignored (and counted), debug runs are left out; records
  of an older study version than their benchmark's are superseded (counted, left out of everything);
  ``ceiling/`` holds the GLUE full-fine-tune ceilings.

* ``glue_dev_labels.json``: the GLUE dev sets' label counts (:mod:`tasks.study.devlabels`), for the gates;

and writes Markdown with: provenance per benchmark, the paper's claims each with a verdict
(:mod:`tasks.study.claims`: paired t-tests, Holm over each claim, only tasks / datasets that passed
their gate), the ceilings, the GLUE gates (:func:`tasks.study.data.glue_gate`: the constant-prediction
score and its SE, degenerate runs) and the DomainBed floors, what a missed floor would take per method,
what changed since the superseded study and since version 2 of the report, the GLUE tables (best dev
epoch = paper protocol; dev score at the best held-out epoch) with the constant-prediction row and
degenerate runs marked, the DomainBed tables per dataset (training-domain validation, oracle), paired
differences RMoE − baseline over seeds with the minimum detectable effect at 80 % power
(:mod:`tasks.study.power`) beside the paper's gap, the routing-stability table at the end of training
and figures from the logged series (:mod:`tasks.study.plots`).

Deterministic: the same ``docs/results/`` gives the same bytes (everything sorted, no clock, no
absolute paths; PNGs without a Software/date stamp). Statistics: :mod:`tasks.results.stats` (mean ±
SE over seeds with ``SE = std(ddof=1) / sqrt(n)``; a paired difference is the mean of the per-seed
differences with SE = std(differences, ddof=1) / sqrt(n); the tables' per-row screen "larger than
noise" = ``|mean| > 2 SE``, uncorrected).
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
from collections import defaultdict
from collections.abc import Sequence

from tasks.results.glue import SELECTIONS as GLUE_SELECTIONS
from tasks.results.glue import cells as glue_cells
from tasks.results.glue import glue_planned, glue_table, run_variant
from tasks.results.labels import (
    GLUE_TASK_ORDER,
    bench_label,
    glue_task_label,
    sort_glue_tasks,
    sort_variants,
    task_label,
    task_order,
    variant_label,
)
from tasks.results.stats import Paired, mean_se, noise_verdict, paired_difference
from tasks.results.table import fmt_lr, fmt_num, fmt_score, md_table, table_lines

from .claims import claims_section
from .data import (
    ABLATIONS,
    CEILING,
    DB_COMPARISONS,
    DB_METHODS,
    DEGENERATE_SHARE,
    DEGENERATE_STD,
    DEV_LABELS_FILE,
    EXTRA_COMPARISONS,
    GATE_RECOVERY,
    GATE_SES,
    GLUE_COMPARISONS,
    STABILITY_CLAIMS,
    STABILITY_KEYS,
    Study,
    ceiling_rows,
    ceilings,
    constant_baseline,
    db_columns,
    db_floors,
    db_paired,
    db_records,
    db_table,
    degenerate,
    expected_keys,
    gate_floor,
    glue_gate,
    glue_paired,
    glue_runs,
    load_study,
    paper_gap,
    paper_gap_pooled,
    plan_key,
    read_dev_labels,
    run_stability,
    selected_epoch,
    stability_values,
)
from .devlabels import COMMAND as DEV_LABELS_COMMAND
from .parallel import DEFAULT_JOBS  # the study's jobs in parallel
from .plots import make_plots
from .text import (
    CHANGES,
    H_CEIL,
    H_CHANGED,
    H_CLAIMS,
    H_DB_PAIRED,
    H_FIGS,
    H_FLOOR_COST,
    H_FLOOR_TABLE,
    H_FLOORS,
    H_GATES,
    H_GLUE_BEST,
    H_GLUE_HELD,
    H_GLUE_PAIRED,
    H_STAB,
    H_STAB_PAIRED,
    REPORT_CHANGES,
    V3_CHANGES,
    fmt_diff,
    fmt_duration,
    fmt_key,
    fmt_power,
    link,
    paired_table,
)

DEFAULT_COMMAND = "python -m tasks.study_report docs/results --output docs/RESULTS.md"
__all__ = ["DEFAULT_COMMAND", "Report", "generate", "load_study", "main"]


class Report:
    def __init__(self, study: Study, plots_rel: str, figures: list[tuple[str, str, str]], command: str):
        self.s = study
        self.plots_rel = plots_rel
        self.figures = figures
        self.command = command
        self.glue_runs = glue_runs(study)
        self.db = study.bench_runs("domainbed")
        self.db_records = db_records(self.db)
        self.db_expected = expected_keys(study.meta.get("domainbed"), "domainbed")
        self.db_datasets = sorted({r["args"]["dataset"] for r in self.db_records} | {k[0] for k in self.db_expected})
        self.db_envs = {d: db_columns(d, self.db_records, self.db_expected) for d in self.db_datasets}
        self.ceiling_rows = ceiling_rows(study.ceiling)
        self.ceilings = ceilings(self.ceiling_rows)
        self.dev_labels = read_dev_labels(study.results_dir)
        self.headlines = {str(r["task"]): str(r["headline"]) for r in self.glue_runs if r.get("headline")}
        self.headlines.update({r.task: str(r.summary["headline"]) for r in study.ceiling
                               if r.summary and r.summary.get("headline")})
        best = glue_cells(self.glue_runs, "best_dev")
        self.gates = {}
        for t in sort_glue_tasks(set(self.ceilings) | {t for t, v in best if v == "dense"}):
            dense = best.get((t, "dense"))
            c = self.ceilings.get(t)
            self.gates[t] = glue_gate(t, self.baseline(t),
                                      [dense["scores"][k] for k in sorted(dense["scores"], key=repr)] if dense else [],
                                      None if c is None else c.last)
        self.db_floors = db_floors(self.db_records, self.db_envs)
        self.floors = [gate_floor(g) for g in self.gates.values()] + self.db_floors

    @property
    def superseded(self) -> list[str]:
        """Why a benchmark's records no longer stand, while its meta.json is itself the superseded
        study's (``superseded``; the rerun's meta.json keeps it under ``previous``)."""
        return [f"{b}: {m['superseded']}" for b, m in sorted(self.s.meta.items()) if m.get("superseded")]

    def is_superseded(self, bench: str) -> bool:
        return bool((self.s.meta.get(bench) or {}).get("superseded"))

    def glue_tasks(self) -> list[str]:
        """The GLUE tasks with runs, in the paper's order."""
        return sort_glue_tasks({str(r["task"]) for r in self.glue_runs})

    def baseline(self, task: str):
        return constant_baseline(task, self.headlines.get(task), self.dev_labels.get(task))

    def not_learning(self) -> list[str]:
        """GLUE tasks whose full fine-tune does not itself pass the constant score's bar (left out)."""
        return [t for t, g in self.gates.items() if g.status == "does not learn"]

    def verdict_tasks(self) -> list[str]:
        """The GLUE tasks whose dense model passed its gate: the only ones in the verdicts."""
        return [t for t in self.glue_tasks() if t in self.gates and self.gates[t].status == "passes"]

    def gate_note(self, task: str) -> str:
        """`` (gate failed)`` / `` (does not learn)`` / `` (gate not checked)`` after a task left out."""
        g = self.gates.get(task)
        if g is None or g.status == "cannot check":
            return " (gate not checked)"
        return {"passes": "", "fails": " (gate failed)", "does not learn": " (does not learn)"}[g.status]

    def out_of_verdicts(self) -> str:
        """``" (left out: CoLA gate failed, RTE does not learn at this scale)"`` or ``""``."""
        out = [t for t in self.glue_tasks() if t not in self.verdict_tasks()]
        if not out:
            return ""
        why = {"fails": "gate failed", "does not learn": "does not learn at this scale"}
        return (" (left out: " + ", ".join(f"{glue_task_label(t)} {why.get(self.gates[t].status, 'gate not checked')}"
                                           if t in self.gates else f"{glue_task_label(t)} gate not checked"
                                           for t in out) + ")")

    def db_verdict_datasets(self) -> list[str]:
        """The DomainBed datasets whose every dense floor holds: the only ones in the verdicts."""
        return [d for d in self.db_datasets
                if (fs := [f for f in self.db_floors if f.key == d]) and all(f.status == "holds" for f in fs)]

    # -- sections --
    def header(self) -> list[str]:
        n_inc = len(self.s.incomplete)
        banner = []
        if self.superseded:
            banner = ["> **Superseded: these runs were made before the fidelity fixes and are void until the study "
                      "is rerun.** No figure below is a finding about the methods; the verdicts are withheld. "
                      + " ".join(self.superseded), ""]
        if self.s.superseded:
            per = [f"{bench_label(b)} {len(self.s.superseded_in(b))}" for b in self.s.benchmarks()
                   if self.s.superseded_in(b)]
            n = len(self.s.superseded)
            banner += [f"> **{n} record{'s' if n != 1 else ''} of the superseded study {'are' if n != 1 else 'is'} "
                       "left out** ("
                       + ", ".join(per) + "). They are of an earlier version of the study (see "
                       f"{link(H_CHANGED)}) and stay in `docs/results/` until the rerun replaces them job by job; "
                       "every table, figure, floor and verdict below uses only the records of the current study. "
                       "A record's version is the `study_version=N` override it was launched with "
                       "(`.hydra/overrides.yaml`; none = 1), the study's is `study_version` in "
                       "`<benchmark>/meta.json`.", ""]
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
            "in the tables it is *larger than noise* when |mean| > 2 SE, else *within noise* (a per-row screen, "
            "uncorrected; the claims use paired t-tests with Holm's correction). 2 SE is the significance "
            "threshold, not what the design can detect: a true difference of 2 SE is found about half the time; "
            "the minimum detectable effect (MDE) at 80 % power and two-sided α = 0.05 is "
            "(t₀.₉₇₅,ₙ₋₁ + t₀.₈,ₙ₋₁) · SE. "
            f"Run folders without a `done` file are incomplete and ignored: {n_inc}"
            + (" (" + ", ".join(f"`{d}`" for d in self.s.incomplete) + ")." if n_inc else ".")
            + (f" Debug runs left out: {len(self.s.debug)} (" + ", ".join(f"`{d}`" for d in self.s.debug) + ")."
               if self.s.debug else ""),
            "",
        ]

    def provenance_benches(self) -> list[str]:
        return self.s.benchmarks() + ([CEILING] if CEILING in self.s.meta or self.s.ceiling else [])

    def provenance(self) -> list[str]:
        lines = ["## Provenance", ""]
        for b in self.provenance_benches():
            meta = self.s.meta.get(b)
            runs = self.s.bench_runs(b)
            lines += [f"### {bench_label(b)} runs", ""]
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
            have = {plan_key(r, b) for r in runs}
            done = [k for k in exp if k in have]
            extra = sorted({k for k in have if k not in set(exp)}, key=repr)
            missing = [k for k in exp if k not in have]
            inc = [d for d in self.s.incomplete if d.split("/")[0] == b]
            old = self.s.superseded_in(b)
            lines.append(f"- Jobs: {len(done)} of {len(exp)} planned runs finished"
                         + (f", {len(extra)} finished runs not in the plan" if extra else "")
                         + f"; incomplete run folders ignored: {len(inc)}"
                         + (f"; superseded records left out: {len(old)}" if old else ""))
            if "study_version" in meta:
                lines.append(f"- Study version: {meta['study_version']}")
            if missing:
                shown = ", ".join(fmt_key(b, k) for k in missing[:30])
                lines.append(f"- Planned but not finished ({len(missing)}): {shown}"
                             + (", …" if len(missing) > 30 else ""))
            short = meta.get("shortened") or []
            if short:
                lines.append("- Settings (same for every method)" if b == CEILING
                             else "- Differs from the paper (shortened):")
                lines += [f"  - {x}" for x in short]
            prev = meta.get("previous") or {}
            if prev.get("invocations"):
                pinv = prev["invocations"]
                pwall = math.fsum(float(i.get("wall_time_s") or 0) for i in pinv)
                pcommits = sorted({str(i.get("commit")) for i in pinv if i.get("commit")})
                lines.append(f"- The superseded study (version {prev.get('study_version', 1)}): {len(pinv)} "
                             f"invocation(s), {fmt_duration(pwall)}, commit(s) "
                             + (", ".join(f"`{c}`" for c in pcommits) or "—"))
            lines.append("")
            if invs:
                rows = []
                for i, inv in enumerate(invs, 1):
                    rows.append([str(i), str(inv.get("started_utc", "—")), str(inv.get("finished_utc", "—")),
                                 fmt_duration(inv.get("wall_time_s")), f"`{inv.get('commit', '—')}`",
                                 str(inv.get("jobs_run", "—"))
                                 + (" (stopped by the budget)" if inv.get("stopped_by_budget") else "")])
                lines += md_table(["invocation", "started (UTC)", "finished (UTC)", "wall time", "commit",
                                   "jobs run"], rows, "lllrlr")
                lines.append("")
        return lines

    # ceilings and floors
    def floors_section(self) -> list[str]:
        lines = [f"## {H_FLOORS}", "",
                 "A verdict is drawn only from models that learned, with one gate per GLUE task, the same for every "
                 "method: the dense model (best dev epoch, mean over seeds) beats the dev set's constant-prediction "
                 f"score by at least {GATE_SES:.0f} of the dev set's SEs **and** recovers at least "
                 f"{100 * GATE_RECOVERY:.0f} % of the full fine-tune's gain over that score, (dense − constant) / "
                 "(ceiling − constant). The ceiling is the dev score of a full fine-tune of the same backbone (all "
                 "layers, full training set, 3 epochs) after its last epoch at the best of its learning rates; a "
                 f"task whose ceiling itself stays below constant + {GATE_SES:.0f} SE does not learn at this scale. "
                 "A task that fails its gate is left out of every verdict (claims 1, 3 and 4). DomainBed: the dense "
                 "model's test accuracy under training-domain validation reaches the floors below (DomainBed's ERM: "
                 + "; ".join(f"{d} {v}" for d, v in self.DB_ERM.items()) + "); a dataset whose floors do not all "
                 "hold is left out of claims 2 and 3.", "",
                 f"### {H_CEIL}", ""]
        if not self.ceiling_rows:
            lines += ["No full-fine-tune record yet (`make reproduce-ceiling` writes `docs/results/ceiling/`).", ""]
        else:
            rows = []
            for r in self.ceiling_rows:
                head = f" ({r.headline})" if r.headline else ""
                best = fmt_num(100 * r.best, 1) + (f" (epoch {r.best_epoch})" if r.best_epoch else "")
                mark = " ← ceiling" if self.ceilings.get(r.task) is r else ""
                rows.append([glue_task_label(r.task) + head, fmt_lr(r.lr), str(r.n), str(r.epochs),
                             fmt_num(100 * r.last, 1) + mark, best])
            lines += md_table(["task (metric)", "lr", "runs", "epochs", "dev, last epoch", "dev, best epoch"],
                              rows, "lrrrrr")
            lines += ["", "Dev score x100 (mean over runs when an lr has several). The ceiling of a task is the "
                      "last-epoch dev score of its best lr (ties: the smaller lr).", ""]
        lines += self.gates_lines()
        lines += [f"### {H_FLOOR_TABLE}", ""]
        rows = []
        for f in self.floors:
            req = "—" if f.required is None else fmt_num(100 * f.required, 1)
            got = "—" if f.measured is None else fmt_score(f.measured, f.se) + f" (n={f.n})"
            rows.append([bench_label(f.bench), f.what, req, got, f.detail])
        lines += md_table(["benchmark", "floor", "required", "dense", "verdict"], rows, "lllrl")
        lines += ["", f"GLUE: required = the larger of constant + {GATE_SES:.0f} SE and constant + "
                  f"{100 * GATE_RECOVERY:.0f} % of (ceiling − constant); dense = the study's {link(H_GLUE_BEST)} cell. "
                  "DomainBed: dense = the training-domain-validation table's cell (Avg: mean over the test domains "
                  "per trial seed, then over trial seeds). A floor holds when the mean reaches it.", ""]
        return lines + self.floor_cost_lines()

    def gates_lines(self) -> list[str]:
        """The GLUE gate per task: the constant-prediction score, its SE, the bar, ceiling, dense, recovery."""
        lines = [f"### {H_GATES}", ""]
        if not self.gates:
            return lines + ["No GLUE task to gate yet.", ""]
        rows = []
        for t, g in self.gates.items():
            b = g.base
            rows.append([glue_task_label(t) + (f" ({b.metric})" if b else ""),
                         "—" if b is None else f"{100 * b.score:.1f} ({b.what})",
                         "—" if b is None else f"{100 * b.se:.2f} ({b.se_what}, n = {b.n})",
                         "—" if g.bar is None else f"{100 * g.bar:.1f}",
                         "—" if g.ceiling is None else f"{100 * g.ceiling:.1f}",
                         "—" if g.dense is None else fmt_score(g.dense, g.dense_se),
                         "—" if g.recovery is None or g.status not in ("passes", "fails")
                         else f"{100 * g.recovery:.0f} %",
                         {"passes": "**passes**", "fails": "fails", "does not learn": "does not learn at this scale",
                          }.get(g.status, "cannot check")])
        lines += md_table(["task", "constant prediction", "SE", f"constant + {GATE_SES:.0f} SE", "ceiling", "dense",
                           "recovered gain", "gate"], rows, "lrrrrrrl")
        lines += ["", "Scores x100 on each task's headline metric, from the dev label counts in "
                  f"`docs/results/{DEV_LABELS_FILE}` (written by `{DEV_LABELS_COMMAND}`; the study evaluates the "
                  "whole dev set). Constant prediction: acc — the majority class; MRPC's (acc + F1) / 2 — the better "
                  "of the two constant answers (always \"paraphrase\": accuracy P/n, F1 2P/(2P+N)); MCC — 0 (a "
                  "constant prediction has no correlation). SE: on the accuracy scale the binomial SE √(p(1−p)/n) of "
                  "the constant answer's accuracy p, used unchanged for (acc + F1) / 2; for MCC 1/√n, the SE of the "
                  "phi coefficient (= MCC) of two independent binary variables (n·MCC² = χ²₁). Recovered gain = "
                  "(dense − constant) / (ceiling − constant).", ""]
        return lines + self.degenerate_lines()

    def degenerate_lines(self) -> list[str]:
        """How many runs per (task, method) predict one class on ≥ 98 % of dev at the best dev epoch."""
        rows = []
        for t in self.glue_tasks():
            dev = self.dev_labels.get(t)
            for v in sort_variants({run_variant(r) for r in self.glue_runs if r["task"] == t}):
                flags = [degenerate(selected_epoch(r, "best_dev"), dev) for r in self.glue_runs
                         if r["task"] == t and run_variant(r) == v]
                rows.append([glue_task_label(t), variant_label(v), str(len(flags)),
                             str(sum(f == "yes" for f in flags)), str(sum(f == "possibly" for f in flags)),
                             str(sum(f is None for f in flags))])
        if not rows:
            return []
        recorded = any((selected_epoch(r, "best_dev") or {}).get(k) is not None
                       for r in self.glue_runs for k in ("pred_top_share", "pred_std"))
        how = ("Runs that recorded their prediction spread (the dev metrics `pred_top_share`, the share of the "
               "most-predicted class, and for regression `pred_std`) are told from it; a regression run is "
               f"*degenerate* when its predictions' standard deviation is below {100 * DEGENERATE_STD:.0f} % of the "
               "dev labels'. For runs without it " if recorded else
               "The records hold no predictions or confusion matrices, only the dev metrics, so ")
        return ([f"Degenerate runs at the best dev epoch: a run is *degenerate* when at least "
                 f"{100 * DEGENERATE_SHARE:.0f} % of its dev predictions are one class. " + how +
                 "the prediction counts are "
                 "reconstructed: every binary confusion matrix with the dev set's label counts that reproduces the "
                 "recorded accuracy and, where recorded, F1 (MRPC) or MCC (CoLA) to 1e-4. F1 or MCC pins one matrix "
                 "(*degenerate* or not); accuracy alone (RTE) only bounds it: *possibly* = some consistent matrix "
                 "is degenerate, so degeneracy cannot be excluded; unknown = no label counts, or a regression or "
                 "multi-class task without a recorded spread." + ("" if recorded else
                 " The export should record the per-class prediction counts (regression: the prediction "
                 "variance) so that every run can be told."),
                 ""]
                + md_table(["task", "method", "runs", "degenerate", "possibly", "unknown"], rows, "llrrrr") + [""])

    #: DomainBed's protocol: steps per run (``N_STEPS`` of its train.py) and its ERM's numbers
    DB_PROTOCOL_STEPS = 5001
    DB_ERM = {"RotatedMNIST": "97.9 average", "ColoredMNIST": "71.7 / 72.9 on +90 % / +80 %"}

    def _planned_variants(self, bench: str, key: str) -> dict[str, int]:
        """``{variant: planned jobs}`` of a task / dataset (the records' own when meta.json plans none)."""
        out: dict[str, int] = defaultdict(int)
        for k in expected_keys(self.s.meta.get(bench), bench):
            if k[0] == key:
                out[k[1]] += 1
        if not out:
            for r in self.s.bench_runs(bench):
                if r.task == key:
                    out[r.variant] += 1
        return dict(out)

    def _donor(self, bench: str, key: str) -> str | None:
        """A gate-only task / dataset (only its dense model planned): the benchmark's task / dataset with
        the most planned methods, whose plan and measured job-time ratios stand in for a full cell here."""
        plans = {k: self._planned_variants(bench, k) for k in {e[0] for e in expected_keys(self.s.meta.get(bench),
                                                                                             bench)} if k != key}
        plans = {k: p for k, p in plans.items() if len(p) > 1 and p.get("dense")}
        return max(sorted(plans), key=lambda k: len(plans[k])) if plans else None

    def _timed_runs(self, bench: str, task: str, variants) -> list:
        """The runs of ``task`` (of ``variants``) whose summary holds a wall time (DomainBed: and its steps)."""
        def timed(s: dict) -> bool:  # GLUE: any recorded time (as mean_wall_s); DomainBed: a time and steps
            if bench == "glue":
                return s.get("wall_time_s") is not None
            return bool(s.get("wall_time_s") and s.get("global_step"))

        return [r for r in self.s.bench_runs(bench)
                if r.task == task and r.variant in variants and timed(r.summary or {})]

    def _job_times(self, bench: str, task: str, donor: str | None, variants) -> dict[str, float]:
        """``{variant: measured time}`` on ``task`` -- GLUE: the mean job time (s), DomainBed: the mean seconds
        per step -- for the variants that have one. With a ``donor`` (``task`` ran only its dense model): the
        dense time here times each variant's ratio to dense measured on the donor."""
        def measured(t: str) -> dict[str, float]:
            out: dict[str, list[float]] = defaultdict(list)
            for r in self._timed_runs(bench, t, variants):
                wall = float(r.summary["wall_time_s"])
                out[r.variant].append(wall if bench == "glue" else wall / int(r.summary["global_step"]))
            return {v: math.fsum(x) / len(x) for v, x in out.items() if x}

        here = measured(task)
        if donor and here.get("dense"):
            there = measured(donor)
            if there.get("dense"):
                here = {v: here["dense"] * there[v] / there["dense"] for v in there}
        return here

    def floor_cost_lines(self) -> list[str]:
        """For each missed floor, what reaching it would cost here: per method, the planned jobs x the
        measured per-job time of the setting that would be used (GLUE: the ceiling's setting, whose
        jobs are dense, scaled per method by the study's own MoE / dense job-time ratio on the task;
        DomainBed: each method's own measured seconds per step x the protocol's steps)."""
        misses = [f for f in self.floors if f.status == "misses"]
        if not misses:
            return []
        lines = [f"### {H_FLOOR_COST}", "",
                 "Job times are the records' `wall_time_s` (one job, one thread, beside another job), per method, "
                 "so the costs below are estimates for this machine, not measurements of the longer runs.", ""]
        by_key: dict[tuple[str, str], list] = {}
        for f in misses:
            by_key.setdefault((f.bench, f.key), []).append(f)
        for (bench, key), fs in by_key.items():
            f = fs[0]
            label = glue_task_label(key) if bench == "glue" else key
            what = "; ".join(" ".join(filter(None, (g.part, g.detail.split(";")[0]))) for g in fs)
            head = f"- **{label}** ({what}): "
            plan = self._planned_variants(bench, key)
            donor = self._donor(bench, key) if set(plan) == {"dense"} else None
            if donor:  # only the dense model ran here: a full cell as planned on the donor, at the donor's ratios
                dp = self._planned_variants(bench, donor)
                plan = {v: max(1, round(plan["dense"] * n / dp["dense"])) for v, n in dp.items()}
                head += (f"only its dense model is in the study (a gate check); a full cell has the methods and "
                         f"runs planned on {glue_task_label(donor) if bench == 'glue' else donor}, scaled to "
                         f"this one's {plan['dense']} dense runs, each method at its job-time "
                         f"ratio to dense measured there: ")
            par = DEFAULT_JOBS[bench]
            if bench == "glue":
                c = self.ceilings.get(key)
                ceil_walls = [float(r.summary["wall_time_s"]) for r in sorted(self.s.ceiling, key=lambda r: r.rel)
                              if r.task == key and r.summary and r.summary.get("wall_time_s") is not None]
                study = self._job_times(bench, key, donor, plan)
                if c is None or not ceil_walls or not study.get("dense"):
                    lines.append(head + "the ceiling's or the study's dense records hold no wall time.")
                    continue
                per_dense = math.fsum(ceil_walls) / len(ceil_walls)
                jobs = {v: per_dense * (study.get(v) or study["dense"]) / study["dense"] for v in plan}
                total = math.fsum(plan[v] * jobs[v] for v in plan)
                per = ", ".join(f"{variant_label(v)} {plan[v]} × {fmt_duration(jobs[v])}"
                                + (f" (× {study[v] / study['dense']:.2f})" if v != "dense" and study.get(v) else "")
                                for v in sort_variants(plan))
                lines.append(head + "the ceiling's setting (every layer trained, the full training set, 3 epochs, "
                             "length 128) reaches the ceiling by definition. Its dense job took "
                             f"{fmt_duration(per_dense)} (the mean of the task's {len(ceil_walls)} ceiling job(s), "
                             "one setting at different learning rates: "
                             + ", ".join(fmt_duration(w) for w in ceil_walls)
                             + "); each MoE method's job is that time times its own measured job-time ratio to "
                             "dense in this study on the task (in brackets). The task's planned study jobs: " + per
                             + f" = {fmt_duration(total)} of job time, {fmt_duration(total / par)} with {par} jobs "
                             "in parallel, against the study's budget of 10 hours for everything.")
            else:
                rates = self._job_times(bench, key, donor, plan)
                steps = {int(r.summary["global_step"]) for r in self._timed_runs(bench, key, plan)}
                if "dense" not in rates or set(rates) != set(plan):
                    lines.append(head + "the records of some method hold no wall time or steps.")
                    continue
                n_steps = self.DB_PROTOCOL_STEPS
                total = math.fsum(plan[v] * n_steps * rates[v] for v in plan)
                per = ", ".join(f"{variant_label(v)} {plan[v]} × {fmt_duration(n_steps * rates[v])} "
                                f"({rates[v]:.2f} s/step)" for v in sort_variants(plan))
                lines.append(head + f"DomainBed's protocol trains {n_steps:,} steps on all 70,000 digits (its ERM, "
                             f"with its MNIST ConvNet: {self.DB_ERM.get(key, '—')}); the study's jobs trained "
                             f"{'/'.join(map(str, sorted(steps)))} steps, each method at its own measured seconds "
                             f"per step (evaluations included). {n_steps:,} steps per planned job: " + per
                             + f" = {fmt_duration(total)} of job time, {fmt_duration(total / par)} with {par} jobs "
                             "in parallel. Whether this small ViT then reaches the floor was not measured.")
        return lines + [""]

    def glue_task_order(self, t: str) -> int:
        return GLUE_TASK_ORDER.index(t) if t in GLUE_TASK_ORDER else len(GLUE_TASK_ORDER)

    def changed_section(self) -> list[str]:
        v3 = any(v >= 3 for b, v in self.s.versions.items() if b != "ceiling")
        lines = [f"## {H_CHANGED}", ""]
        if v3:
            lines += ["**Study version 3** (new records, every method rerun): " + " ".join(V3_CHANGES), ""]
        lines += ["**This report since study version 2** ("
                  + ("the version-2 records are superseded; " if v3 else "the records are the same; ")
                  + "what is read off them changed): " + " ".join(REPORT_CHANGES), "",
                 "The first run of this study (its records are marked superseded) was made before the fidelity "
                 "fixes; it answered nothing about the methods. Since then:", ""]
        lines += [f"- {c.replace('FLOORS_LINK', link(H_FLOORS))}" for c in CHANGES]
        lines.append("")
        for b in self.s.benchmarks():
            meta = self.s.meta.get(b) or {}
            prev = meta.get("previous") or {}
            why = prev.get("superseded") or meta.get("superseded")
            if why:
                lines += [f"Why the {bench_label(b)} records were superseded (as recorded in `{b}/meta.json`): {why}",
                          ""]
            if prev.get("shortened") and meta.get("shortened") and prev["shortened"] != meta["shortened"]:
                lines += [f"{bench_label(b)} settings of the superseded study:", ""]
                lines += [f"- {x}" for x in prev["shortened"]]
                lines += ["", f"{bench_label(b)} settings now:", ""]
                lines += [f"- {x}" for x in meta["shortened"]]
                lines.append("")
        return lines

    # GLUE
    def glue_comparisons(self, selection: str, pairs: Sequence[tuple[str, str]], tasks: Sequence[str] | None = None
                         ) -> list[tuple[str, str, Paired, dict[str, Paired]]]:
        """Per comparison: the pooled paired difference over ``tasks`` (default: the tasks in the
        verdicts, i.e. those that learn at this scale) and the per-task ones of every task."""
        tasks = self.verdict_tasks() if tasks is None else list(tasks)
        out = []
        for a, b in pairs:
            per, _ = glue_paired(self.glue_runs, selection, a, b, self.glue_tasks())
            _, pooled = glue_paired(self.glue_runs, selection, a, b, tasks)
            out.append((a, b, pooled, per))
        return out

    def glue_pooled_gap(self, a: str, b: str, per: dict[str, Paired], tasks: Sequence[str] | None = None
                        ) -> float | None:
        tasks = self.verdict_tasks() if tasks is None else tasks
        return paper_gap_pooled("glue", a, b, {t: per[t].n for t in tasks if t in per})

    #: the label of the row pooling every task, gated or not (power only, no verdict)
    ALL_TASKS = "every task (power only: no verdict)"

    def glue_all_tasks(self, selection: str, pairs: Sequence[tuple[str, str]]
                       ) -> list[tuple[str, str, Paired, float | None]]:
        """Pooled over every GLUE task, gated or not: only to show what the design could detect."""
        out = []
        for a, b, pooled, per in self.glue_comparisons(selection, pairs, tasks=self.glue_tasks()):
            out.append((a, b, pooled, self.glue_pooled_gap(a, b, per, self.glue_tasks())))
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
            t = self.gated_glue_table(glue_table(self.glue_runs, sel, planned=planned, title=head), sel, planned)
            lines += table_lines(t) + [""]
        lines += [f"### {H_GLUE_PAIRED}", "",
                  "Dev-score difference in points (x100) over seeds paired by seed, each method at its kept "
                  "learning rate; \"all\" pools the (task, seed) pairs of the tasks that passed their gate"
                  + (self.out_of_verdicts() or " (all of them)")
                  + "; a task that failed its gate is marked and enters no verdict; \"" + self.ALL_TASKS + "\" pools "
                  "every task only to show what the design could detect. MDE (80 % power): the minimum "
                  "detectable effect, the true difference this design finds with 80 % probability at two-sided "
                  "α = 0.05, (t₀.₉₇₅,ₙ₋₁ + t₀.₈,ₙ₋₁) · SE; paper: the paper's gap on that task (SPEC §5; \"all\": its "
                  "per-task gaps weighted by the pairs pooled; — where the paper has no number: the ablations and the "
                  "loss-free baseline). Verdict: the 2-SE screen (|mean| > 2 SE), per row and uncorrected; the "
                  f"claims use t-tests with Holm's correction ({link(H_CLAIMS)}).", ""]
        rows = []
        for sel in ("best_dev", "heldout"):
            for a, b, pooled, per in self.glue_comparisons(sel, GLUE_COMPARISONS + EXTRA_COMPARISONS + ABLATIONS):
                if pooled.n == 0 and not any(p.n for p in per.values()):
                    continue
                entries = [(glue_task_label(t) + ("" if t in self.verdict_tasks() else self.gate_note(t)), p,
                            paper_gap("glue", a, b, t)) for t, p in per.items() if p.n > 0]
                if pooled.n:
                    entries.append(("all", pooled, self.glue_pooled_gap(a, b, per)))
                if set(self.verdict_tasks()) != set(self.glue_tasks()):
                    (_, _, every, gap), = self.glue_all_tasks(sel, [(a, b)])
                    entries.append((self.ALL_TASKS, every, gap))
                for task, p, gap in entries:
                    rows.append([f"{variant_label(a)} − {variant_label(b)}", GLUE_SELECTIONS[sel][0], task,
                                 *fmt_diff(p), *fmt_power(p, gap), noise_verdict(p)])
        return lines + paired_table(["comparison", "selection", "task"], rows, power=True) + [""]

    def gated_glue_table(self, t, selection: str, planned):
        """The GLUE table with the constant-prediction row after the dense one and each cell's degenerate
        runs at the reported epoch marked (``[k/n degenerate]``, ``[k/n possibly degenerate]``)."""
        cs = glue_cells(self.glue_runs, selection)
        keys = set(cs) | set(planned or {})
        tasks = sort_glue_tasks(k[0] for k in keys)
        variants = sort_variants(k[1] for k in keys)
        marked = False
        for row, v in zip(t.rows, variants):
            for j, task in enumerate(tasks, 1):
                cell = cs.get((task, v))
                if not cell:
                    continue
                flags = [degenerate(selected_epoch(r, selection), self.dev_labels.get(task)) for r in self.glue_runs
                         if r["task"] == task and run_variant(r) == v and r.get("lr") == cell["lr"]
                         and r.get("seed") in cell["scores"]]
                for word, key in (("degenerate", "yes"), ("possibly degenerate", "possibly")):
                    k = sum(f == key for f in flags)
                    if k:
                        row[j] += f" [{k}/{len(flags)} {word}]"
                        marked = True
        const = ["Constant prediction"]
        for task in tasks:
            g, b = self.gates.get(task), self.baseline(task)
            if b is None:
                const.append("—")
                continue
            status = {"passes": "gate passed", "fails": "gate failed", "does not learn": "does not learn"}.get(
                g.status if g else "", "gate not checked")
            const.append(f"{100 * b.score:.1f} (+{GATE_SES:.0f} SE: {100 * (b.score + GATE_SES * b.se):.1f}; {status})")
        at = next((i + 1 for i, v in enumerate(variants) if v == "dense"), 0)
        t.rows.insert(at, const)
        t.notes.append(f"Constant prediction: the dev set's constant-prediction score (majority class; "
                       f"{link(H_GATES)}), the gate's bar (+{GATE_SES:.0f} SE) and the task's gate; a task that "
                       "failed its gate enters no verdict.")
        if marked:
            t.notes.append(f"[k/n degenerate]: k of the cell's n runs predict one class for ≥ "
                           f"{100 * DEGENERATE_SHARE:.0f} % of dev at the reported epoch; [k/n possibly degenerate]: "
                           "the recorded metrics cannot exclude it (accuracy only; see "
                           f"{link(H_GATES)}).")
        return t

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
                lines += [f"### {t.title}", ""] + table_lines(t) + [""]
        lines += [f"### {H_DB_PAIRED}", "",
                  "Accuracy difference in points (x100): per trial seed, the mean over the test domains of "
                  "(method − baseline) (only trial seeds where both have every test domain), then mean ± SE over "
                  "trial seeds; \"all\" pools the (dataset, trial seed) pairs of the datasets whose dense floors "
                  "hold (a dataset that missed one is marked and enters no verdict; \"every dataset (power only: no "
                  "verdict)\" pools them all). MDE (80 % power): the minimum detectable effect at two-sided α = 0.05, "
                  "(t₀.₉₇₅,ₙ₋₁ + t₀.₈,ₙ₋₁) · SE; paper: — (the paper reports no RotatedMNIST or ColoredMNIST numbers; "
                  "its gaps on its own datasets are in the claims above). Verdict: the 2-SE screen, per row and "
                  "uncorrected.", ""]
        rows = []
        for m in DB_METHODS:
            for a, b in DB_COMPARISONS + EXTRA_COMPARISONS:
                per, pooled = db_paired(self.db_records, m, a, b, self.db_datasets, self.db_envs)
                if pooled.n == 0:
                    continue
                gated = self.db_verdict_datasets()
                entries = [(d + ("" if d in gated else " (floor missed)"), d, p) for d, p in per.items() if p.n > 0]
                if gated == self.db_datasets:
                    entries.append(("all", "all", pooled))
                else:
                    _, in_gate = db_paired(self.db_records, m, a, b, gated, self.db_envs)
                    if in_gate.n:
                        entries.append(("all", "all", in_gate))
                    entries.append(("every dataset (power only: no verdict)", "all", pooled))
                for label, d, p in entries:
                    rows.append([f"{variant_label(a)} − {variant_label(b)}", m.name, label, *fmt_diff(p),
                                 *fmt_power(p, paper_gap("domainbed", a, b, d)), noise_verdict(p)])
        return lines + paired_table(["comparison", "model selection", "dataset"], rows, power=True) + [""]

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
            for task in task_order(b, {r.task for r in runs}):
                for v in sort_variants({r.variant for r in runs if r.task == task}):
                    rs = [r for r in runs if r.task == task and r.variant == v]
                    if not any((r.summary or {}).get("stability") for r in rs):
                        continue
                    row = [bench_label(b), task_label(b, task), variant_label(v), str(len(rs))]
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
                  "DomainBed: dataset, test domain, trial seed), pooled over tasks; lower is more stable. Every run "
                  "is here whatever its task's gate, with the uncorrected 2-SE screen; claim 3's verdict uses only the "
                  f"cells that passed their gate, with Holm's correction ({link(H_CLAIMS)}).", ""]
        rows = []
        for b, base, _key, label, p in self.stability_pairs():
            if p.n:
                rows.append([bench_label(b), label, f"RMoE − {variant_label(base)}",
                             *fmt_diff(p, scale=1.0, digits=4), noise_verdict(p)])
        return lines + paired_table(["benchmark", "metric", "comparison"], rows) + [""]

    def stability_pairs(self, extra: bool = True, gated: bool = False) -> list[tuple[str, str, str, str, Paired]]:
        """RMoE − baseline per stability metric; ``extra``: the loss-free baseline too (not a paper claim);
        ``gated``: only the runs of GLUE tasks / DomainBed datasets that passed their gate."""
        out = []
        for b in self.s.benchmarks():
            runs = [r for r in self.s.bench_runs(b) if r.summary]
            if gated:
                keep = set(self.verdict_tasks() if b == "glue" else self.db_verdict_datasets())
                runs = [r for r in runs if r.task in keep]
            pairs = (GLUE_COMPARISONS if b == "glue" else DB_COMPARISONS) + (EXTRA_COMPARISONS if extra else ())
            for key, label, _ in STABILITY_CLAIMS:
                for _, base in pairs:
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

    def render(self) -> str:
        parts = (self.header() + claims_section(self) + self.floors_section() + self.changed_section()
                 + self.provenance() + self.glue_section() + self.domainbed_section() + self.stability_section()
                 + self.figures_section())
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
