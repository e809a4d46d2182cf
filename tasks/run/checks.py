"""Checks on the composed config that make every accepted run train something real.

:func:`check_config` is called by :func:`tasks.job.train` (and ``rmoe-train`` before it touches the
run folder) before anything is built. Each violation raises :class:`ConfigError` whose message names
the key, the value and what is allowed:

* ``trainer.max_steps``: -1 (no step limit, ``trainer.max_epochs`` decides) or an integer >= 1;
  ``trainer.max_epochs`` >= 1 when there is no step limit (-1 with ``max_steps=-1`` would never
  end); ``trainer.limit_train_batches`` not 0; ``trainer.accumulate_grad_batches``: an integer >= 1;
  ``trainer.val_check_interval``: null, a fraction in (0, 1] or an integer >= 1;
* ``moe.layers`` for an MoE method (``moe.router`` not null): a non-empty list of distinct integer
  layer indices within the backbone's depth (when it is known from the config);
* ``trainer.strategy`` when ``moe.aux_loss`` is ``global_batch`` and ``trainer.accumulate_grad_batches > 1``:
  auto, single-device or DDP (the routing pre-pass that makes the global-batch loss exact under
  accumulation runs the module's own forward: ``rmoe.accumulation``, ``callbacks.balancing``);
* the data group's own checks (:func:`check_data`: the DataModule's ``check_config``; DomainBed's
  ``data.test_envs``: a non-empty list of distinct environment indices that leaves at least one training
  environment);
* ``module.lr`` and every other ``module.*lr``: a finite number > 0; ``module.weight_decay``: a
  finite number >= 0;
* ``data.max_length`` (text backbones): at most the backbone's ``max_position_embeddings``;
* ``seed``, ``data.data_seed``, ``data.trial_seed``: integers in [0, 2**32 - 1];
* ``logger.wandb.mode``: null | online | offline | disabled;
* ``variant``: a name ending in ``_released`` (the released-code variants, SPEC §9) needs some ``moe.released``
  switch on (``moe=rmoe_released`` / ``moe=dynmoe_released`` set them), or the run would compute the paper's
  equations under the released code's name;
* ``data.glue_dir`` / ``data.root`` derived from an ``RMOE_DATA_DIR`` that is not a folder (the Makefile's
  default ``../shared/data`` beside a fresh clone): the message names the variable and its value;
* a Hugging Face hub backbone or dataset on a machine that cannot reach the hub and has no cached copy
  (:mod:`tasks.run.hub`: one TCP probe, seconds, instead of minutes of retries deep in ``from_pretrained``);
* ``moe.fusion``: null or every Stateful Fusion key (``ema_decay``, ``agg``, ``update_in_eval``, ``mix_alpha``): a
  partial mapping comes from ``+moe.fusion.<key>=...`` on a protocol with fusion off, which would switch fusion
  on with defaults for the keys not given, under the method's own name;
* the MoE layer's fields as :class:`rmoe.MoEConfig` checks them (``moe.initial_experts=0``, an unknown router ...),
  before the config is printed (:func:`check_moe_fields`, last: it imports ``rmoe``, hence torch);
* an override of ``moe.top_k`` (:func:`check_overrides`, from the command line) for a router that does not read
  it (``topany``, ``expert_choice``).

(λ's ``lambda_min <= lambda_max`` and the phase checks live with the schedules in ``rmoe``.)
"""

from __future__ import annotations

import functools
import importlib
import json
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import InterpolationKeyError

from rmoe.config import MoEConfig  # torch-free (rmoe/__init__ is lazy); its registries load torch when read
from rmoe.errors import ConfigError  # the one configuration error type
from rmoe.registry import ROUTERS
from rmoe.schedules import MODE_PARAMS, RENAMED
from tasks.run.common import CONF_DIR, resolve_model_path, split_moe_config
from tasks.run.hub import HubUnreachable, cached_file, preflight
from tasks.run.hydra_runtime import hydra_runtime

