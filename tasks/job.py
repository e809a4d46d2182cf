"""One ``rmoe-train`` job after its config passed the checks (:func:`run_job`), and ``train(cfg)``.

Contract between the config groups and :func:`train` (any task family — GLUE, DomainBed — plugs in
by providing these keys; all are instantiated with ``hydra.utils.instantiate(..., _convert_="all")``,
so targets receive plain dicts/lists):

* ``data`` (the ``data`` group, ``conf/data/<benchmark>.yaml``): ``_target_`` of a
  ``LightningDataModule`` and its arguments. ``train`` calls ``prepare_data()`` and ``setup("fit")``
  before building the trainer, so bad data (missing file, malformed row, unknown task) fails before
  any training step; ``setup`` must be idempotent.
* ``module`` (the ``module`` group, ``conf/module/<benchmark>.yaml``): ``_target_`` of a
  ``LightningModule``; it reads the other groups by interpolation (``backbone: ${backbone}``,
  ``moe: ${moe}``, ``backend: ${backend.name}``), receives λ from ``callbacks.curriculum`` and logs
  ``cfg.optimized_metric`` (``val/score_best``).
* ``callbacks`` / ``logger``: mappings of name -> ``{_target_: ...}`` (entries without ``_target_``,
  or null, are skipped); ``trainer``: ``_target_: lightning.pytorch.Trainer`` and its arguments.
* ``task_name`` names the log folder ``logs/<task_name>/{runs,multiruns}/...``; ``seed`` seeds
  Python/NumPy/torch (and dataloader workers); ``ckpt_path`` resumes; ``test=true`` evaluates the best
  checkpoint after fitting, as ``rmoe-eval`` does (:func:`tasks.evaluation.evaluate`, ``<run>/eval/<ckpt>.json``);
  ``train=false`` is refused naming ``train``/``ckpt_path`` (evaluating a checkpoint is ``rmoe-eval``'s job).
* Runs shorter than ``trainer.log_every_n_steps`` or than one epoch (``max_steps``) still log and validate:
  :class:`tasks.run.short_runs.ShortRunCallback`, always added.
* ``init_from`` (``init_from=<ckpt>``): start a new run from another checkpoint's weights
  only (fine-tuning; no identity check, nothing else taken over).
* ``paths.output_dir`` is the run folder (Hydra's output dir; set it yourself when composing a
  config outside ``@hydra.main``, e.g. in tests).

Before anything is built, :func:`tasks.run.checks.check_config` rejects configs that would train nothing
or fail deep inside a step. On resume the CSV logger keeps the ``metrics.csv`` rows logged before
the checkpoint and appends (:func:`tasks.run.metrics_csv.keep_csv_history`).

Returns ``(metrics, objects)``: ``metrics`` are the trainer's final ``callback_metrics`` as floats;
``objects`` holds ``cfg, datamodule, model, callbacks, logger, trainer``.
"""


from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf, open_dict

from callbacks.domainbed_results import DomainBedResultsCallback
from callbacks.numerics import NumericalFaultCallback
from callbacks.records import git_commit
from callbacks.resume import Preempted
from callbacks.run_summary import hydra_overrides
from tasks.evaluation import evaluate
from tasks.resolvers import register_resolvers
from tasks.results.domainbed import run_report
from tasks.run import jobs
from tasks.run.checkpoint_io import remove_orphan_temporaries
from tasks.run.checks import check_config, check_stages
from tasks.run.console import (
    drop_disabled_progress_bar,
    print_config_tree,
    route_lightning_logs,
    run_header,
    save_resolved_config,
)
from tasks.run.continuation import check_continuation
from tasks.run.hydra_runtime import hydra_mode, hydra_runtime
from tasks.run.metrics_csv import keep_csv_history, log_at_global_step, start_csv_history
from tasks.run.resume import init_from_checkpoint, prepare_fit, run_identity
from tasks.run.run_folder import (
    acquire_lock,
    append_attempt,
    check_records_before_start,
    discard_staging,
    promote_staging,
    release_lock,
    remove_if_empty,
    run_folder_of_checkpoint,
)
from tasks.run.short_runs import ShortRunCallback
from tasks.run.tb_hparams import HparamsSessionCallback
from tasks.run.wandb_utils import auto_offline, offline_run_dir, print_sync_command

log = logging.getLogger("tasks.train")


def instantiate_group(group: DictConfig | None, kind: str) -> list[Any]:
    """Instantiate every ``{_target_: ...}`` entry of a callbacks/logger mapping, in order."""
    out: list[Any] = []
    if not group:
        return out
    if not isinstance(group, DictConfig):
        raise TypeError(f"{kind} config must be a mapping of name -> {{_target_: ...}}, got {type(group).__name__}")
    for name, node in group.items():
        if isinstance(node, DictConfig) and "_target_" in node:
            log.info("Instantiating %s <%s> (%s)", kind, node._target_, name)
            out.append(hydra.utils.instantiate(node, _convert_="all"))
    return out


