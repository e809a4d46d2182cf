"""DomainBed model selection over ``results.jsonl`` records.

A record is one evaluation of one run: ``{"step", "epoch", "env{i}_in_acc", "env{i}_out_acc", ...,
"hparams": {...}, "args": {"dataset", "algorithm", "test_envs", "trial_seed", "hparams_seed", ...}}``.
Records of one (trial_seed, dataset, algorithm, test_env) form a *group*; within it, records are
split into *runs* by ``args.hparams_seed``. A method picks, per run, a ``{val_acc, test_acc}``
(its best checkpoint); the group's result is the ``test_acc`` of the run with the highest
``val_acc``. The three methods (as DomainBed's ``model_selection``):

* training-domain validation (``IIDAccuracySelectionMethod``): per checkpoint of a run with one test
  env ``t``: ``val = mean_{i != t} env{i}_out_acc``, ``test = env{t}_in_acc``; argmax over checkpoints.
* test-domain validation, oracle (``OracleSelectionMethod``): the last checkpoint of the run;
  ``val = env{t}_out_acc``, ``test = env{t}_in_acc`` (no early stopping).
* leave-one-domain-out (``LeaveOneOutSelectionMethod``): needs runs with test envs ``{t, v}`` for
  every other domain ``v``; per step ``val = sum_v env{v}_in_acc(run {t, v}) / (n_envs - 1)``,
  ``test = env{t}_in_acc`` of the run with test envs ``[t]``; argmax over steps.
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

import numpy as np

Record = dict[str, Any]


def n_envs(record: Record) -> int:
    """Number of environments a record evaluates (``env0_out_acc``, ``env1_out_acc``, ...)."""
    for i in itertools.count():
        if f"env{i}_out_acc" not in record:
            return i
    raise AssertionError  # unreachable


def group_records(records: Iterable[Record]) -> list[dict[str, Any]]:
    """Group by ``(trial_seed, dataset, algorithm, test_env)``; a record with two test envs appears in
    both groups. Returns ``[{"trial_seed", "dataset", "algorithm", "test_env", "records"}]``."""
    groups: dict[tuple, list[Record]] = defaultdict(list)
    for r in records:
        a = r["args"]
        for t in a["test_envs"]:
            groups[(a["trial_seed"], a["dataset"], a["algorithm"], t)].append(r)
    return [{"trial_seed": k[0], "dataset": k[1], "algorithm": k[2], "test_env": k[3], "records": v}
            for k, v in groups.items()]


def _single_test_env(records: list[Record]) -> list[Record]:
    return [r for r in records if len(r["args"]["test_envs"]) == 1]


def _argmax(accs: list[dict[str, float]]) -> dict[str, float]:
    """The first entry with the largest ``val_acc`` (ties: the earliest)."""
    best = accs[0]
    for a in accs[1:]:
        if a["val_acc"] > best["val_acc"]:
            best = a
    return best


class SelectionMethod:
    """Strategy picking, per run, one checkpoint ``{val_acc, test_acc}``; then the best run."""

    name = "abstract"
    short = "abstract"

    @classmethod
    def run_acc(cls, run_records: list[Record]) -> dict[str, float] | None:
        raise NotImplementedError

    @classmethod
    def hparams_accs(cls, records: list[Record]) -> list[tuple[dict[str, float], list[Record]]]:
        """``(run_acc, run_records)`` per ``args.hparams_seed``, best ``val_acc`` first."""
        runs: dict[Any, list[Record]] = defaultdict(list)
        for r in records:
            runs[r["args"].get("hparams_seed", 0)].append(r)
        out = [(cls.run_acc(rs), rs) for rs in runs.values()]
        out = [o for o in out if o[0] is not None]
        return sorted(out, key=lambda o: o[0]["val_acc"], reverse=True)

    @classmethod
    def sweep_acc(cls, records: list[Record]) -> float | None:
        """Test accuracy of the run with the best validation accuracy (None if no run qualifies)."""
        accs = cls.hparams_accs(records)
        return accs[0][0]["test_acc"] if accs else None


class OracleSelectionMethod(SelectionMethod):
    name = "test-domain validation set (oracle)"
    short = "oracle"

    @classmethod
    def run_acc(cls, run_records: list[Record]) -> dict[str, float] | None:
        run_records = _single_test_env(run_records)
        if not run_records:
            return None
        t = run_records[0]["args"]["test_envs"][0]
        last = max(run_records, key=lambda r: r["step"])
        return {"val_acc": last[f"env{t}_out_acc"], "test_acc": last[f"env{t}_in_acc"], "step": last["step"]}


class IIDAccuracySelectionMethod(SelectionMethod):
    name = "training-domain validation set"
    short = "train_val"

    @classmethod
    def step_acc(cls, record: Record) -> dict[str, float]:
        t = record["args"]["test_envs"][0]
        val = [record[f"env{i}_out_acc"] for i in range(n_envs(record)) if i != t]
        return {"val_acc": float(np.mean(val)), "test_acc": record[f"env{t}_in_acc"], "step": record["step"]}

    @classmethod
    def run_acc(cls, run_records: list[Record]) -> dict[str, float] | None:
        recs = _single_test_env(run_records)
        if not recs:
            return None
        return _argmax([cls.step_acc(r) for r in recs])


class LeaveOneOutSelectionMethod(SelectionMethod):
    name = "leave-one-domain-out cross-validation"
    short = "loo"

    @classmethod
    def step_acc(cls, records: list[Record]) -> dict[str, float] | None:
        """``{val_acc, test_acc}`` of the records of one step, or None if a domain is missing."""
        tests = _single_test_env(records)
        if len(tests) != 1:
            return None
        t = tests[0]["args"]["test_envs"][0]
        n = n_envs(records[0])
        val_accs = np.full(n, -1.0)
        for r in records:
            if len(r["args"]["test_envs"]) == 2:
                v = (set(r["args"]["test_envs"]) - {t}).pop()
                val_accs[v] = r[f"env{v}_in_acc"]
        others = [val_accs[i] for i in range(n) if i != t]
        if any(v == -1 for v in others):
            return None
        return {"val_acc": float(np.sum(others) / (n - 1)), "test_acc": tests[0][f"env{t}_in_acc"],
                "step": tests[0]["step"]}

    @classmethod
    def run_acc(cls, run_records: list[Record]) -> dict[str, float] | None:
        by_step: dict[Any, list[Record]] = defaultdict(list)
        for r in run_records:
            by_step[r["step"]].append(r)
        accs = [a for a in (cls.step_acc(rs) for _, rs in sorted(by_step.items())) if a is not None]
        return _argmax(accs) if accs else None


SELECTION_METHODS: list[type[SelectionMethod]] = [
    IIDAccuracySelectionMethod,
    LeaveOneOutSelectionMethod,
    OracleSelectionMethod,
]
