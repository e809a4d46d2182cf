"""rmoe: the regulated mixture-of-experts layer library (pure PyTorch).

Public contract::

    from rmoe import build_moe_layer
    layer = build_moe_layer(d_model, d_ff, router="topk", initial_experts=8, top_k=2)
    y, r = layer(x, mask=None)   # r: RoutingRecord
"""

import importlib

from .errors import ConfigError  # torch-free: the command line's config checks raise it before torch is imported

#: The public names and the submodule each comes from. The package imports them on first use (PEP 562), all at
#: once -- importing a submodule registers its routers, losses and backends -- so that ``rmoe.errors`` (and
#: ``import rmoe`` itself) stays free of torch for the command line's fast paths.
_EXPORTS = {
    "config": ("FusionConfig", "MoEConfig", "ReleasedConfig"),
    "experts": ("Experts", "TorchDroplessBackend"),
    "fusion": ("StatefulFusion", "fused_weights", "fusion_pi"),
    "layer": ("MoELayer", "build_moe_layer"),
    "losses": ("AuxInputs", "AuxLoss", "register_aux_loss"),
    "megablocks": ("MegaBlocksBackend",),
    "registry": ("ACTIVATIONS", "AUX_LOSSES", "BACKENDS", "ROUTERS", "Registry"),
    "routing": ("CosineRouter", "ExpertChoiceRouter", "LossFreeRouter", "Router", "RoutingRecord", "TopAnyRouter",
                "TopKRouter", "build_router"),
    "schedules": ("build_schedule",),
    "surgery": ("find_moe_layers", "moe_losses", "moefy_bert", "moefy_vit"),
}

__all__ = ["ConfigError", *(name for names in _EXPORTS.values() for name in names)]


def __getattr__(name: str):
    if name not in __all__:
        raise AttributeError(f"module 'rmoe' has no attribute {name!r}")
    for module, names in _EXPORTS.items():  # every submodule: their registrations are the library's contract
        mod = importlib.import_module(f"{__name__}.{module}")
        globals().update({n: getattr(mod, n) for n in names})
    return globals()[name]


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