def finish_wandb() -> None:
    """Close the active W&B run (if any) so the next job of a multirun starts a new one."""

    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        run_dir = offline_run_dir(wandb.run)
        wandb.finish()
        print_sync_command(run_dir)


def train(cfg: DictConfig, on_checked: Any = None) -> tuple[dict[str, float], dict[str, Any]]:
    """Instantiate datamodule, module, callbacks, loggers and trainer from ``cfg``; fit (and test).

    Every check (config, checkpoint fit and identity, ``init_from``, data ``prepare_data``/``setup``) runs
    before anything is written; then ``on_checked(resume_step)`` is called (``rmoe-train`` moves the
    attempt's records into place there), and only then are the run's records written."""
    register_resolvers()
    check_config(cfg)
    check_stages(cfg.get("train", True), cfg.get("ckpt_path"))
    try:
        if cfg.get("seed") is not None:
            L.seed_everything(int(cfg.seed), workers=True)
        log.info("Instantiating datamodule <%s>", cfg.data._target_)
        datamodule = hydra.utils.instantiate(cfg.data, _convert_="all")
        log.info("Instantiating module <%s>", cfg.module._target_)
        model = hydra.utils.instantiate(cfg.module, _convert_="all")
        callbacks = instantiate_group(cfg.get("callbacks"), "callback")
        callbacks = drop_disabled_progress_bar(callbacks, bool(cfg.trainer.get("enable_progress_bar", True)))
        callbacks.append(ShortRunCallback())  # runs shorter than log_every_n_steps / one epoch log and validate
        callbacks.append(HparamsSessionCallback(OmegaConf.to_container(cfg, resolve=True)))  # TensorBoard's HPARAMS
        auto_offline(cfg)  # W&B offline when there is no API key or the host is unreachable
        loggers = instantiate_group(cfg.get("logger"), "logger")
        log.info("Instantiating trainer <%s>", cfg.trainer._target_)
        trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False,
                                          _convert_="all")
        log_at_global_step(loggers, trainer)  # metrics.csv, TensorBoard, W&B: rows at the updates completed
        if trainer.strategy.root_device.type == "cuda":
            torch.set_float32_matmul_precision("high")  # TF32 for the fp32 matmuls (trainer=gpu, README)
        objects = {"cfg": cfg, "datamodule": datamodule, "model": model, "callbacks": callbacks,
                   "logger": loggers, "trainer": trainer}
        ckpt_path = cfg.get("ckpt_path")
        # RNG states and the run identity in checkpoints; ckpt_path fits the model and is this run's
        resume_step = prepare_fit(trainer, model, ckpt_path, run_identity(cfg))
        if cfg.get("test") and not _best_checkpoint_callbacks(trainer):
            raise ValueError("invalid config: test=true needs a ModelCheckpoint with a monitor "
                             "(callbacks.model_checkpoint) to evaluate the best checkpoint; allowed: test=false, "
                             "or that callback")
        if cfg.get("init_from"):
            if ckpt_path:
                raise ValueError(f"init_from={cfg.init_from!r} and ckpt_path={ckpt_path!r} are both set; allowed: "
                                 "one of them (ckpt_path continues a run, init_from starts a new one from its weights)")
            init_from_checkpoint(cfg.init_from, model)
        datamodule.prepare_data()  # bad data fails here, before any record is written
        datamodule.setup("fit")
        if on_checked is not None:
            on_checked(resume_step)
        if loggers:
            if jobs.is_rank_zero() and resume_step is not None:
                keep_csv_history(loggers, resume_step)  # Lightning's CSV logger would delete metrics.csv
            elif jobs.is_rank_zero():
                start_csv_history(loggers)  # no warning about the run folder's other files
        if loggers:
            hparams = OmegaConf.to_container(cfg, resolve=True)
            for lg in loggers:
                lg.log_hyperparams(hparams)
        trainer.fit(model=model, datamodule=datamodule, ckpt_path=ckpt_path)
        results = [c for c in trainer.callbacks if isinstance(c, DomainBedResultsCallback)]
        if trainer.is_global_zero and results and results[0].path:  # DomainBed: the run's per-domain table
            records = DomainBedResultsCallback.read(results[0].path)
            if records:
                print(run_report(records, getattr(datamodule, "environments", None), results[0].path), flush=True)
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        if cfg.get("test"):
            objects["eval"] = evaluate_best_checkpoint(cfg, trainer)
            if objects["eval"] is not None:  # labelled GLUE test files: test/* (rmoe-eval's record has the rest)
                metrics.update({k: v for k, v in objects["eval"]["metrics"].items() if k.startswith("test")})
        return metrics, objects
    finally:
        finish_wandb()


