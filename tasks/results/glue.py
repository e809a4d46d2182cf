"""GLUE result tables from run summaries (``summary.json`` of complete runs): collect and the study.

Per run, a *selection* turns the per-epoch validation record ``epochs[i] = {"dev": {"score"}, "heldout":
{"score"}}`` into ``(selection value, reported dev score)``:

* ``best_dev`` (the paper's protocol): the maximum dev score over epochs (both values);
* ``heldout``: the epoch with the highest held-out score (a slice held out from train; ties -> the
  earliest epoch) selects, the dev score at that epoch is reported; runs without held-out scores
  are left out.

A cell (task, row) -- row = the method and the overrides that set its runs apart
(:mod:`tasks.results.grouping`) -- holds, per learning rate, one reported score per seed; the learning rate
with the highest mean *selection value* over seeds is kept (ties -> the smallest lr) and the cell
prints ``100 * mean ± 100 * SE`` over its seeds (:func:`tasks.results.stats.mean_se`: sample std / √n;
a single seed: the mean only), the number of seeds ``(n=k)`` (or ``(k/planned)``), plus ``(lr x)``
when several learning rates were run.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from .grouping import configurations, drop_duplicates, row_name, sweep_values
from .labels import glue_task_label, sort_glue_tasks, sort_variants, variant_label
from .records import RunRecord, read_metas
from .stats import mean_se
from .table import Table, fmt_lr, fmt_score

log = logging.getLogger("tasks.results")

Run = dict[str, Any]
Selected = tuple[float, float]  # (selection value, reported dev score)


def is_glue_summary(r: Mapping[str, Any]) -> bool:
    return r.get("benchmark") == "glue" and isinstance(r.get("epochs"), list)


def run_variant(run: Mapping[str, Any]) -> str:
    """The run's table row: ``_row`` (set by :func:`glue_summaries`), else its variant (method)."""
    return str(run.get("_row") or run.get("variant") or run.get("method"))


def glue_summaries(runs: Sequence[RunRecord]) -> list[Run]:
    """The ``summary.json`` of the GLUE runs, each with ``run_dir`` and ``_row`` (method + the
    overrides that vary within its (task, method) cell); duplicates (same task, row, lr and seed)
    are logged and left out (:func:`tasks.results.grouping.drop_duplicates`)."""
    runs = [r for r in runs if r.summary is not None and is_glue_summary(r.summary)]
    configs = configurations(runs, lambda r: (r.task, r.variant))
    kept, _ = drop_duplicates(runs, lambda r: (r.task, row_name(r.variant, configs[r.rel]), r.get("lr"),
                                               r.get("seed"), sweep_values(r)))
    return [dict(r.summary, run_dir=r.path, _row=row_name(r.variant, configs[r.rel])) for r in kept]


def _score(block: Any) -> float | None:
    if isinstance(block, Mapping) and block.get("score") is not None:
        return float(block["score"])
    return None


def select_best_dev(run: Run) -> Selected | None:
    """``(best, best)`` with ``best`` = max over epochs of the dev score."""
    scores = [s for s in (_score(e.get("dev")) for e in run.get("epochs") or []) if s is not None]
    if not scores:
        return None
    return max(scores), max(scores)


def heldout_epoch(run: Run) -> int | None:
    """Index in ``run["epochs"]`` of the epoch with the highest held-out score (ties: the earliest);
    None when no epoch has both a held-out and a dev score."""
    best_i, best = None, None
    for i, e in enumerate(run.get("epochs") or []):
        h, d = _score(e.get("heldout")), _score(e.get("dev"))
        if h is None or d is None:
            continue
        if best is None or h > best:
            best_i, best = i, h
    return best_i


def select_heldout(run: Run) -> Selected | None:
    """``(held-out score, dev score)`` at :func:`heldout_epoch`."""
    i = heldout_epoch(run)
    if i is None:
        return None
    e = run["epochs"][i]
    return _score(e["heldout"]), _score(e["dev"])


