"""One typed, validated configuration object for an MoE layer.

Every knob of a layer lives here once; ``MoEConfig.from_dict`` rejects unknown keys and values
outside their allowed range with a message naming the key, the value and what is allowed. Router,
backend, activation and aux-loss names are checked against the registries of :mod:`rmoe.registry`
(in registration order), and the router/aux-loss/backend compatibility against the traits their
entries carry.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from dataclasses import InitVar, asdict, dataclass, field, fields
from typing import Any

from . import registry
from .errors import ConfigError  # noqa: F401  (re-exported: rmoe.config.ConfigError)

FUSION_AGGS = ("sum", "mean")
DROPOUT_POSITIONS = ("pre_act", "post_act")
GLOBAL_BATCH_MODES = ("window", "megatron")
#: how FFN surgery (:mod:`rmoe.surgery`) fills a new MoE layer's experts from the dense FFN, the default first
EXPERT_INITS = ("upcycle", "split", "random")


def _fail(key: str, value: Any, allowed: str) -> None:
    raise ConfigError(f"invalid MoE config: {key}={value!r}; allowed: {allowed}")


@dataclass(frozen=True)
class FusionConfig:
    """Stateful Fusion (SPEC §4): ``m <- d*m + (1-d)*agg_t score`` with ``d = ema_decay``,
    ``pi = (1+m)/sum(1+m)``. ``beta`` (the previous release's name of ``ema_decay``) is read with a warning."""

    ema_decay: float = 0.99
    agg: str = "sum"
    update_in_eval: bool = False
    mix_alpha: float = 1.0
    beta: InitVar[float | None] = None  # deprecated: ema_decay

    def __post_init__(self, beta: float | None = None) -> None:
        if beta is not None:
            _deprecated("fusion.beta", f"use fusion.ema_decay (the old key's value {beta!r} is used)")
            object.__setattr__(self, "ema_decay", beta)
        if not (isinstance(self.ema_decay, (int, float)) and 0.0 <= self.ema_decay < 1.0):
            _fail("fusion.ema_decay", self.ema_decay, "a number in [0, 1)")
        if self.agg not in FUSION_AGGS:
            _fail("fusion.agg", self.agg, "|".join(FUSION_AGGS))
        if not isinstance(self.update_in_eval, bool):
            _fail("fusion.update_in_eval", self.update_in_eval, "true|false")
        if not (isinstance(self.mix_alpha, (int, float)) and 0.0 <= self.mix_alpha <= 1.0):
            _fail("fusion.mix_alpha", self.mix_alpha, "a number in [0, 1]")

    @classmethod
    def from_any(cls, value: Any) -> FusionConfig | None:
        if value is None or value is False:
            return None
        if isinstance(value, FusionConfig):
            return value
        if not isinstance(value, Mapping):
            _fail("fusion", value, "null or a mapping {ema_decay, agg, update_in_eval, mix_alpha}")
        known = {f.name for f in fields(cls)} | {"beta"}  # beta: the previous release's ema_decay (a warning)
        unknown = sorted(set(value) - known)
        if unknown:
            _fail(f"fusion.{unknown[0]}", value[unknown[0]], f"keys {sorted(known)}")
        return cls(**dict(value))


@dataclass(frozen=True)
class ReleasedConfig:
    """The authors' released code where it differs from the paper's equations (SPEC §9), each off by default:

    * ``fusion_pad_clamp``: Stateful Fusion clamps a token's empty slots (fewer experts than the batch's
      most) to the last slot ``E_max - 1``, whose ``pi`` then enters the token's normalisation, and those
      slots are dispatched to that expert (JingyongYe/R-MoE ``tutel/impls/moe_layer.py``, the ``dw`` branch).
    * ``pool_reads_clamped``: the adaptive pool's recorder reads those clamped indices, so it counts the
      empty slots for ``E_max - 1`` and never sees a token without an expert (same file, ``record_routing``).
    * ``eval_fallback_gate``: in evaluation, when no token of the batch has more than one expert, a token
      that fell back to its top-1 gets the gate ``s_top1`` instead of 1 (``generalized_fast_dispatch.py``
      ``extract_critical`` normalises the gates only when the batch's most experts per token is > 1).
    * ``upcycle_bias_split``: upcycling sets each expert's second bias to ``b2 / E_max`` (top-any) or
      ``b2 / k`` (fixed-k routers) (``RMoE/Language/moe_utils.py``, the GLUE code).
    * ``route_padding``: padding tokens are routed through the MoE layer like real tokens (the GLUE code
      replaces the FFN of every position), so they enter fusion, the pool counts and the losses.
    """

    fusion_pad_clamp: bool = False
    pool_reads_clamped: bool = False
    eval_fallback_gate: bool = False
    upcycle_bias_split: bool = False
    route_padding: bool = False

    def __post_init__(self) -> None:
        for f in fields(self):
            if not isinstance(getattr(self, f.name), bool):
                _fail(f"released.{f.name}", getattr(self, f.name), "true|false")
        if self.pool_reads_clamped and not self.fusion_pad_clamp:
            _fail("released.pool_reads_clamped", True, "false unless released.fusion_pad_clamp=true (the released "
                  "recorder reads the indices the fusion branch clamped)")

    @property
    def any(self) -> bool:
        return any(getattr(self, f.name) for f in fields(self))

    @classmethod
    def from_any(cls, value: Any) -> ReleasedConfig:
        if value is None:
            return cls()
        if isinstance(value, ReleasedConfig):
            return value
        if not isinstance(value, Mapping):
            _fail("released", value, "null or a mapping of " + ", ".join(f.name for f in fields(cls)))
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            _fail(f"released.{unknown[0]}", value[unknown[0]], f"keys {sorted(known)}")
        return cls(**dict(value))


class ConfigDeprecationWarning(FutureWarning):
    """A configuration key of an earlier release, still read for one release (shown by default, unlike
    ``DeprecationWarning``); the message names the old key and its new home."""


def _deprecated(old: str, new: str) -> None:
    warnings.warn(f"MoE config key {old!r} is deprecated: {new}; the old key is read until the next release",
                  ConfigDeprecationWarning, stacklevel=4)


def renamed(owner: str, old: str, new: str) -> None:
    """The warning of an attribute renamed in this release (``owner.old`` -> ``owner.new``)."""
    warnings.warn(f"{owner}.{old} is deprecated: use {owner}.{new}; the old name is read until the next release",
                  ConfigDeprecationWarning, stacklevel=3)


@dataclass(frozen=True)
class RouterOptions:
    """A router's own settings (``router_options`` of :class:`MoEConfig`): a router class names its subclass as
    ``Options`` (e.g. :class:`rmoe.routing.LossFreeOptions`), a frozen dataclass whose ``__post_init__``
    validates its fields with :meth:`fail`. A router without settings keeps this empty base."""

    def fail(self, key: str, allowed: str) -> None:
        _fail(f"router_options.{key}", getattr(self, key), allowed)

    @classmethod
    def from_any(cls, value: Any, router: str) -> RouterOptions:
        if value is None:
            return cls()
        if isinstance(value, RouterOptions):
            if type(value) is not cls:
                _fail("router_options", value, f"{cls.__name__} (the settings of router {router!r}) or a mapping")
            return value
        if not isinstance(value, Mapping):
            _fail("router_options", value, "null or a mapping of the router's settings")
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(value) - set(known))
        if unknown:
            _fail(f"router_options.{unknown[0]}", value[unknown[0]],
                  f"keys {known} for router {router!r}" if known else f"no keys (router {router!r} has no settings)")
        return cls(**dict(value))