SEED_MAX = 2**32 - 1
WANDB_MODES = (None, "online", "offline", "disabled")


def _fail(key: str, value: Any, allowed: str, why: str = "") -> None:
    raise ConfigError(f"invalid config: {key}={value!r}{f' ({why})' if why else ''}; allowed: {allowed}")


def _get(cfg: Any, key: str, default: Any = None) -> Any:
    if isinstance(cfg, DictConfig):
        v = OmegaConf.select(cfg, key, default=default, throw_on_missing=False)
        return OmegaConf.to_container(v, resolve=True) if isinstance(v, (DictConfig, ListConfig)) else v
    node: Any = cfg
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return default
        node = node[part]
    return node


def _has(cfg: Any, key: str) -> bool:
    sentinel = object()
    if isinstance(cfg, DictConfig):  # without resolving the node (it may name Hydra's runtime)
        return OmegaConf.select(cfg, key, default=sentinel, throw_on_missing=False) is not sentinel
    return _get(cfg, key, sentinel) is not sentinel


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


# ---------------------------------------------------------------------------------------------
def check_trainer(cfg: Any) -> None:
    if _get(cfg, "trainer.fast_dev_run"):
        return
    steps = _get(cfg, "trainer.max_steps", -1)
    steps = -1 if steps is None else steps
    if not _is_int(steps) or not (steps == -1 or steps >= 1):
        _fail("trainer.max_steps", steps, "-1 (no step limit; trainer.max_epochs decides) or an integer >= 1",
              "a run of 0 steps trains nothing" if steps == 0 else "")
    epochs = _get(cfg, "trainer.max_epochs", None)
    if epochs is not None and (not _is_int(epochs) or not (epochs == -1 or epochs >= 1)):
        _fail("trainer.max_epochs", epochs, "-1 (no epoch limit; trainer.max_steps decides) or an integer >= 1")
    if steps == -1 and (epochs is None or epochs == -1) and _has(cfg, "trainer.max_epochs"):
        _fail("trainer.max_epochs", epochs, "an integer >= 1 when trainer.max_steps=-1",
              "with trainer.max_steps=-1 the run would never end")
    acc = _get(cfg, "trainer.accumulate_grad_batches", None)
    if acc is not None and (not _is_int(acc) or acc < 1):
        _fail("trainer.accumulate_grad_batches", acc, "an integer >= 1 (1: no accumulation)",
              "Lightning would divide by it inside the first step")
    vci = _get(cfg, "trainer.val_check_interval", None)
    if vci is not None and (not _is_number(vci) or not math.isfinite(float(vci)) or vci <= 0
                            or (isinstance(vci, float) and vci > 1)):
        _fail("trainer.val_check_interval", vci, "null (once per epoch), a fraction of an epoch in (0.0, 1.0] "
              "or an integer number of training batches >= 1")
    limit = _get(cfg, "trainer.limit_train_batches", None)
    if limit is not None and (not _is_number(limit) or limit <= 0 or not math.isfinite(float(limit))):
        _fail("trainer.limit_train_batches", limit, "a fraction in (0, 1] or an integer >= 1")


@functools.lru_cache(maxsize=16)
def _hf_config(pretrained: str) -> dict[str, Any]:
    """A Hugging Face backbone's ``config.json`` as written (a folder, or the hub cache's snapshot of a hub name;
    read without transformers, which imports torch, and without downloading)."""
    path = Path(resolve_model_path(pretrained))
    file = path / "config.json" if path.is_dir() else cached_file(pretrained, "config.json")
    if file is None or not file.is_file():
        raise FileNotFoundError(f"{pretrained!r}: no config.json in the folder or the hub cache")
    return json.loads(file.read_text())