def _best_checkpoint_callbacks(trainer: Any) -> list[Any]:
    return [c for c in getattr(trainer, "checkpoint_callbacks", []) if getattr(c, "monitor", None)]


def evaluate_best_checkpoint(cfg: DictConfig, trainer: Any) -> dict[str, Any] | None:
    """``test=true``: ``rmoe-eval`` on the best checkpoint of this run (rank 0; ``<run>/eval/<ckpt>.json``)."""
    if not trainer.is_global_zero:
        return None
    best = next((c.best_model_path for c in _best_checkpoint_callbacks(trainer) if c.best_model_path), None)
    if not best:
        raise RuntimeError("test=true: no best checkpoint was saved (no validation ran?); nothing to evaluate")
    ecfg = cfg.copy()
    with open_dict(ecfg):
        ecfg.ckpt_path, ecfg.run_config, ecfg.validate, ecfg.predict, ecfg.export = best, None, True, False, None
        ecfg.eval_dir = str(Path(cfg.paths.output_dir) / "eval")
    record = evaluate(ecfg)
    log.info("test=true: evaluated %s -> %s", best, record.get("path"))
    if record.get("no_test_metrics"):
        log.warning("test=true: no test metrics were computed: %s", record["no_test_metrics"])
    return record


def _commit_attempt(cfg: DictConfig, out_dir: str, staging: Path | None, changes: list[dict[str, Any]],
                    resume_step: int | None) -> None:
    """Rank 0, run folder locked, every check passed: clear an unfinished folder (``skip_if_done``), move the
    attempt's ``.hydra/`` and log into place, remove ``done`` of a continued run (written again when this
    attempt succeeds) and orphan temporary checkpoints, list the attempt (with the allowed changes of a
    continuation and the step they apply from) and save the resolved config."""
    ckpt_path = cfg.get("ckpt_path")
    if cfg.get("skip_if_done") and not ckpt_path:  # resuming: keep the folder's checkpoints
        jobs.clear_partial(out_dir)
    promote_staging(out_dir, staging)
    if ckpt_path and jobs.is_done(out_dir):
        os.unlink(Path(out_dir) / jobs.DONE)
        log.warning("%s: continuing a finished run from %s: removed its done file (written again when this "
                    "attempt succeeds)", out_dir, ckpt_path)
    remove_orphan_temporaries(Path(out_dir) / "checkpoints")
    extra: dict[str, Any] = {}
    if resume_step is not None:
        extra["resumed_from_step"] = resume_step
    if changes:
        extra["changes"] = [{**c, "from_step": resume_step} for c in changes]
        log.warning("%s: continuing with changes allowed by resume.allow_changes, from step %s: %s", out_dir,
                    resume_step, "; ".join(f"{c['key']}: {c['run']!r} -> {c['now']!r}" for c in changes))
    append_attempt(out_dir, _attempt(cfg, "start", **extra))
    save_resolved_config(cfg, out_dir)


def _announce(cfg: DictConfig, out_dir: str) -> None:
    """Rank 0, at the start of a job: the resolved config as a tree (``print_config=false``: not printed; saved as
    ``<run>/config_resolved.yaml`` once the attempt's checks passed) and the run header (method, variant, seed,
    folder)."""
    if cfg.get("print_config", True):
        print_config_tree(cfg)
    print("\n".join(run_header(cfg, out_dir)), flush=True)


def _preemption(e: BaseException, out_dir: str | None) -> dict[str, Any] | None:
    """The attempt record of a preemption (:class:`callbacks.resume.Preempted`, or Lightning's
    ``SIGTERMException`` raised during a validation), else None: the signal, the step and checkpoint it
    stopped at, the exit code (128 + signal) and the exact command that resumes the run."""
    e = getattr(e, "rmoe_preempted", None) or e  # Lightning's SIGTERMException after LastCheckpoint saved the moment
    if isinstance(e, Preempted):
        signum, path, step = e.signum, e.path, e.step
    elif isinstance(e, SIGTERMException):
        signum, step = int(signal.SIGTERM), None
        last = Path(out_dir or ".") / "checkpoints" / "last.ckpt"
        path = str(last.resolve()) if last.is_file() else None
    else:
        return None
    resume = f"rmoe-train ckpt_path={path}" if path else "rmoe-train <the same overrides> (no checkpoint was saved)"
    return {"signal": signal.Signals(signum).name, "global_step": step, "checkpoint": path,
            "exit_code": 128 + signum, "resume": resume}


