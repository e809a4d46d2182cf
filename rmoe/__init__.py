"""rmoe: the regulated mixture-of-experts layer library (pure PyTorch).

Public contract::

    from rmoe import build_moe_layer
    layer = build_moe_layer(d_model, d_ff, router="topk", num_experts=8, top_k=2)
    y, r = layer(x, mask=None)   # r: RoutingRecord
"""

from .config import ConfigError, FusionConfig, MoEConfig, ReleasedConfig
from .experts import Experts, TorchDroplessBackend
from .fusion import StatefulFusion, fused_weights, fusion_pi
from .layer import MoELayer, build_moe_layer
from .losses import AuxInputs, AuxLoss, register_aux_loss
from .megablocks import MegaBlocksBackend
from .registry import ACTIVATIONS, AUX_LOSSES, BACKENDS, ROUTERS, Registry
from .routing import (
    CosineRouter,
    ExpertChoiceRouter,
    LossFreeRouter,
    Router,
    RoutingRecord,
    TopAnyRouter,
    TopKRouter,
    build_router,
)
from .schedules import build_schedule
from .surgery import find_moe_layers, moe_losses, moefy_bert, moefy_vit

__all__ = [
    "ACTIVATIONS", "AUX_LOSSES", "BACKENDS", "ROUTERS", "Registry", "AuxInputs", "AuxLoss", "register_aux_loss",
    "ConfigError", "FusionConfig", "MoEConfig", "ReleasedConfig", "Experts", "MegaBlocksBackend",
    "TorchDroplessBackend",
    "StatefulFusion", "fused_weights", "fusion_pi", "MoELayer", "build_moe_layer", "CosineRouter", "ExpertChoiceRouter",
    "LossFreeRouter", "Router",
    "RoutingRecord", "TopAnyRouter", "TopKRouter", "build_router", "build_schedule", "find_moe_layers",
    "moe_losses", "moefy_bert", "moefy_vit",
]
