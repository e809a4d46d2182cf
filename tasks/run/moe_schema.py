"""The ``moe`` config group's base: every key of an MoE layer with its default, taken from :mod:`rmoe` itself.

A ``conf/moe/<method>.yaml`` file states only what sets its method apart; the keys it leaves out, and their
defaults, come from the nodes made here (:func:`schema_nodes`, stored in Hydra's ConfigStore before any config is
composed), so each default has one home -- the Python dataclass that validates it:

* ``moe/_layer``: the fields of :class:`rmoe.MoEConfig` with their defaults, plus the layout keys
  (:data:`tasks.run.common.MOE_LAYOUT_KEYS`): ``name`` (required: the method's name), ``layers`` (the backbone's
  MoE layers) and ``init`` (the first of :data:`rmoe.config.EXPERT_INITS`, FFN surgery's default). Left out: the
  keys set from elsewhere -- ``backend`` (the ``backend`` group) and ``causal`` (the backbone) -- and
  ``activation`` is null (the backbone's own activation, filled in when the model is built); ``num_experts`` (the
  previous release's name of ``initial_experts``) is null, so ``moe.num_experts=N`` still composes and is read with a
  deprecation warning.
* ``moe/_fusion``: :class:`rmoe.config.FusionConfig`'s fields (a method with Stateful Fusion lists
  ``_fusion@fusion`` in its defaults; ``moe.fusion=null`` switches it off).
* ``moe/_options/<router>``: the router's own settings (its ``Options`` dataclass, :data:`rmoe.router_options.OPTIONS`),
  for a method whose file lists ``_options/<router>@router_options``.

A key that is in none of these is refused by Hydra as usual (``+moe.<key>=...`` adds one). This module imports
neither Hydra nor torch (``rmoe-train``'s config errors come without them); :func:`tasks.resolvers.register_resolvers`
stores :func:`schema_nodes` in Hydra's ConfigStore.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from omegaconf import MISSING

from rmoe.config import EXPERT_INITS, RENAMED_KEYS, FusionConfig, MoEConfig, ReleasedConfig
from rmoe.router_options import OPTIONS
from rmoe.schedules import RENAMED as SCHEDULE_RENAMED

#: MoEConfig fields the ``moe`` group does not state: set by the code from another group or the backbone
SET_ELSEWHERE = ("backend", "causal")


def _defaults(cls: type) -> dict[str, Any]:
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return {k: dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v for k, v in out.items()}


def layer_defaults() -> dict[str, Any]:
    """``moe/_layer``: the layout keys, then MoEConfig's fields (less :data:`SET_ELSEWHERE`), each at its default."""
    layer = {k: v for k, v in _defaults(MoEConfig).items() if k not in SET_ELSEWHERE}
    layer["activation"] = None  # the backbone's own (rmoe.surgery fills it in); MoEConfig's default is for rmoe alone
    layer["num_experts"] = None  # the previous release's initial_experts: moe.num_experts=N still works, with a warning
    assert set(layer["released"]) == {f.name for f in dataclasses.fields(ReleasedConfig)}
    return {"name": MISSING, "layers": "${backbone.moe_layers}",
            "init": EXPERT_INITS[0], **layer}


def fusion_defaults() -> dict[str, Any]:
    """``moe/_fusion``: Stateful Fusion's fields at their defaults."""
    return _defaults(FusionConfig)


def router_options_defaults() -> dict[str, dict[str, Any]]:
    """``{router: its Options' fields at their defaults}`` for every built-in router that has settings."""
    return {name: opts for name, cls in OPTIONS.items() if (opts := _defaults(cls))}


def schema_nodes() -> list[tuple[str, str, dict[str, Any]]]:
    """``(group, name, node)`` of each base node: ``moe/_layer``, ``moe/_fusion``, ``moe/_options/<router>``."""
    return [("moe", "_layer", layer_defaults()), ("moe", "_fusion", fusion_defaults()),
            *(("moe/_options", router, opts) for router, opts in router_options_defaults().items())]


def renamed_keys() -> dict[str, str]:
    """``{old dotted key: new}`` of the previous release's config keys that are read under a new name (the MoE
    layer's, :data:`rmoe.config.RENAMED_KEYS`, and the curriculum's, :data:`rmoe.schedules.RENAMED`)."""
    return {**{f"moe.{old}": f"moe.{new}" for old, new in RENAMED_KEYS.items()},
            **{f"curriculum.{old}": f"curriculum.{new}" for old, new in SCHEDULE_RENAMED.items()}}


def is_schema_default(key: str, value: Any, router: str | None) -> bool:
    """Whether ``key`` (a dotted config key under ``moe.``) at ``value`` is what the ``moe`` group's base nodes give
    it -- a key a run's saved config may lack because its method file did not state it before this base existed
    (:func:`tasks.run.continuation.check_continuation` does not count it as a change)."""
    if not key.startswith("moe."):
        return False
    parts = key.split(".")[1:]
    if parts[0] == "fusion":
        node: Any = {"fusion": fusion_defaults()}
    elif parts[0] == "router_options" and len(parts) > 1:
        node = {"router_options": router_options_defaults().get(router or "", {})}
    else:
        node = layer_defaults()
    for part in parts:
        if not isinstance(node, Mapping) or part not in node:
            return False
        node = node[part]
    return node == value