def _skipped_batches(trainer: Any) -> int:
    """The batches the numerics callback dropped (``callbacks.numerics.on_fault=skip``; its checkpointed count)."""
    return sum(int(cb.state_dict().get("skipped", 0)) for cb in getattr(trainer, "callbacks", [])
               if isinstance(cb, NumericalFaultCallback))


def _continues_in(cfg: DictConfig, out_dir: str) -> bool:
    ckpt_path = cfg.get("ckpt_path")
    found = run_folder_of_checkpoint(str(ckpt_path)) if ckpt_path and not cfg.get("init_from") else None
    return found is not None and os.path.realpath(found) == os.path.realpath(out_dir)


def _attempt(cfg: DictConfig, event: str, **extra: Any) -> dict[str, Any]:
    return {"event": event, "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "pid": os.getpid(),
            "host": socket.gethostname(), "ckpt_path": cfg.get("ckpt_path"), "overrides": hydra_overrides(),
            **extra}


DATA_ERRORS = ("GlueDataError", "DomainBedDataError")


def _data_error(e: BaseException) -> BaseException | None:
    """The GLUE/DomainBed data error (a missing or malformed file) behind ``e`` (Hydra wraps instantiation errors)."""
    seen = 0
    while e is not None and seen < 5:
        if type(e).__name__ in DATA_ERRORS:
            return e
        e, seen = e.__cause__ or e.__context__, seen + 1
    return None


def run_job(cfg: DictConfig, out_dir: str | None, name: str | None, owner: bool, staging: Path | None) -> float | None:
    """The rest of an ``rmoe-train`` job once its config passed the checks (:func:`tasks.train._job`): lock the run
    folder (rank 0), skip a done one (``skip_if_done``), refuse a continuation that changes the run, train, and
    record the attempt (``attempts.jsonl``, ``done``); Hydra's staged records are promoted once every check passed,
    else removed with the folder if it is empty. Returns ``cfg.optimized_metric`` for sweepers."""
    committed, locked = [], False
    try:
        route_lightning_logs()  # Hydra's job logging prints Lightning's records: once
        changes: list[dict[str, Any]] = []
        if owner:
            acquire_lock(out_dir)
            locked = True
            if cfg.get("skip_if_done") and jobs.is_done(out_dir):
                recorded = jobs.read_done(out_dir).get("metrics", {})
                log.info("%s is done (skip_if_done=true): not training again", out_dir)
                return recorded.get(name) if name else None
            check_records_before_start(out_dir, cfg.get("ckpt_path"), bool(cfg.get("skip_if_done")))
            if _continues_in(cfg, out_dir):
                changes = check_continuation(cfg, out_dir)
            _announce(cfg, out_dir)

        def on_checked(resume_step: int | None) -> None:
            if owner:
                _commit_attempt(cfg, out_dir, staging, changes, resume_step)
                committed.append(True)

        try:
            metrics, objects = train(cfg, on_checked=on_checked)
        except BaseException as e:
            preempted = _preemption(e, out_dir)
            if committed and preempted is not None:
                append_attempt(out_dir, _attempt(cfg, "preempted", **preempted))
            elif committed:
                append_attempt(out_dir, _attempt(cfg, "failed", error=f"{type(e).__name__}: {e}"[:2000]))
            if preempted is not None and jobs.is_rank_zero():
                log.warning("preempted (%s): checkpoint %s; resume with:\n  %s", preempted["signal"],
                            preempted["checkpoint"], preempted["resume"])
                print(f"rmoe-train: preempted ({preempted['signal']}); resume with:\n  {preempted['resume']}",
                      file=sys.stderr, flush=True)
            if preempted is not None and e.code != preempted["exit_code"]:  # Lightning's SIGTERMException: code None
                raise SystemExit(preempted["exit_code"]) from e
            data_error = _data_error(e)
            if data_error is not None and hydra_mode(hydra_runtime()) == "RUN":
                print(f"rmoe-train: error: {data_error}", file=sys.stderr)  # the message names key, file, fix
                sys.exit(2)
            raise
        trainer = objects.get("trainer")
        if out_dir and (trainer.is_global_zero if trainer is not None else jobs.is_rank_zero()):
            jobs.mark_done(out_dir, metrics, git_commit(), skipped_batches=_skipped_batches(trainer))
            append_attempt(out_dir, _attempt(cfg, "done", global_step=int(trainer.global_step) if trainer else None))
    finally:
        if owner and not committed:  # refused (or skipped): what Hydra wrote for this attempt goes
            discard_staging(out_dir, staging)
        if locked:
            release_lock(out_dir)
        if owner and not committed:
            remove_if_empty(out_dir)
    if not name:
        return None
    if name not in metrics:
        log.warning("optimized_metric=%r was not logged (no validation ran?); logged: %s", name, sorted(metrics))
        return None
    return metrics[name]


