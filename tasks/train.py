"""The training entry point: ``rmoe-train`` (Hydra over ``conf/train.yaml``) and ``train(cfg)``.

Contract between the config groups and :func:`train` (any task family — GLUE, DomainBed — plugs in
by providing these keys; all are instantiated with ``hydra.utils.instantiate(..., _convert_="all")``,
so targets receive plain dicts/lists):

* ``datamodule``: ``_target_`` of a ``LightningDataModule`` and its arguments. ``train`` calls
  ``prepare_data()`` and ``setup("fit")`` before building the trainer, so bad data (missing file,
  malformed row, unknown task) fails before any training step; ``setup`` must be idempotent.
* ``module``: ``_target_`` of a ``LightningModule``. The task config passes it what it needs by
  interpolation, conventionally ``backbone: ${backbone}``, ``moe: ${moe}`` (the ``moe`` group:
  ``layers``, ``init`` + :class:`rmoe.MoEConfig` fields) and ``backend: ${backend.name}``. The module
  exposes a float attribute ``lambda_aux`` (set every step by ``callbacks.curriculum``, which reads
  the ``curriculum`` group) and logs ``cfg.optimized_metric`` (``val/score_best``).
* ``callbacks`` / ``logger``: mappings of name -> ``{_target_: ...}`` (entries without ``_target_``,
  or null, are skipped); ``trainer``: ``_target_: lightning.pytorch.Trainer`` and its arguments.
* ``task_name`` names the log folder ``logs/<task_name>/{runs,multiruns}/...``; ``seed`` seeds
  Python/NumPy/torch (and dataloader workers); ``ckpt_path`` resumes; ``train``/``test`` pick stages.
* ``paths.output_dir`` is the run folder (Hydra's output dir; set it yourself when composing a
  config outside ``@hydra.main``, e.g. in tests).

Returns ``(metrics, objects)``: ``metrics`` are the trainer's final ``callback_metrics`` as floats;
``objects`` holds ``cfg, datamodule, model, callbacks, logger, trainer``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

import tasks.common  # noqa: F401  (registers the config resolvers)

log = logging.getLogger(__name__)

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")


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
    import sys

    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        from tasks.wandb_utils import offline_run_dir, print_sync_command

        run_dir = offline_run_dir(wandb.run)
        wandb.finish()
        print_sync_command(run_dir)


def train(cfg: DictConfig) -> tuple[dict[str, float], dict[str, Any]]:
    """Instantiate datamodule, module, callbacks, loggers and trainer from ``cfg``; fit (and test)."""
    import lightning as L

    try:
        if cfg.get("seed") is not None:
            L.seed_everything(int(cfg.seed), workers=True)
        log.info("Instantiating datamodule <%s>", cfg.datamodule._target_)
        datamodule = hydra.utils.instantiate(cfg.datamodule, _convert_="all")
        log.info("Instantiating module <%s>", cfg.module._target_)
        model = hydra.utils.instantiate(cfg.module, _convert_="all")
        callbacks = instantiate_group(cfg.get("callbacks"), "callback")
        from tasks.wandb_utils import auto_offline

        auto_offline(cfg)  # W&B offline when there is no API key or the host is unreachable
        loggers = instantiate_group(cfg.get("logger"), "logger")
        log.info("Instantiating trainer <%s>", cfg.trainer._target_)
        trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False,
                                          _convert_="all")
        objects = {"cfg": cfg, "datamodule": datamodule, "model": model, "callbacks": callbacks,
                   "logger": loggers, "trainer": trainer}
        if loggers:
            hparams = OmegaConf.to_container(cfg, resolve=True)
            for lg in loggers:
                lg.log_hyperparams(hparams)
        datamodule.prepare_data()
        datamodule.setup("fit")
        if cfg.get("train", True):
            from tasks.resume import prepare_fit
            prepare_fit(trainer, model, cfg.get("ckpt_path"))  # RNG states in checkpoints; ckpt fits the model
            trainer.fit(model=model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        if cfg.get("test"):
            ckpt = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else None
            trainer.test(model=model, datamodule=datamodule, ckpt_path=ckpt or None)
            metrics.update({k: float(v) for k, v in trainer.callback_metrics.items()})
        return metrics, objects
    finally:
        finish_wandb()


@hydra.main(config_path=CONF_DIR, config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    """``rmoe-train``: train one configuration; returns ``cfg.optimized_metric`` for sweepers.

    On success rank 0 writes ``<run>/done`` (:mod:`tasks.jobs`); ``skip_if_done=true`` skips a job
    whose folder already has it and clears an unfinished one first."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from tasks import jobs

    out_dir = cfg.get("paths", {}).get("output_dir")
    name = cfg.get("optimized_metric")
    if cfg.get("skip_if_done") and out_dir:
        if jobs.is_done(out_dir):
            recorded = jobs.read_done(out_dir).get("metrics", {})
            log.info("%s is done (skip_if_done=true): not training again", out_dir)
            return recorded.get(name) if name else None
        if jobs.is_rank_zero() and not cfg.get("ckpt_path"):  # resuming: keep the folder's checkpoints
            jobs.clear_partial(out_dir)
    metrics, objects = train(cfg)
    trainer = objects.get("trainer")
    if out_dir and (trainer.is_global_zero if trainer is not None else jobs.is_rank_zero()):
        from callbacks.run_summary import git_commit

        jobs.mark_done(out_dir, metrics, git_commit())
    if not name:
        return None
    if name not in metrics:
        log.warning("optimized_metric=%r was not logged (no validation ran?); logged: %s", name, sorted(metrics))
        return None
    return metrics[name]


if __name__ == "__main__":
    main()
