"""The study report's figures from the runs' logged series (``summary.json`` ``series``): the λ
schedule per method, expert load over time, routing fluctuation on the probe batch. PNGs written by
matplotlib's Agg without a Software/date stamp (same records -> same bytes)."""

from __future__ import annotations

import math
import os
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from tasks.results.labels import bench_label, sort_variants, task_label, task_order, variant_label

from .data import Run, Study

VARIANT_STYLES = {"dense": ("tab:gray", ":"), "moe_topk": ("tab:blue", "-"), "moe_cosine": ("tab:olive", "-"),
                  "gmoe": ("tab:green", "-"),
                  "dynmoe": ("tab:orange", "--"), "rmoe": ("tab:red", "-"), "rmoe_nofusion": ("tab:purple", "-."),
                  "rmoe_nocurriculum": ("tab:brown", ":"), "lossfree": ("tab:cyan", "--")}


def _order(bench: str) -> Callable[[Iterable[str]], list[str]]:
    return lambda names: task_order(bench, names)


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
        return (repr(s.get("seed")), repr(s.get("lr")), repr(s.get("test_envs")), repr(s.get("trial_seed")), r.rel)

    return task, {v: sorted(rs, key=rank)[0] for v, rs in by_task[task].items()}


def _run_caption(r: Run) -> str:
    s = r.summary or {}
    bits = [f"seed {s.get('seed')}"]
    if s.get("test_envs") is not None:
        bits = [f"test env {s.get('test_envs')}", f"trial seed {s.get('trial_seed')}"]
    return f"{variant_label(r.variant)} ({', '.join(bits)}; `{r.rel}`)"


def _save(fig: Any, path: str) -> None:
    fig.savefig(path, format="png", dpi=100, metadata={"Software": None})


def make_plots(study: Study, plots_dir: str) -> list[tuple[str, str, str]]:
    """Write the figures; returns ``[(file name, title, caption)]``."""
    matplotlib.rcParams.update({"svg.hashsalt": "rmoe", "figure.max_open_warning": 0})
    os.makedirs(plots_dir, exist_ok=True)
    out = []
    benches = [b for b in study.benchmarks() if study.bench_runs(b)]

    # 1. lambda schedule per method (one representative run per method)
    def has_lambda(r: Run) -> bool:
        s = _series(r)
        return bool(s.get("step")) and bool(s.get("lambda"))

    panels = [(b, *representative(study.bench_runs(b), has_lambda, _order(b))) for b in benches]
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
            ax.set_title(f"{bench_label(b)}: {task_label(b, task)}")
            ax.set_xlabel("optimizer step")
            ax.set_ylabel("λ (load-balancing weight)")
            ax.legend(fontsize=8)
            caps.append(f"{bench_label(b)} {task_label(b, task)}: "
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
        task, reps = representative(study.bench_runs(b), has_load, _order(b))
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
        fig.suptitle(f"{bench_label(b)} {task_label(b, task)}: expert load share over training")
        fig.tight_layout()
        name = f"expert_load_{b}.png"
        _save(fig, os.path.join(plots_dir, name))
        plt.close(fig)
        out.append((name, f"Expert load over time, {bench_label(b)} {task_label(b, task)}",
                    "Share of the routed tokens per expert (rows) over optimizer steps, first MoE layer. Runs: "
                    + "; ".join(caps) + "."))

    # 3. probe top-1 flip rate over steps per method (mean over the task's runs and MoE layers)
    def has_probe(r: Run) -> bool:
        return any(_series(r).get("probe", {}).get(k) for k in _series(r).get("probe", {}) or {})

    panels = []
    for b in benches:
        task, reps = representative(study.bench_runs(b), has_probe, _order(b))
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
            ax.set_title(f"{bench_label(b)}: {task_label(b, task)}")
            ax.set_xlabel("optimizer step")
            ax.set_ylabel("top-1 flip rate (probe batch)")
            ax.legend(fontsize=8)
            caps.append(f"{bench_label(b)} {task_label(b, task)} ({', '.join(parts)})")
        fig.tight_layout()
        _save(fig, os.path.join(plots_dir, "probe_flip_rate.png"))
        plt.close(fig)
        out.append(("probe_flip_rate.png", "Routing fluctuation on the probe batch",
                    "Fraction of probe tokens whose top-1 expert changed since the previous probe, mean over "
                    "the runs (seeds / trial seeds and test domains) and MoE layers of one task per benchmark: "
                    + "; ".join(caps) + "."))
    return out