#: keys of the previous release read under their new name (with a :class:`ConfigDeprecationWarning`): old -> new
RENAMED_KEYS = {"num_experts": "initial_experts", "fusion.beta": "fusion.ema_decay"}

#: flat keys of the previous release that are now a router's own settings: old key -> (router, option)
MOVED_TO_ROUTER_OPTIONS = {
    "score_fn": ("lossfree", "score_fn"),
    "bias_update_rate": ("lossfree", "bias_update_rate"),
    "cosine_proj_dim": ("cosine", "proj_dim"),
    "cosine_init_temperature": ("cosine", "init_temperature"),
}


@dataclass(frozen=True)
class MoEConfig:
    """Configuration of one MoE layer.

    ``initial_experts`` experts are active at start; ``max_experts`` slots exist (only top-any grows
    into them, other routers use ``max_experts == initial_experts``; ``num_experts``, the previous release's name of
    ``initial_experts``, is read with a warning). ``capacity_factor == 0`` is
    dropless; ``batch_prioritized_routing`` fills a finite capacity in descending order of each
    token's top-1 probability (tutel's BPR) instead of token order. ``aux_loss`` defaults per router
    (its ``default_aux_loss``: topk/cosine -> switch, topany -> dynmoe). ``expert_dropout`` is
    dropout inside every expert, on the hidden units before (``pre_act``, DynMoE's GLUE experts) or
    after (``post_act``, GMoE's vision experts) the activation. ``router_options``: the router's own
    settings (a mapping, validated by the router's ``Options`` dataclass: ``cosine`` takes ``proj_dim`` and
    ``init_temperature``, ``lossfree`` ``score_fn`` and ``bias_update_rate``; the flat keys of the previous
    release, :data:`MOVED_TO_ROUTER_OPTIONS`, are read by :meth:`from_dict` with a
    :class:`ConfigDeprecationWarning`). ``released``: the authors' released code's behaviours
    (:class:`ReleasedConfig`, all off: the paper's equations). ``causal``: the layer sits in a causal (decoder)
    model, where a token's routing may not depend on later tokens (``expert_choice`` refuses it).
    ``global_batch_mode`` (read by the ``global_batch`` loss): ``window`` takes ``f_e`` over the optimizer
    step's whole global batch (the routing pre-pass under accumulation) and weighs ranks so that DDP's
    mean is the full-batch gradient; ``megatron`` is Megatron-Core's rule (running mean of the
    micro-batches' global counts so far, per-rank loss without the rank factor; SPEC §2).
    A router class can add its own checks (``Router.check_config``).
    """

    router: str = "topk"
    initial_experts: int = 8
    max_experts: int | None = None
    top_k: int = 2
    capacity_factor: float = 0.0
    batch_prioritized_routing: bool = False
    gate_noise: float = 0.0
    normalize_gate: bool = True
    fusion: FusionConfig | None = None
    backend: str = "torch"
    aux_loss: str | None = None
    activation: str = "gelu"
    bias: bool = True
    upcycle_noise: float = 0.0
    expert_dropout: float = 0.0
    expert_dropout_position: str = "pre_act"
    causal: bool = False
    global_batch_mode: str = "window"
    released: ReleasedConfig = field(default_factory=ReleasedConfig)
    router_options: Any = None
    num_experts: InitVar[int | None] = None  # deprecated: initial_experts (RENAMED_KEYS)

    def __post_init__(self, num_experts: int | None = None) -> None:
        if num_experts is not None:
            _deprecated("num_experts", f"use initial_experts (the old key's value {num_experts!r} is used)")
            object.__setattr__(self, "initial_experts", num_experts)
        if self.router not in registry.ROUTERS:
            _fail("router", self.router, "|".join(registry.ROUTERS.names()))
        if self.backend not in registry.BACKENDS:
            _fail("backend", self.backend, "|".join(registry.BACKENDS.names()))
        router = registry.ROUTERS[self.router]
        self._check_pool(router)
        self._check_capacity(router, registry.BACKENDS[self.backend])
        self._check_aux_loss(router)
        self._check_experts()
        self._check_released(router)
        object.__setattr__(self, "router_options", router.Options.from_any(self.router_options, self.router))
        check = getattr(router, "check_config", None)
        if check is not None:
            check(self, _fail)

    def _check_pool(self, router: type) -> None:
        """``initial_experts`` / ``max_experts`` / ``top_k``; fills ``max_experts`` (null: ``initial_experts``)."""
        if not (isinstance(self.initial_experts, int) and self.initial_experts >= 1):
            _fail("initial_experts", self.initial_experts, "an integer >= 1")
        max_e = self.initial_experts if self.max_experts is None else self.max_experts
        if not (isinstance(max_e, int) and max_e >= 1):
            _fail("max_experts", self.max_experts, "an integer >= 1 or null")
        if self.initial_experts > max_e:
            _fail("initial_experts", self.initial_experts, f"<= max_experts ({max_e})")
        if not router.adaptive_pool and max_e != self.initial_experts:
            routers = registry.ROUTERS
            adaptive = "|".join(n for n in routers.names() if routers[n].adaptive_pool) or "no router"
            _fail("max_experts", self.max_experts,
                  f"equal to initial_experts ({self.initial_experts}) for router {self.router!r}; "
                  f"only {adaptive} has an adaptive pool")
        object.__setattr__(self, "max_experts", max_e)
        if not (isinstance(self.top_k, int) and self.top_k >= 1):
            _fail("top_k", self.top_k, "an integer >= 1")
        if router.uses_top_k and self.top_k > self.initial_experts:
            _fail("top_k", self.top_k, f"<= initial_experts ({self.initial_experts})")

    def _check_capacity(self, router: type, backend: type) -> None:
        """``capacity_factor``, ``batch_prioritized_routing``, ``gate_noise`` against the router and backend."""
        cf = self.capacity_factor
        if not (isinstance(cf, (int, float)) and math.isfinite(cf) and cf >= 0):
            _fail("capacity_factor", cf, "a number >= 0 (0 = dropless)")
        if cf > 0 and router.dropless:
            _fail("capacity_factor", cf, f"0 for router {self.router!r} (it is dropless)")
        if cf > 0 and not backend.supports_capacity:
            _fail("capacity_factor", cf, f"0 for backend {self.backend!r} (dropless)")
        if not isinstance(self.batch_prioritized_routing, bool):
            _fail("batch_prioritized_routing", self.batch_prioritized_routing, "true|false")
        if self.batch_prioritized_routing and router.dropless:
            _fail("batch_prioritized_routing", True, f"false for router {self.router!r} (it is dropless)")
        gn = self.gate_noise
        if not (isinstance(gn, (int, float)) and math.isfinite(gn) and gn >= 0):
            _fail("gate_noise", gn, "a number >= 0")

    def _check_aux_loss(self, router: type) -> None:
        """``aux_loss`` (null: the router's default) fits the router's family and noise; ``global_batch_mode``."""
        aux_losses = registry.AUX_LOSSES
        aux = self.aux_loss if self.aux_loss is not None else router.default_aux_loss
        if aux not in aux_losses:
            _fail("aux_loss", self.aux_loss, "|".join(aux_losses.names()) + " or null (router default)")
        if aux_losses[aux].needs_noise and self.gate_noise <= 0:
            _fail("gate_noise", self.gate_noise, f"> 0 when aux_loss={aux!r} (it needs noise)")
        if not aux_losses[aux].fits(router.family):
            _fail("aux_loss", aux, "|".join(n for n in aux_losses.names() if aux_losses[n].fits(router.family))
                  + f" for router {self.router!r}")
        object.__setattr__(self, "aux_loss", aux)
        if self.global_batch_mode not in GLOBAL_BATCH_MODES:
            _fail("global_batch_mode", self.global_batch_mode, "|".join(GLOBAL_BATCH_MODES))

    def _check_experts(self) -> None:
        """The experts' own fields: activation, upcycling noise, dropout; and ``causal``."""
        if self.activation not in registry.ACTIVATIONS:
            _fail("activation", self.activation, "|".join(registry.ACTIVATIONS.names()))
        if not (self.upcycle_noise >= 0):
            _fail("upcycle_noise", self.upcycle_noise, "a number >= 0")
        p = self.expert_dropout
        if not (isinstance(p, (int, float)) and not isinstance(p, bool) and 0.0 <= p < 1.0):
            _fail("expert_dropout", p, "a number in [0, 1)")
        if self.expert_dropout_position not in DROPOUT_POSITIONS:
            _fail("expert_dropout_position", self.expert_dropout_position, "|".join(DROPOUT_POSITIONS))
        if not isinstance(self.causal, bool):
            _fail("causal", self.causal, "true|false")

    def _check_released(self, router: type) -> None:
        """``fusion`` and ``released`` from their mappings, and the released behaviours the router can have."""
        object.__setattr__(self, "fusion", FusionConfig.from_any(self.fusion))
        rel = ReleasedConfig.from_any(self.released)
        object.__setattr__(self, "released", rel)
        if rel.fusion_pad_clamp and self.fusion is None:
            _fail("released.fusion_pad_clamp", True, "false when fusion is null (the clamp is in the fusion branch)")
        for key in ("fusion_pad_clamp", "eval_fallback_gate"):
            if getattr(rel, key) and router.family != "topany":
                _fail(f"released.{key}", True, f"false for router {self.router!r} (a top-any behaviour)")

    @classmethod
    def from_dict(cls, cfg: Mapping[str, Any]) -> MoEConfig:
        cfg = _read_moved_keys(dict(cfg))
        if cfg.get("num_experts", 0) is None:
            del cfg["num_experts"]  # the previous release's key, unset (rmoe-train's moe group states it null)
        known = {f.name for f in fields(cls)} | {"num_experts"}
        unknown = sorted(set(cfg) - known)
        if unknown:
            _fail(unknown[0], cfg[unknown[0]], f"keys {sorted(known)}")
        return cls(**cfg)

    def to_dict(self) -> dict:
        return asdict(self)


