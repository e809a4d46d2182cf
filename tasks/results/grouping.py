"""Which runs share a table row: method identity plus every override that sets runs apart.

A *cell* is (task or dataset, method identity = :attr:`RunRecord.variant`). Within a cell, every
override (``.hydra/overrides.yaml``) whose value differs between the cell's runs -- present in some
and absent in others counts as differing -- is part of the run's *configuration*, except

* the replication axes a table averages over (:data:`REPLICATION_KEYS`: seeds, trial seeds, test domains),
* the axes a table's selection rule chooses from (:data:`SELECTION_KEYS`: GLUE keeps the best
  learning rate of a cell; DomainBed picks the best hyper-parameter seed), and
* bookkeeping that does not change what is trained (:data:`BOOKKEEPING_KEYS`, :data:`BOOKKEEPING_PREFIXES`).

So a β × λ_min × seed grid gives one row per (β, λ_min), each averaged over its seeds, and a
README one-liner ablation without ``variant=`` (``moe.fusion=null``) gets its own row too. The row
name is ``"<variant> [key=value, ...]"`` over the varying keys the run set (sorted); a run that set
none of them keeps the plain ``"<variant>"`` row.
Runs with the same *full* key (cell, configuration, and every selection and replication value the
run set: :func:`sweep_values`) are duplicates: :func:`drop_duplicates` keeps the first folder (by path)
and logs a warning naming all.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable, Hashable, Iterable, Sequence

from .records import RunRecord

log = logging.getLogger("tasks.results")

REPLICATION_KEYS = frozenset({"seed", "trial_seed", "data.trial_seed", "test_envs", "data.test_envs"})
SELECTION_KEYS = frozenset({"module.lr", "data.hparams_seed"})
BOOKKEEPING_KEYS = frozenset({"ckpt_path", "init_from", "skip_if_done", "tags", "logger", "data.root", "study_version",
                              "data.glue_dir", "data.num_workers", "trainer.devices", "trainer.accelerator",
                              "trainer.enable_progress_bar"})
BOOKKEEPING_PREFIXES = ("paths.", "hydra.", "logger.", "wandb.", "resume.")
_UNSET = object()

Config = tuple[tuple[str, str], ...]


def is_swept_key(key: str) -> bool:
    """Whether an override key can set a configuration apart (not a replication, selection or bookkeeping key)."""
    return not (key in REPLICATION_KEYS or key in SELECTION_KEYS or key in BOOKKEEPING_KEYS
                or key.startswith(BOOKKEEPING_PREFIXES))


def configurations(runs: Sequence[RunRecord], cell: Callable[[RunRecord], Hashable]) -> dict[str, Config]:
    """``{run.rel: configuration}``: per run, the ``(key, value)`` of the overrides it set that vary
    within its cell (a key set by some runs of the cell and not by others varies)."""
    by_cell: dict[Hashable, list[RunRecord]] = defaultdict(list)
    for r in runs:
        by_cell[cell(r)].append(r)
    out: dict[str, Config] = {}
    for members in by_cell.values():
        dicts = [{k: v for k, v in r.override_dict.items() if is_swept_key(k)} for r in members]
        keys = sorted({k for d in dicts for k in d})
        varying = [k for k in keys if len({d.get(k, _UNSET) for d in dicts}) > 1]
        for r, d in zip(members, dicts):
            out[r.rel] = tuple((k, d[k]) for k in varying if k in d)
    return out


def sweep_values(r: RunRecord) -> Config:
    """The run's replication and selection overrides (seeds, trial seed, test domains, lr, hparams_seed):
    part of every full key, so runs of one row that differ only there are never duplicates."""
    keys = REPLICATION_KEYS | SELECTION_KEYS
    return tuple(sorted((k, v) for k, v in r.override_dict.items() if k in keys))


def varying(runs: Sequence[RunRecord], keys: Iterable[str]) -> list[str]:
    """Those of ``keys`` whose override value (or absence) differs between ``runs``."""
    return sorted(k for k in keys if len({r.override_dict.get(k, _UNSET) for r in runs}) > 1)


def row_name(variant: str, config: Config) -> str:
    """``"rmoe"``, ``"rmoe [curriculum.lambda_min=1e-4, moe.fusion.ema_decay=0.9]"``."""
    if not config:
        return variant
    return f"{variant} [" + ", ".join(f"{k}={v}" for k, v in config) + "]"


def drop_duplicates(runs: Iterable[RunRecord], full_key: Callable[[RunRecord], Hashable]) -> tuple[
        list[RunRecord], list[list[str]]]:
    """``(kept, duplicate groups)``: of runs with one full key the first by folder is kept; each group
    of two or more folders is logged as a warning naming them (and returned)."""
    groups: dict[Hashable, list[RunRecord]] = defaultdict(list)
    for r in sorted(runs, key=lambda r: r.rel):
        groups[full_key(r)].append(r)
    kept, dups = [], []
    for key, rs in groups.items():
        kept.append(rs[0])
        if len(rs) > 1:
            names = [r.path for r in rs]
            dups.append(names)
            log.warning("%d run folders have the same key %s; kept the first, left out the others: %s",
                        len(rs), key, ", ".join(names))
    return sorted(kept, key=lambda r: r.rel), dups
