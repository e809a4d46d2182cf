"""Every use of Lightning's private API in this project, in one place, for the Lightning series it was written
against (:data:`SUPPORTED_LIGHTNING`; ``pyproject.toml`` pins it, ``tests/callbacks/test_lightning_internals.py``
checks the pin and that each member used here exists).

Lightning has no public hook for what these do:

* the fit loop's batch fetcher, read ahead by the global-batch routing pre-pass (``callbacks.balancing``):
  :func:`prefetch_fetcher`, :func:`prefetched_batches`, :func:`fetcher_iterator`, :func:`set_fetcher_iterator`,
  and :func:`as_training_step_sees_it` (the transfer the training loop applies before ``training_step``);
* the train dataloaders of the fit loop (:func:`train_dataloaders`) and the loader states a checkpoint holds,
  which Lightning 2.5-2.6 drops when ``configure_optimizers`` reads ``estimated_stepping_batches`` (bug #20550;
  :func:`load_dropped_loader_states`, ``callbacks.resume.RNGStateCallback``);
* the epoch loop's "validate after this batch?" decision: read (:func:`validation_follows`,
  ``callbacks.resume.LastCheckpoint``) and replaced (:func:`replace_validation_decision`,
  ``callbacks.domainbed_schedule``);
* ``ModelCheckpoint``'s own save steps, for a subclass that also saves every N steps and on preemption
  (:func:`save_checkpoint_now`, :func:`checkpoint_skips_saving`, :func:`checkpoint_saves_at_epoch_end`,
  :func:`allow_checkpoint_resave`).

A callback that uses them calls :func:`check_lightning_version` in its ``setup``: another Lightning series fails
there, naming both versions, instead of misbehaving inside a private member that changed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import lightning
import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loops.fetchers import _PrefetchDataFetcher

#: the Lightning series (major.minor) whose private members this module uses
SUPPORTED_LIGHTNING = "2.6"


def check_lightning_version(version: str | None = None) -> None:
    """Raise ``RuntimeError`` unless ``version`` (default: the installed one) is in :data:`SUPPORTED_LIGHTNING`."""
    version = lightning.__version__ if version is None else version
    if version.split(".")[:2] != SUPPORTED_LIGHTNING.split("."):
        raise RuntimeError(f"lightning=={version} is installed; callbacks/lightning_internals.py uses private members "
                           f"of Lightning {SUPPORTED_LIGHTNING}.x (pyproject.toml pins it); allowed: lightning "
                           f"{SUPPORTED_LIGHTNING}.x, or port that module to {version} first")


# --- the fit loop's batches --------------------------------------------------------------------------------------
def prefetch_fetcher(trainer: L.Trainer) -> Any:
    """The fit loop's batch fetcher, when it is Lightning's prefetching one with an open iterator; else
    ``RuntimeError`` (a ``dataloader_iter`` training step, or no epoch running)."""
    fetcher = getattr(trainer.fit_loop, "_data_fetcher", None)
    if type(fetcher) is not _PrefetchDataFetcher or fetcher.iterator is None:
        raise RuntimeError(f"global_batch accumulation: the fit loop's batch fetcher is {type(fetcher).__name__}, "
                           "not Lightning's _PrefetchDataFetcher the routing pre-pass reads ahead from")
    return fetcher


def prefetched_batches(fetcher: Any) -> list[Any]:
    """The items ``(batch, batch_idx, dataloader_idx)`` the fetcher has already read and not yet served."""
    return list(fetcher.batches)


def fetcher_iterator(fetcher: Any) -> Iterator:
    """The iterator the fetcher reads from (a new one each epoch)."""
    return fetcher.iterator


def set_fetcher_iterator(fetcher: Any, iterator: Iterator) -> None:
    fetcher.iterator = iterator


def as_training_step_sees_it(trainer: L.Trainer, pl_module: L.LightningModule, raw: Any) -> Any:
    """A raw batch through what the training loop applies before ``training_step``: the precision plugin's input
    conversion, the module's ``on_before_batch_transfer`` and the strategy's transfer to the device."""
    batch = trainer.precision_plugin.convert_input(raw)
    batch = pl_module._on_before_batch_transfer(batch, dataloader_idx=0)
    return trainer.strategy.batch_to_device(batch, dataloader_idx=0)


def train_dataloaders(trainer: L.Trainer) -> list[Any]:
    """The fit loop's train dataloaders (empty before they are built)."""
    return list(getattr(getattr(trainer.fit_loop, "_combined_loader", None), "flattened", None) or [])


def load_dropped_loader_states(trainer: L.Trainer) -> bool:
    """Load the checkpointed train-loader states Lightning left unloaded (bug #20550); True when it did."""
    fit_loop = trainer.fit_loop
    loader_states = getattr(fit_loop, "_combined_loader_states_to_load", None)
    combined = getattr(fit_loop, "_combined_loader", None)
    if loader_states and combined is not None:
        combined._load_state_dicts(loader_states)
        fit_loop._combined_loader_states_to_load = []
        return True
    return False


# --- the validation decision -------------------------------------------------------------------------------------
def validation_follows(trainer: L.Trainer) -> bool:
    """Whether Lightning validates right after the current training batch (False if the private API changed)."""
    epoch_loop = trainer.fit_loop.epoch_loop
    try:
        return bool(epoch_loop._should_check_val_fx(trainer.fit_loop._data_fetcher)
                    and not getattr(epoch_loop, "_skip_next_val", False))
    except Exception:  # private Lightning API changed: save anyway
        return False


def replace_validation_decision(trainer: L.Trainer, due: Callable[[], bool]) -> None:
    """Make the epoch loop validate after a training batch when ``due()`` says so, keeping Lightning's own rules:
    none while gradients accumulate or when validation is off this epoch, and one when a callback stopped the run
    early. Every user of the decision follows it (the loop, its restart logic, :func:`validation_follows`)."""
    loop = trainer.fit_loop.epoch_loop

    def should_check_val(data_fetcher: Any) -> bool:
        if not loop._should_check_val_epoch() or loop._should_accumulate():
            return False
        if trainer.should_stop and trainer.fit_loop._can_stop_early:
            return True
        return bool(due())

    loop._should_check_val_fx = should_check_val


# --- ModelCheckpoint's save steps --------------------------------------------------------------------------------
def save_checkpoint_now(callback: ModelCheckpoint, trainer: L.Trainer) -> None:
    """Save as the callback does after a validation (its top-k rule on the current monitor candidates)."""
    callback._save_topk_checkpoint(trainer, callback._monitor_candidates(trainer))


def checkpoint_skips_saving(callback: ModelCheckpoint, trainer: L.Trainer) -> bool:
    """Whether the callback skips a save now (it saved at this step already, sanity check, fast_dev_run ...)."""
    return bool(callback._should_skip_saving_checkpoint(trainer))


def checkpoint_saves_at_epoch_end(callback: ModelCheckpoint, trainer: L.Trainer) -> bool:
    return bool(callback._should_save_on_train_epoch_end(trainer))


def allow_checkpoint_resave(callback: ModelCheckpoint) -> None:
    """Let the callback save again at the step it last saved at."""
    callback._last_global_step_saved = -1
