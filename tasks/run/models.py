"""Model helpers of the task packages: the Hugging Face encoder of a backbone config and the linear-decay
learning-rate schedule (torch and transformers; :mod:`tasks.run.common` holds the torch-free helpers)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModel

from tasks.run.common import resolve_model_path


def build_hf_encoder(pretrained: str | None, config: Mapping[str, Any] | None = None) -> nn.Module:
    """``AutoModel.from_pretrained(pretrained)``, or a random init from ``config`` (a dict with
    ``model_type`` and the config fields) when ``pretrained`` is null."""
    if pretrained:
        return AutoModel.from_pretrained(resolve_model_path(pretrained))
    if not config or "model_type" not in config:
        raise ValueError("backbone: give backbone.pretrained, or backbone.config with a model_type for random init")
    cfg = dict(config)
    hf_cfg = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    return AutoModel.from_config(hf_cfg)


def linear_decay(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int = 0):
    """LambdaLR: linear warm-up over ``warmup_steps`` then linear decay to 0 at ``total_steps``."""
    total = max(int(total_steps), 1)
    warm = max(int(warmup_steps), 0)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return max(0.0, (total - step) / max(total - warm, 1))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
