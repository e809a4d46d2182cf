"""``<run>/summary.json``: the small record of a finished run that studies keep (no checkpoints).

Written on rank 0 at the end of ``fit`` (schema 1)::

    {"schema": 1, "done": true, "benchmark": "glue" | "domainbed", "task_name": "glue/cola",
     "task": "cola" | "<DomainBed dataset>", "method": "<moe.name>", "variant": "<variant>",
     "seed": 0, "lr": 5e-05, "headline": "mcc", "test_envs": [0] | null, "trial_seed": 0 | null,
     "epochs": [{"epoch": 0, "step": 40, "dev": {"score": .., "mcc": .., "loss": ..},
                 "heldout": {"score": .., ...} | null}, ...],      # one entry per validation
     "stability": {"moe0": {"load_cv": .., "dead_experts": .., "top1_flip_rate": .., ...}},
     "series": {"step": [..], "lambda": [..], "phase": [..], "load": {"moe0": [[..], ..]},
                "probe": {"moe0": [[step, flip, churn], ..]}, "pi": {"moe0": [[..], ..]},
                "active": {"moe0": [[bool, ..], ..]}, "schedule": {"mode": .., "total_steps": ..},
                "domain_loads": {"moe0": [[..], ..]}, "domain_rows": [{"name", "split", "test"}],
                "layers": {"moe0": "<module path>"}},
     "wall_time_s": 123.4, "overrides": ["moe=rmoe", ...], "commit": "abc1234" | null}

``epochs``: ``val/*`` (dev) and ``val_heldout/*`` (a slice held out from train) after each
validation; ``stability``: the last logged value of every ``routing/<layer>/<key>`` metric;
``series``: the routing-stability callback's history (what its plots show; see
:mod:`callbacks.plots`). The ``done`` flag of a
run *folder* is the separate file ``<run>/done`` written by ``rmoe-train`` after everything
succeeded (see :mod:`tasks.run.jobs`).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Mapping
from typing import Any

from hydra.core.hydra_config import HydraConfig
from lightning.pytorch import Callback, LightningModule, Trainer

from callbacks.records import SUMMARY_FILE, SUMMARY_SCHEMA, git_commit, summary_record, write_json_atomic
from callbacks.stability import RoutingStabilityCallback

SCHEMA = SUMMARY_SCHEMA


def _float(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def hydra_overrides() -> list[str]:
    try:
        if HydraConfig.initialized():
            return list(HydraConfig.get().overrides.task)
    except ValueError:
        pass
    return []


def _plain(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


class RunSummaryCallback(Callback):
    """``path``: where to write (default ``<default_root_dir>/summary.json``); ``info``: run identity
    (task_name, task, method, variant, seed, lr, test_envs, trial_seed), filled by the config."""

    def __init__(self, path: str | None = None, info: Mapping[str, Any] | None = None):
        self.path = path
        self.info = _plain(dict(info or {}))
        self.epochs: list[dict[str, Any]] = []
        self._t0: float | None = None
        self._elapsed = 0.0

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._t0 = time.perf_counter()
        # the code this process runs: read when it starts (a checkout that moves on during a long run must
        # not relabel the run with code it did not run)
        self._commit = git_commit()

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        m = trainer.callback_metrics
        dev = {k[4:]: _float(v) for k, v in m.items() if k.startswith("val/") and k != "val/score_best"}
        held = {k[12:]: _float(v) for k, v in m.items() if k.startswith("val_heldout/")}
        entry = {"epoch": int(trainer.current_epoch), "step": int(trainer.global_step), "dev": dev or None,
                 "heldout": held or None}
        # a resumed run validates again from its checkpoint on: drop entries past that point
        self.epochs = [e for e in self.epochs if e["step"] < entry["step"]] + [entry]

    def summary(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, Any]:
        info = dict(self.info)
        task_name = str(info.get("task_name") or "")
        stability: dict[str, dict[str, float | None]] = {}
        for k, v in trainer.callback_metrics.items():
            parts = k.split("/")
            if len(parts) == 3 and parts[0] == "routing":
                stability.setdefault(parts[1], {})[parts[2]] = _float(v)
        series: dict[str, Any] = {}
        for cb in trainer.callbacks:
            if isinstance(cb, RoutingStabilityCallback):
                series = cb.series()  # what its plots draw: python -m tasks.plots <run> redraws them
        task = getattr(pl_module, "task", None)
        elapsed = self._elapsed + (time.perf_counter() - self._t0 if self._t0 is not None else 0.0)
        return _plain(summary_record(
            schema=SCHEMA, done=True,
            benchmark=task_name.split("/", 1)[0] if task_name else None,
            task_name=task_name or None,
            task=info.get("task"), method=info.get("method"),
            variant=info.get("variant") or info.get("method"),
            seed=info.get("seed"), lr=info.get("lr"),
            headline=getattr(task, "headline", None) if task is not None else info.get("headline"),
            test_envs=info.get("test_envs"), trial_seed=info.get("trial_seed"),
            epochs=self.epochs, stability=stability, series=series,
            global_step=int(trainer.global_step),
            wall_time_s=round(elapsed, 3), overrides=hydra_overrides(),
            commit=self._commit if getattr(self, "_commit", None) is not None else git_commit(),
        ))

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        write_json_atomic(self.path or os.path.join(trainer.default_root_dir, SUMMARY_FILE),
                          self.summary(trainer, pl_module))

    # --- resume: keep the per-epoch records and the time already spent ------------------------
    def state_dict(self) -> dict[str, Any]:
        spent = self._elapsed + (time.perf_counter() - self._t0 if self._t0 is not None else 0.0)
        return {"epochs": self.epochs, "elapsed": spent}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epochs = list(state.get("epochs", []))
        self._elapsed = float(state.get("elapsed", 0.0))
