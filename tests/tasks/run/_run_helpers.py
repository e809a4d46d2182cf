"""Test-only Lightning callbacks for subprocess runs of ``python -m tasks.train``
(``+callbacks.<name>._target_=_run_helpers.<Class>``; the test puts this folder on PYTHONPATH)."""

from __future__ import annotations

import os
import time

from lightning.pytorch.callbacks import Callback


class WaitForFile(Callback):
    """At the first training batch: create ``ready`` and wait (at most ``timeout`` s) until ``go`` exists."""

    def __init__(self, ready: str, go: str, timeout: float = 120.0):
        self.ready, self.go, self.timeout = ready, go, float(timeout)
        self.waited = False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.waited:
            return
        self.waited = True
        open(self.ready, "w").close()
        t0 = time.monotonic()
        while not os.path.exists(self.go):
            if time.monotonic() - t0 > self.timeout:
                raise TimeoutError(f"{self.go} did not appear within {self.timeout} s")
            time.sleep(0.05)


class FailAtStep(Callback):
    """Raise ``RuntimeError`` at the start of the training batch after ``step`` optimizer steps."""

    def __init__(self, step: int):
        self.step = int(step)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step >= self.step:
            raise RuntimeError(f"injected failure at step {trainer.global_step}")
