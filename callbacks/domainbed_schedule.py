"""DomainBed's evaluation schedule (``scripts/train.py``) for a Lightning run.

DomainBed evaluates after update ``step`` (0-based index of the update just taken) when
``step % checkpoint_freq == 0`` or ``step == n_steps - 1``: after the first update, then after
updates ``1 + f``, ``1 + 2f``, ... (counted from 1) and after the last. Lightning's integer
``val_check_interval = f`` validates after updates ``f, 2f, ...`` instead.

:class:`DomainBedEvalSchedule` makes the fit loop follow DomainBed's schedule, with
``checkpoint_freq`` = the Trainer's integer ``val_check_interval`` (its one config home,
``trainer.val_check_interval``) and ``n_steps`` = ``trainer.max_steps``. Lightning decides after each
training batch whether to validate in a private method of its epoch loop; the callback replaces it
(``callbacks.lightning_internals.replace_validation_decision``), so every user of the decision follows the
schedule: the loop itself, its restart logic (a resumed run does not redo an evaluation its
checkpoint already holds) and ``callbacks.resume.LastCheckpoint`` (no step save between a batch and
its evaluation). Kept from Lightning: no validation while gradients accumulate, none when
validation is disabled, and one when a callback stops training early (``trainer.should_stop``).
A non-integer ``val_check_interval`` (null, a fraction or a duration) leaves Lightning's schedule.
"""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import Callback

from callbacks.lightning_internals import check_lightning_version, replace_validation_decision


def domainbed_should_evaluate(updates: int, checkpoint_freq: int, max_steps: int | None) -> bool:
    """Whether DomainBed evaluates after ``updates`` optimizer updates (its ``step = updates - 1``)."""
    if updates < 1:
        return False
    step = updates - 1
    last = max_steps is not None and max_steps > 0 and updates == max_steps
    return step % checkpoint_freq == 0 or last


class DomainBedEvalSchedule(Callback):
    """Validate on DomainBed's schedule (module docstring); ``checkpoint_freq`` is read from the
    Trainer's ``val_check_interval``."""

    def __init__(self) -> None:
        self.checkpoint_freq: int | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        freq = getattr(trainer, "val_check_interval", None)
        if not isinstance(freq, int) or isinstance(freq, bool) or freq < 1:
            return
        self.checkpoint_freq = freq
        check_lightning_version()
        replace_validation_decision(
            trainer, lambda: domainbed_should_evaluate(int(trainer.global_step), freq, trainer.max_steps))