#: name -> (description, selection function)
SELECTIONS: dict[str, tuple[str, Callable[[Run], Selected | None]]] = {
    "best_dev": ("best dev epoch (paper protocol)", select_best_dev),
    "heldout": ("dev score at the epoch with the best held-out score", select_heldout),
}


def runs_by_key(runs: list[Run]) -> dict[tuple[str, str, Any, Any], Run]:
    """``{(task, row, lr, seed): run}``; of several runs with one key the first by folder is kept,
    with a warning naming both (:func:`glue_summaries` has already left such duplicates out)."""
    out: dict[tuple[str, str, Any, Any], Run] = {}
    for r in sorted(runs, key=lambda r: str(r.get("run_dir", ""))):
        key = (str(r["task"]), run_variant(r), r.get("lr"), r.get("seed"))
        if key in out:
            log.warning("two runs with the key %s: kept %s, left out %s", key, out[key].get("run_dir"),
                        r.get("run_dir"))
            continue
        out[key] = r
    return out


def _lr_key(lr: Any) -> tuple:
    try:
        return (0, float(lr))
    except (TypeError, ValueError):
        return (1, str(lr))


def best_lr(values_by_lr: Mapping[Any, Mapping[Any, float]]) -> Any:
    """The learning rate with the largest mean over its seeds (ties -> the smallest lr)."""
    best, best_mean = None, None
    for lr in sorted(values_by_lr, key=_lr_key):
        m, _, n = mean_se(values_by_lr[lr].values())
        if n and (best_mean is None or m > best_mean):
            best, best_mean = lr, m
    return best


class Cell(dict):
    """``{"lr", "n_lrs", "scores": {seed: reported}, "values": {seed: selection value}}``."""


def cells(runs: list[Run], selection: str = "best_dev") -> dict[tuple[str, str], Cell]:
    """Per (task, variant): the kept learning rate and the per-seed reported dev scores."""
    fn = SELECTIONS[selection][1]
    vals: dict[tuple[str, str], dict[Any, dict[Any, float]]] = defaultdict(lambda: defaultdict(dict))
    reps: dict[tuple[str, str], dict[Any, dict[Any, float]]] = defaultdict(lambda: defaultdict(dict))
    for (task, variant, lr, seed), run in runs_by_key(runs).items():
        sel = fn(run)
        if sel is None or sel[1] is None:
            continue
        vals[(task, variant)][lr][seed] = sel[0]
        reps[(task, variant)][lr][seed] = sel[1]
    out = {}
    for key, by_lr in vals.items():
        lr = best_lr(by_lr)
        out[key] = Cell(lr=lr, n_lrs=len(by_lr), scores=dict(reps[key][lr]), values=dict(by_lr[lr]))
    return out


def cell_text(cell: Cell | None, planned: int | None, latex: bool = False, n_max: int | None = None,
              always_n: bool = False) -> str:
    """``"66.7 ± 0.4"``, ``"66.7 ± 0.4 (2/3)"`` (2 of 3 planned seeds), ``"— (0/3)"``, ``"(lr 3e-05)"``;
    ``always_n``: every cell shows its seed count, ``(n=3)`` or ``(3/3)``."""
    if cell is None or not cell["scores"]:
        if planned:
            return ("--" if latex else "—") + f" (0/{planned})"
        return ""
    m, se, n = mean_se(cell["scores"].values())
    text = fmt_score(m, se, latex)
    if planned is not None:
        if n < planned or always_n:
            text += f" ({n}/{planned})"
    elif always_n or (n_max is not None and n < n_max):
        text += f" (n={n})"
    if cell["n_lrs"] > 1:
        text += f" (lr {fmt_lr(cell['lr'])})"
    return text


def headline_names(runs: list[Run]) -> dict[str, str]:
    """``{task: headline metric name}`` (e.g. cola -> mcc), from the runs."""
    out: dict[str, set] = defaultdict(set)
    for r in runs:
        if r.get("headline"):
            out[str(r["task"])].add(str(r["headline"]))
    return {t: "/".join(sorted(v)) for t, v in out.items()}