def backbone_geometry(backbone: Mapping[str, Any] | None) -> tuple[int | None, int | None]:
    """``(number of layers/blocks, max positions)`` of the backbone when the config tells (None if not)."""
    if not backbone:
        return None, None
    conf = backbone.get("config")
    if isinstance(conf, Mapping):
        depth = conf.get("num_hidden_layers")
        return (int(depth) if depth is not None else None,
                int(conf.get("max_position_embeddings", 512)) if conf.get("model_type") else None)
    pretrained = backbone.get("pretrained")
    if isinstance(pretrained, str) and pretrained and "tokenizer" in backbone:  # a Hugging Face text encoder
        try:
            hf = _hf_config(pretrained)
        except Exception:  # noqa: BLE001 - the module reports an unloadable backbone itself
            return None, None
        depth, pos = hf.get("num_hidden_layers"), hf.get("max_position_embeddings")
        return (int(depth) if depth is not None else None, int(pos) if pos is not None else None)
    depth = backbone.get("depth")
    if _is_int(depth) and not backbone.get("arch"):
        return int(depth), None
    return None, None


def check_moe(cfg: Any) -> None:
    moe = _get(cfg, "moe")
    if not isinstance(moe, Mapping) or moe.get("router") is None:
        return
    name = moe.get("name", "?")
    layers = moe.get("layers")
    if _is_int(layers):
        layers = [layers]
    depth, _ = backbone_geometry(_get(cfg, "backbone"))
    where = f"distinct integer layer indices in [0, {depth - 1}]" if depth else "distinct integer layer indices >= 0"
    allowed = f"a non-empty list of {where} (moe={name} puts its MoE layers there; moe=dense for no MoE)"
    if not isinstance(layers, (list, tuple)) or not layers:
        _fail("moe.layers", layers, allowed, f"moe={name} with no MoE layer would train the dense model")
    if not all(_is_int(i) for i in layers):
        _fail("moe.layers", list(layers), allowed)
    if len(set(layers)) != len(layers):
        dup = sorted({i for i in layers if list(layers).count(i) > 1})
        _fail("moe.layers", list(layers), allowed, f"layer(s) {dup} repeated")
    bad = [i for i in layers if i < 0 or (depth is not None and i >= depth)]
    if bad:
        _fail("moe.layers", list(layers), allowed,
              f"{bad} outside the backbone's {depth} layers" if depth else f"{bad} negative")
    acc = _get(cfg, "trainer.accumulate_grad_batches", 1)
    if moe.get("aux_loss") == "global_batch" and moe.get("global_batch_mode", "window") == "window" and _is_int(acc) \
            and acc > 1:
        strategy = _get(cfg, "trainer.strategy", None)
        target = strategy.get("_target_") if isinstance(strategy, Mapping) else strategy
        short = str(target).rsplit(".", 1)[-1] if target is not None else "auto"
        if not (short in ("auto", "single_device", "SingleDeviceStrategy", "DDPStrategy") or short.startswith("ddp")):
            _fail("trainer.strategy", target, "auto, single_device or a DDP strategy (ddp, ddp_spawn, "
                  "lightning.pytorch.strategies.DDPStrategy) with moe.aux_loss=global_batch and "
                  f"trainer.accumulate_grad_batches={acc}, or trainer.accumulate_grad_batches=1",
                  "the routing pre-pass that makes the global-batch loss exact under gradient accumulation runs "
                  "the module's own forward, unwrapped")


@runtime_checkable
class ChecksItsConfig(Protocol):
    """A DataModule class with checks of its own, run by :func:`check_data` before anything is built."""

    @staticmethod
    def check_config(cfg: Any) -> None:
        """Raise :class:`ConfigError` naming the key, the value and what is allowed."""


def check_data(cfg: Any) -> None:
    """The data group's own checks: the DataModule class that ``data._target_`` names may be a
    :class:`ChecksItsConfig` (DomainBed: ``data.test_envs``); this module knows no benchmark. The class is
    imported by name, as Hydra will instantiate it (torch: after the torch-free checks)."""
    target = _get(cfg, "data._target_")
    if not isinstance(target, str) or "." not in target:
        return
    module, _, name = target.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return  # instantiating the data group names the bad target itself
    if isinstance(cls, ChecksItsConfig):
        cls.check_config(cfg)


