"""The DomainBed backbone: a timm VisionTransformer with MoE layers at chosen blocks.

``backbone`` config (``conf/backbone/vit_*.yaml``):

* ``arch`` set (e.g. ``deit_small_patch16_224``, the paper's DeiT-S/16): ``timm.create_model(arch, num_classes,
  in_chans, img_size)``; ImageNet weights from ``weights_path`` (a ``.pth``/``.pt``/``.bin`` state dict,
  optionally under ``model``/``state_dict``, or ``.safetensors``; the classifier head is dropped)
  or, when ``pretrained`` and no path, from timm's hub (needs network or a cache): the default weights of
  ``arch`` (:func:`weights_source` names them; the run log says which).
* ``arch`` null: a small ``VisionTransformer`` from scratch with ``embed_dim``, ``depth``,
  ``num_heads``, ``mlp_ratio`` and ``patch_size`` (null: 2 for images of <= 16 px, else 4).

The ``moe`` group's ``layers`` (block indices) are made MoE by :func:`rmoe.moefy_vit`
(``init: upcycle`` copies each block's MLP into every expert).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import timm
import torch
from safetensors.torch import load_file
from timm.models import get_pretrained_cfg
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn
from torch import nn

from rmoe import MoELayer, moefy_vit
from tasks.run.common import split_moe_config

log = logging.getLogger(__name__)

HEAD_KEYS = ("head.weight", "head.bias", "head_dist.weight", "head_dist.bias", "fc_norm.weight", "fc_norm.bias")


def _load_state_dict(path: str) -> dict[str, torch.Tensor]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"backbone.weights_path={path!r} does not exist")
    if path.endswith(".safetensors"):
        sd = load_file(path)
    else:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("model", "state_dict", "model_state_dict"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    if not isinstance(sd, dict):
        raise ValueError(f"backbone.weights_path={path!r} holds a {type(sd).__name__}, not a state dict")
    return sd


def load_vit_weights(model: nn.Module, path: str) -> None:
    """Load a pretrained ViT state dict into ``model`` (classifier head excluded; position
    embeddings resized by timm's filter). Any other missing or unexpected key is an error."""
    sd = _load_state_dict(path)
    sd = {k: v for k, v in sd.items() if k not in HEAD_KEYS}
    sd = checkpoint_filter_fn(sd, model)
    sd = {k: v for k, v in sd.items() if not k.startswith("head")}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.startswith("head") and k not in HEAD_KEYS]
    if missing or unexpected:
        raise ValueError(f"backbone.weights_path={path!r} does not fit the ViT: missing {missing[:8]}, "
                         f"unexpected {list(unexpected)[:8]}")


def weights_source(backbone: Mapping[str, Any]) -> str | None:
    """Where :func:`build_vit` takes the pretrained weights from: ``"file <weights_path>"``, ``"hub <id>"`` (timm's
    hub id of ``arch``'s default weights, e.g. ``timm/deit_small_patch16_224.fb_in1k``), or None (random init).
    Reads timm's model registry only (no download)."""
    arch = backbone.get("arch")
    if not arch:
        return None
    if backbone.get("weights_path"):
        return f"file {backbone['weights_path']}"
    if not backbone.get("pretrained"):
        return None
    cfg = get_pretrained_cfg(str(arch))
    return f"hub {cfg.hf_hub_id or cfg.url}" if cfg is not None else f"hub {arch}"


def build_vit(backbone: Mapping[str, Any], input_shape: Sequence[int], num_classes: int) -> nn.Module:
    in_chans, height, width = (int(v) for v in input_shape)
    if height != width:
        raise ValueError(f"input_shape={list(input_shape)}: square images expected")
    arch = backbone.get("arch")
    if arch:
        weights_path = backbone.get("weights_path")
        hub = bool(backbone.get("pretrained")) and not weights_path
        log.info("backbone %s (%s): weights from %s", backbone.get("name"), arch,
                 weights_source(backbone) or "nowhere (random initialisation)")
        model = timm.create_model(arch, pretrained=hub, num_classes=num_classes, in_chans=in_chans,
                                  img_size=height, drop_path_rate=float(backbone.get("drop_path_rate", 0.0) or 0.0))
        if weights_path:
            load_vit_weights(model, str(weights_path))
        return model
    patch = backbone.get("patch_size") or (2 if height <= 16 else 4)
    if height % patch:
        raise ValueError(f"backbone.patch_size={patch} does not divide the image size {height}")
    return VisionTransformer(img_size=height, patch_size=patch, in_chans=in_chans, num_classes=num_classes,
                             embed_dim=int(backbone["embed_dim"]), depth=int(backbone["depth"]),
                             num_heads=int(backbone["num_heads"]), mlp_ratio=float(backbone.get("mlp_ratio", 4.0)),
                             drop_path_rate=float(backbone.get("drop_path_rate", 0.0) or 0.0))


def build_moe_vit(backbone: Mapping[str, Any], moe: Mapping[str, Any] | None, input_shape: Sequence[int],
                  num_classes: int, backend: str | None = None) -> tuple[nn.Module, list[MoELayer]]:
    """The ViT and its MoE layers (empty for the dense model: ``moe.router`` null or no layers)."""
    model = build_vit(backbone, input_shape, num_classes)
    layers, init, layer_cfg = split_moe_config(moe, backend)
    moe_layers = moefy_vit(model, layers, layer_cfg, init=init) if layer_cfg is not None else []
    return model, moe_layers
