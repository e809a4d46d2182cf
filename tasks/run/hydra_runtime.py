"""Hydra's runtime config of the running job, read without importing Hydra (``rmoe-train --help`` and completion
answer without it; a running job has loaded it)."""

from __future__ import annotations

import sys
from typing import Any


def hydra_runtime() -> Any:
    """Hydra's config of the running job (``HydraConfig.get()``), or None outside ``@hydra.main`` (the compose API,
    ``train(cfg)`` in tests). It does not import Hydra: a running job has loaded it (``rmoe-train --help`` has not)."""
    module = sys.modules.get("hydra.core.hydra_config")
    if module is None or not module.HydraConfig.initialized():
        return None
    return module.HydraConfig.get()


def hydra_mode(hc: Any) -> str | None:
    """``"RUN"`` or ``"MULTIRUN"`` for a Hydra config from :func:`hydra_runtime` (None: no job)."""
    return None if hc is None else str(hc.mode).rsplit(".", 1)[-1]