def _read_moved_keys(cfg: dict) -> dict:
    """The previous release's keys (:data:`MOVED_TO_ROUTER_OPTIONS`, the never-read ``extra``), each with a
    :class:`ConfigDeprecationWarning`: a router's own key goes to ``router_options`` for that router (over the value
    there: e.g. ``+moe.score_fn=softmax`` on ``moe=lossfree``, whose file states ``router_options.score_fn``) and is
    dropped for any other (which never read it)."""
    if "extra" in cfg:
        extra = cfg.pop("extra")
        if extra:
            _fail("extra", extra, "absent (a key that nothing read, removed)")
        _deprecated("extra", "it was never read; remove it")
    router = cfg.get("router", MoEConfig.router)
    for old, (owner, new) in MOVED_TO_ROUTER_OPTIONS.items():
        if old not in cfg:
            continue
        value = cfg.pop(old)
        if router != owner:
            _deprecated(old, f"it is router {owner!r}'s router_options.{new} (ignored for router {router!r})")
            continue
        _deprecated(old, f"use router_options.{new} (the old key's value {value!r} is used)")
        opts = cfg.get("router_options")
        opts = {} if opts is None else opts
        if not isinstance(opts, Mapping):
            _fail("router_options", opts, "a mapping when the deprecated key " + repr(old) + " is given")
        cfg["router_options"] = {**opts, new: value}  # the old key set on top of a config stating the new one wins
    return cfg
