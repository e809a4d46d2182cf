"""Replace the FFN of chosen layers of pretrained encoders by MoE layers, keeping the weights.

* Hugging Face BERT-family encoders (BERT, RoBERTa, ELECTRA, MiniLM, ...): every module with
  ``.intermediate.dense`` and ``.output.dense`` is an encoder layer; its FFN becomes an MoE layer.
  The attention mask given to the model is passed on so padding tokens are not routed.
* timm VisionTransformer: ``blocks[i].mlp`` (``fc1``/``fc2``) becomes an MoE layer.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .config import EXPERT_INITS, MoEConfig
from .layer import MoELayer

_HF_ACTS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu",
            "silu": "silu", "swish": "silu"}


class TokenMask:
    """Holds the current attention mask of a wrapped model, shared by its MoE adapters."""

    def __init__(self) -> None:
        self.mask: Tensor | None = None


class BertMoEFFN(nn.Module):
    """Stands where ``BertLayer.intermediate`` stood; returns the MoE output (``d_model``).
    ``BertLayer.output.dense`` becomes Identity so dropout + LayerNorm(residual) still apply."""

    def __init__(self, moe: MoELayer, token_mask: TokenMask):
        super().__init__()
        self.moe = moe
        self._token_mask = token_mask

    def forward(self, hidden_states: Tensor) -> Tensor:
        mask = self._token_mask.mask
        if mask is not None and mask.shape != hidden_states.shape[:-1]:
            mask = None
        y, _ = self.moe(hidden_states, mask=mask)
        return y


class ViTMoEMLP(nn.Module):
    """Stands where a timm ``Block.mlp`` stood."""

    def __init__(self, moe: MoELayer):
        super().__init__()
        self.moe = moe

    def forward(self, x: Tensor) -> Tensor:
        y, _ = self.moe(x)
        return y


def _init_moe(moe: MoELayer, fc1: nn.Linear, fc2: nn.Linear, init: str) -> MoELayer:
    if init == "upcycle":
        return moe.upcycle_from(fc1, fc2)
    if init == "split":
        return moe.split_from(fc1, fc2)
    if init == "random":
        return moe
    raise ValueError(f"invalid MoE init={init!r}; allowed: {'|'.join(EXPERT_INITS)}")


def _bert_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules()
            if hasattr(m, "intermediate") and hasattr(m.intermediate, "dense")
            and hasattr(m, "output") and hasattr(m.output, "dense")]


def _check_indices(kind: str, indices: Sequence[int], n: int) -> list[int]:
    out = []
    for i in indices:
        if not isinstance(i, int) or not (-n <= i < n):
            raise ValueError(f"invalid moe.layers entry {i!r} for a {kind} with {n} layers; "
                             f"allowed: integers in [0, {n - 1}] (or negative from the end)")
        out.append(i % n)
    return out


def _expert_width(d_ff: int, cfg: MoEConfig, init: str) -> int:
    if init != "split":
        return d_ff
    if d_ff % cfg.max_experts:
        raise ValueError(f"init=split needs d_ff ({d_ff}) divisible by max_experts ({cfg.max_experts})")
    return d_ff // cfg.max_experts


def moefy_bert(model: nn.Module, layers: Iterable[int], moe_cfg: Mapping[str, Any] | MoEConfig,
               init: str = EXPERT_INITS[0]) -> list[MoELayer]:
    """Replace the FFN of encoder layers ``layers`` of a HF BERT-family model by MoE layers.

    The activation is taken from ``model.config.hidden_act`` unless ``moe_cfg`` sets one. A model
    whose config says ``is_decoder`` (causal self-attention) gets ``causal=True``, which routers that
    look at later tokens (``expert_choice``) refuse. Returns the new MoE layers in layer order.
    """
    enc_layers = _bert_layers(model)
    if not enc_layers:
        raise ValueError(f"{type(model).__name__} has no BERT-style encoder layers (.intermediate/.output)")
    idx = _check_indices("BERT encoder", list(layers), len(enc_layers))
    cfg_dict = dict(moe_cfg.to_dict()) if isinstance(moe_cfg, MoEConfig) else dict(moe_cfg)
    if "activation" not in cfg_dict or cfg_dict["activation"] is None:
        act = getattr(getattr(model, "config", None), "hidden_act", "gelu")
        if act not in _HF_ACTS:
            raise ValueError(f"hidden_act={act!r} is not supported by MoE experts; allowed: {sorted(_HF_ACTS)}")
        cfg_dict["activation"] = _HF_ACTS[act]
    if getattr(getattr(model, "config", None), "is_decoder", False):
        cfg_dict["causal"] = True
    cfg = MoEConfig.from_dict(cfg_dict)
    token_mask = getattr(model, "_rmoe_token_mask", None)
    if token_mask is None:
        token_mask = TokenMask()
        model._rmoe_token_mask = token_mask
        model.register_forward_pre_hook(_capture_attention_mask, with_kwargs=True)
    new = []
    for i in sorted(idx):
        lay = enc_layers[i]
        fc1, fc2 = lay.intermediate.dense, lay.output.dense
        d_model, d_ff = fc1.in_features, fc1.out_features
        moe = MoELayer(d_model, _expert_width(d_ff, cfg, init), cfg).to(fc1.weight.device)
        _init_moe(moe, fc1, fc2, init)
        lay.intermediate = BertMoEFFN(moe, token_mask)
        lay.output.dense = nn.Identity()
        new.append(moe)
    return new


def _capture_attention_mask(module: nn.Module, args: tuple, kwargs: dict):
    mask = kwargs.get("attention_mask")
    if mask is None and len(args) > 1 and isinstance(args[1], Tensor):
        mask = args[1]
    module._rmoe_token_mask.mask = None if mask is None or mask.dim() != 2 else mask.bool()
    return None


def moefy_vit(model: nn.Module, blocks: Iterable[int], moe_cfg: Mapping[str, Any] | MoEConfig,
              init: str = EXPERT_INITS[0]) -> list[MoELayer]:
    """Replace ``model.blocks[i].mlp`` of a timm VisionTransformer by MoE layers."""
    if not hasattr(model, "blocks"):
        raise ValueError(f"{type(model).__name__} has no .blocks; expected a timm VisionTransformer")
    idx = _check_indices("ViT", list(blocks), len(model.blocks))
    cfg_dict = dict(moe_cfg.to_dict()) if isinstance(moe_cfg, MoEConfig) else dict(moe_cfg)
    if cfg_dict.get("activation") is None:
        cfg_dict["activation"] = "gelu"
    cfg = MoEConfig.from_dict(cfg_dict)
    new = []
    for i in sorted(idx):
        mlp = model.blocks[i].mlp
        if not isinstance(getattr(mlp, "norm", nn.Identity()), nn.Identity):
            raise ValueError(f"block {i}: MLPs with an inner norm cannot be upcycled")
        fc1, fc2 = mlp.fc1, mlp.fc2
        moe = MoELayer(fc1.in_features, _expert_width(fc1.out_features, cfg, init), cfg).to(fc1.weight.device)
        _init_moe(moe, fc1, fc2, init)
        model.blocks[i].mlp = ViTMoEMLP(moe)
        new.append(moe)
    return new


def find_moe_layers(model: nn.Module) -> list[tuple[str, MoELayer]]:
    """``(name, layer)`` for every MoE layer in ``model``, in module order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, MoELayer)]


def moe_losses(model: nn.Module) -> tuple[Tensor, Tensor]:
    """Sums of ``aux_loss`` and ``z_loss`` over the last forward of every MoE layer."""
    aux, z = [], []
    for _, m in find_moe_layers(model):
        if m.last_routing is not None:
            aux.append(m.last_routing.aux_loss)
            z.append(m.last_routing.z_loss)
    if not aux:
        p = next(model.parameters(), None)
        zero = torch.zeros((), device=p.device if p is not None else None)
        return zero, zero
    return torch.stack(aux).sum(), torch.stack(z).sum()