#: the module's loss weights and weight decay: finite numbers >= 0 (learning rates: > 0)
NONNEGATIVE_MODULE_KEYS = ("weight_decay", "block_weight", "z_loss_weight")


def check_module_hparams(module: Mapping[str, Any]) -> None:
    """``module.lr`` and every ``module.*_lr`` (null allowed for the latter): a finite number > 0;
    ``module.weight_decay``, ``module.block_weight``, ``module.z_loss_weight``: a finite number >= 0. The one
    check of these keys: :func:`check_config` runs it on the composed config, :class:`tasks.run.moe_module.MoEModule`
    on its arguments (a module built without the config)."""
    for k, v in module.items():
        if not (k == "lr" or k.endswith("_lr")):
            continue
        if v is None and k != "lr":
            continue
        if not _is_number(v) or not math.isfinite(float(v)) or float(v) <= 0:
            _fail(f"module.{k}", v, "a finite number > 0")
    for k in NONNEGATIVE_MODULE_KEYS:
        v = module.get(k)
        if v is not None and (not _is_number(v) or not math.isfinite(float(v)) or float(v) < 0):
            _fail(f"module.{k}", v, "a finite number >= 0")


def check_learning_rates(cfg: Any) -> None:
    module = _get(cfg, "module")
    if isinstance(module, Mapping):
        check_module_hparams(module)


def check_max_length(cfg: Any) -> None:
    if not _has(cfg, "data.max_length"):
        return
    ml = _get(cfg, "data.max_length")
    _, positions = backbone_geometry(_get(cfg, "backbone"))
    name = _get(cfg, "backbone.name", "?")
    if positions is None:
        return
    if not _is_int(ml) or not 1 <= ml <= positions:
        _fail("data.max_length", ml, f"an integer in [1, {positions}] (backbone {name} has {positions} "
                                     "position embeddings)")


def check_seeds(cfg: Any) -> None:
    for key in ("seed", "data.data_seed", "data.trial_seed"):
        if not _has(cfg, key):
            continue
        v = _get(cfg, key)
        if v is None and key != "seed":
            continue
        if v is None:
            continue  # seed=null: not seeded (allowed by train())
        if not _is_int(v) or not 0 <= v <= SEED_MAX:
            _fail(key, v, f"an integer in [0, {SEED_MAX}]")


def check_wandb(cfg: Any) -> None:
    if not _has(cfg, "logger.wandb") or _get(cfg, "logger.wandb._target_") is None:
        return
    mode = _get(cfg, "logger.wandb.mode")
    if mode not in WANDB_MODES:
        _fail("logger.wandb.mode", mode, "null (auto: online with an API key and a reachable host, else "
                                         "offline) | online | offline | disabled")


FUSION_KEYS = ("ema_decay", "agg", "update_in_eval", "mix_alpha")


def check_fusion(cfg: Any) -> None:
    fusion = _get(cfg, "moe.fusion")
    if fusion is None or fusion is False or not isinstance(fusion, Mapping):
        return  # rmoe.FusionConfig names any other bad value
    missing = [k for k in FUSION_KEYS if k not in fusion and not (k == "ema_decay" and "beta" in fusion)]
    if missing:
        _fail("moe.fusion", dict(fusion), "null, or every key of Stateful Fusion (moe.fusion={ema_decay: 0.99, agg: "
              "sum, update_in_eval: false, mix_alpha: 1.0}, named by a variant, e.g. variant=rmoe_fusion), or a "
              "task whose protocol has fusion on (GLUE: task=glue/rte moe.fusion.ema_decay=0.9)",
              f"missing {', '.join(missing)}: this protocol has fusion off, and +moe.fusion.<key> would switch it on "
              f"with defaults for the rest under the method's own name")