def glue_table(runs: list[Run], selection: str = "best_dev", latex: bool = False,
               planned: Mapping[tuple[str, str], int] | None = None, title: str | None = None,
               always_n: bool = False) -> Table:
    """Rows = variants (rows, see :func:`run_variant`), columns = tasks; ``always_n``: see :func:`cell_text`.
    ``planned``: ``{(task, variant): number of planned seeds}``
    (then missing and partial cells show ``(n/planned)``); without it partial cells show ``(n=k)``
    where k is below the largest seed count of the table."""
    cs = cells(runs, selection)
    planned = dict(planned) if planned is not None else None
    keys = set(cs) | set(planned or {})
    tasks = sort_glue_tasks(k[0] for k in keys)
    variants = sort_variants(k[1] for k in keys)
    n_max = max((len(c["scores"]) for c in cs.values()), default=0)
    heads = headline_names(runs)
    header = ["Method"] + [glue_task_label(t) + (f" ({heads[t]})" if t in heads else "") for t in tasks]
    rows = []
    for v in variants:
        row = [variant_label(v)]
        for t in tasks:
            p = None if planned is None else planned.get((t, v), 0)
            row.append(cell_text(cs.get((t, v)), p, latex, n_max, always_n))
        rows.append(row)
    desc = SELECTIONS[selection][0]
    notes = [f"GLUE dev score x100, {desc}; mean ± SE over seeds (SE = sample std / √n; one seed: the mean)."]
    if any(c["n_lrs"] > 1 for c in cs.values()):
        notes.append("(lr x): the learning rate with the best mean selection score over seeds, of those run.")
    if planned is not None:
        notes.append("(k/n): k of the n planned seeds finished; — (0/n): planned, none finished; blank: not planned.")
    elif always_n:
        notes.append("(n=k): the number of seeds in the cell.")
    elif any(len(c["scores"]) < n_max for c in cs.values()):
        notes.append(f"(n=k): only k seeds (other cells have up to {n_max}).")
    if selection == "heldout":
        notes.append("Runs without held-out scores are left out.")
    return Table(title=title or f"GLUE: {desc}", header=header, rows=rows, section="GLUE", notes=notes)


def glue_planned(meta: Mapping[str, Any] | None) -> dict[tuple[str, str], int] | None:
    """``{(task, variant): number of planned seeds}`` from a ``meta.json``'s ``expected`` list
    (``[{"task", "variant", "seed"}, ...]``); None without one."""
    if not meta or not meta.get("expected"):
        return None
    seeds: dict[tuple[str, str], set] = defaultdict(set)
    for e in meta["expected"]:
        seeds[(str(e["task"]), str(e["variant"]))].add(repr(e.get("seed")))
    return {k: len(v) for k, v in seeds.items()}


class GlueReader:
    """``tasks.collect`` reader: GLUE ``summary.json`` records (``benchmark == "glue"``). When the
    input folder (or a folder below it) holds the GLUE ``meta.json`` of ``make reproduce-*``, its
    planned runs mark missing (``— (0/n)``) and partial (``(k/n)``) cells."""

    name = "glue"

    def __init__(self) -> None:
        self.planned: dict[tuple[str, str], int] | None = None

    def configure(self, input_dir: str) -> None:
        self.planned = glue_planned(read_metas(input_dir).get("glue"))

    def prepare(self, runs: list[RunRecord]) -> list[Run]:
        return glue_summaries(runs)

    def tables(self, records: list[Run], latex: bool) -> list[tuple[str, list[Table]]]:
        out = [("GLUE dev, best dev epoch (paper protocol)",
                [glue_table(records, "best_dev", latex, planned=self.planned, always_n=True)])]
        if any(select_heldout(r) is not None for r in records):
            out.append(("GLUE dev, held-out selection",
                        [glue_table(records, "heldout", latex, planned=self.planned, always_n=True)]))
        return out
