"""The built-in routers' own settings (``MoEConfig.router_options``), torch-free.

A router class names its settings as ``Options`` (a frozen :class:`rmoe.config.RouterOptions` dataclass that
validates its fields); the built-in routers' classes are here rather than beside the routers in
:mod:`rmoe.routing` so that a run's config can be composed and checked without importing torch. :data:`OPTIONS`
maps a router name to its class (``rmoe-train``'s config group reads the defaults from it:
``tasks.run.moe_schema``); a router defined elsewhere may keep its ``Options`` in its own module.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .config import RouterOptions

#: router name -> its settings class (the same class as ``rmoe.registry.ROUTERS[name].Options``)
OPTIONS: dict[str, type[RouterOptions]] = {}


def options_of(router: str):
    """Class decorator: ``cls`` is router ``router``'s settings (entered in :data:`OPTIONS`)."""
    def add(cls: type[RouterOptions]) -> type[RouterOptions]:
        OPTIONS[router] = cls
        return cls
    return add


@options_of("cosine")
@dataclass(frozen=True)
class CosineOptions(RouterOptions):
    """The cosine router's settings: ``proj_dim`` (width of ``P``), ``init_temperature`` (``tau = log(1 / it)``
    at init)."""

    proj_dim: int = 256
    init_temperature: float = 0.5

    def __post_init__(self) -> None:
        if not (isinstance(self.proj_dim, int) and not isinstance(self.proj_dim, bool) and self.proj_dim >= 1):
            self.fail("proj_dim", "an integer >= 1")
        t = self.init_temperature
        if not (isinstance(t, (int, float)) and not isinstance(t, bool) and t > 0):
            self.fail("init_temperature", "a number > 0")


@options_of("lossfree")
@dataclass(frozen=True)
class LossFreeOptions(RouterOptions):
    """The loss-free router's settings: ``score_fn`` (softmax | sigmoid) and ``bias_update_rate`` (``u`` of
    ``b_e += u · sign(mean load − load_e)``)."""

    score_fn: str = "softmax"
    bias_update_rate: float = 1e-3

    SCORE_FNS = ("softmax", "sigmoid")

    def __post_init__(self) -> None:
        if self.score_fn not in self.SCORE_FNS:
            self.fail("score_fn", "|".join(self.SCORE_FNS))
        u = self.bias_update_rate
        if not (isinstance(u, (int, float)) and not isinstance(u, bool) and math.isfinite(u) and u >= 0):
            self.fail("bias_update_rate", "a finite number >= 0")