def check_moe_fields(cfg: Any) -> None:
    """The MoE layer's fields (``moe.initial_experts``, ``moe.router``, ...) as :class:`rmoe.MoEConfig` validates them
    when the model is built -- here, before the config is printed and anything is built (imports ``rmoe``)."""
    moe = _get(cfg, "moe")
    if not isinstance(moe, Mapping) or moe.get("router") is None:
        return
    _, _, layer_cfg = split_moe_config(moe, _get(cfg, "backend.name"))
    if layer_cfg is None:
        return
    fields = dict(layer_cfg)
    if fields.get("activation") is None:
        fields["activation"] = "gelu"  # the backbone's own activation is filled in when the model is built
    try:
        MoEConfig.from_dict(fields)
    except ConfigError as e:
        raise ConfigError(str(e).replace("invalid MoE config: ", "invalid config: moe.", 1)) from None


def check_data_root(cfg: Any) -> None:
    """A data folder derived from ``RMOE_DATA_DIR`` when that folder does not exist: name the variable."""
    root = os.environ.get("RMOE_DATA_DIR")
    if not root or os.path.isdir(root):
        return
    for key in ("data.glue_dir", "data.root"):
        value = _get(cfg, key)
        if isinstance(value, str) and os.path.abspath(value).startswith(os.path.abspath(root) + os.sep):
            origin = os.environ.get("RMOE_DATA_DIR_ORIGIN")
            raise ConfigError(
                f"invalid config: RMOE_DATA_DIR={root!r} is not a folder{f' ({origin})' if origin else ''}, and "
                f"{key}={value!r} comes from it; allowed: RMOE_DATA_DIR=<the data folder> (glue/<Task>/*.tsv, "
                f"mnist/MNIST/raw/), e.g. make train RMOE_DATA_DIR=/path/to/data, or {key}=<a folder>")


def check_hub(cfg: Any) -> None:
    try:
        preflight(cfg)
    except HubUnreachable as e:
        raise ConfigError(f"invalid config: {e}") from None


def check_overrides(cfg: Any, overrides: list[str]) -> None:
    """Checks on what the command line set: ``moe.top_k`` for a router that ignores it."""
    keys = {o.split("=", 1)[0].lstrip("+~") for o in overrides if "=" in o}
    router = _get(cfg, "moe.router")
    if "moe.top_k" in keys and isinstance(router, str):
        if router in ROUTERS and not getattr(ROUTERS[router], "uses_top_k", True):
            _fail("moe.top_k", _get(cfg, "moe.top_k"), f"no moe.top_k override with moe.router={router} "
                  f"(moe={_get(cfg, 'moe.name')}); routers that read it: "
                  f"{'|'.join(n for n in ROUTERS.names() if getattr(ROUTERS[n], 'uses_top_k', True))}",
                  f"the {router} router ignores top_k (a token activates as many experts as its gates choose)"
                  if router == "topany" else f"the {router} router ignores top_k (experts choose their tokens)")


def check_variant(cfg: Any) -> None:
    variant, moe = _get(cfg, "variant"), _get(cfg, "moe")
    if not (isinstance(variant, str) and variant.endswith("_released") and isinstance(moe, Mapping)):
        return
    released = moe.get("released") or {}
    if not any(bool(v) for v in released.values()):
        _fail("variant", variant, f"moe={variant} (it switches the released code's behaviours on, SPEC §9) or a "
              "name not ending in _released", "no moe.released switch is on: the run would compute the paper's "
              "equations under the released code's name")


