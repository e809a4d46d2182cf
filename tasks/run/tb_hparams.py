"""TensorBoard's HPARAMS tab: the run's config as hyperparameters next to its final metrics.

Lightning's ``TensorBoardLogger.log_hyperparams`` writes the hparams plugin data only together with metric values
that it logs as scalars at step 0 (``hp_metric``, off here: it would add a fake point to every curve), so the
tab stayed empty. :func:`log_hparams_session` writes, at the end of fitting (:class:`HparamsSessionCallback`, which
:func:`tasks.job.train` adds; before the logger closes its event file), the plugin's experiment, session-start
(the flattened resolved config: ``moe/name``, ``module/lr``, ...) and session-end summaries naming the run's final
metrics (the trainer's final metrics, ``done``'s keys: ``val/score_best``, ``routing/*`` ...; ``test=true``'s
``test/*`` come after fitting and are not among them); the tab reads each metric's last
value from the scalars already logged under those tags, so nothing is logged twice.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger


def flat_hparams(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"moe/name": "rmoe", "module/lr": 2e-05, ...}``: nested keys joined by ``/``; lists and null as text."""
    out: dict[str, Any] = {}
    for k, v in config.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flat_hparams(v, key + "/"))
        elif isinstance(v, (bool, int, float, str)):
            out[key] = v
        else:
            out[key] = str(v)
    return out


def log_hparams_session(logger: Any, config: Mapping[str, Any], metrics: Mapping[str, float]) -> bool:
    """Write the hparams session of ``logger`` if it is a TensorBoard logger; True when written."""
    if not isinstance(logger, TensorBoardLogger):
        return False
    from torch.utils.tensorboard.summary import hparams

    hp = {k: v for k, v in flat_hparams(config).items() if not k.startswith("hydra/")}
    names = {k: float(v) for k, v in metrics.items()}
    exp, ssi, sei = hparams(hp, names)
    writer = logger.experiment._get_file_writer()
    for summary in (exp, ssi, sei):
        writer.add_summary(summary)
    writer.flush()
    return True


class HparamsSessionCallback(Callback):
    """:func:`log_hparams_session` for every logger at the end of fitting (rank 0)."""

    def __init__(self, config: Mapping[str, Any]) -> None:
        self.config = config

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        for lg in trainer.loggers:
            log_hparams_session(lg, self.config, metrics)