def _protocol_cell(cfg: Any) -> str:
    """The file of the run's protocol cell (``conf/protocol/<benchmark>/<method>.yaml``), for messages; for a method
    without a cell of its own, the baseline cell it is layered over (``protocol@_global_`` in conf/train.yaml)."""
    hc = hydra_runtime()
    if hc is not None:
        choices = hc.runtime.choices
    else:  # composed without Hydra's runtime: the compose API (its hydra node, when returned)
        choices = OmegaConf.select(cfg, "hydra.runtime.choices", default=None) if isinstance(cfg, DictConfig) else None
    choices = choices or {}
    choice, base = choices.get("protocol"), choices.get("protocol@_global_")
    if choice and base and not os.path.isfile(os.path.join(CONF_DIR, "protocol", f"{choice}.yaml")):
        return f"conf/protocol/{base}.yaml (the baselines' cell: {choice} has none of its own)"
    method = _get(cfg, "moe.name", "<method>")
    return f"conf/protocol/{choice or '<benchmark>/' + str(method)}.yaml"


def check_curriculum(cfg: Any) -> None:
    """λ's values have one home, the run's protocol cell; a ``curriculum=<mode>`` option names a schedule shape
    only. A mode whose values the cell does not state is refused here, naming the key, instead of training with
    values from somewhere else (imports ``rmoe.schedules``, hence torch: after the torch-free checks)."""
    if not _has(cfg, "curriculum"):
        return
    cur = OmegaConf.select(cfg, "curriculum") if isinstance(cfg, DictConfig) else _get(cfg, "curriculum")
    if not isinstance(cur, (Mapping, DictConfig)):
        return
    mode = cur.get("mode")
    if mode not in MODE_PARAMS:
        return  # rmoe.build_schedule names the allowed modes when the callback is built
    cell = _protocol_cell(cfg)
    old_names = {new: old for old, new in RENAMED.items()}  # the previous release's names still count
    for key in MODE_PARAMS[mode]:
        if key == "units" or key in cur or old_names.get(key) in cur:
            continue
        raise ConfigError(
            f"invalid config: curriculum.{key} is missing for curriculum.mode={mode} (a curriculum option names a "
            f"schedule shape only; λ's values come from the protocol cell {cell}, which states no {key}); allowed: "
            f"+curriculum.{key}=<value> on the command line, or a mode whose values the cell states")
    if isinstance(cur, DictConfig):  # phased: the phases are written in the cell's lambda_min / lambda_max
        try:
            OmegaConf.to_container(cur, resolve=True)
        except InterpolationKeyError as e:
            missing = re.search(r"key '([^']+)'", str(e))
            key = missing.group(1) if missing else "curriculum.lambda_min"
            raise ConfigError(
                f"invalid config: {key} is missing for curriculum.mode={mode} (the mode's phases are written in the "
                f"cell's values, and the protocol cell {cell} states no {key.rsplit('.', 1)[-1]}); allowed: "
                f"+{key}=<value> on the command line, or a mode whose values the cell states") from None


CHECKS = (check_data_root, check_hub, check_trainer, check_moe, check_fusion, check_data, check_learning_rates,
          check_max_length, check_seeds, check_wandb, check_variant, check_moe_fields, check_curriculum)


def check_config(cfg: Any) -> None:
    """Run every check above on the composed config (see the module docstring)."""
    for check in CHECKS:
        check(cfg)


def check_stages(train_stage: Any, ckpt_path: Any) -> None:
    """``rmoe-train`` trains: ``train=false`` is refused, naming the keys (evaluation is ``rmoe-eval``)."""
    if str(train_stage).lower() not in ("false", "0"):
        return
    if ckpt_path in (None, "", "null"):
        raise ValueError("invalid config: train=false with ckpt_path=null (nothing to train and no checkpoint); "
                         "allowed: train=true; to evaluate a saved model: rmoe-eval ckpt_path=<run>/checkpoints/"
                         "<file>.ckpt")
    raise ValueError(f"invalid config: train=false with ckpt_path={ckpt_path!r} (rmoe-train trains; it does not "
                     f"evaluate a checkpoint); allowed: train=true (ckpt_path then continues that run); to evaluate "
                     f"the checkpoint: rmoe-eval ckpt_path={ckpt_path} (metrics in <run>/eval/)")
