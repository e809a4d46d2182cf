"""Expert FFNs and the backends that run them on a routing decision.

Parameters (shared by every backend, so checkpoints move between them):
``w1 [E, d, d_ff]``, ``b1 [E, d_ff]``, ``w2 [E, d_ff, d]``, ``b2 [E, d]``;
expert ``e`` computes ``act(x @ w1[e] + b1[e]) @ w2[e] + b2[e]``.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ACTIVATION_FNS: dict[str, Callable[[Tensor], Tensor]] = {
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
}


class Experts(nn.Module):
    """``E`` two-layer FFN experts held as 3-D weights."""

    def __init__(self, num_experts: int, d_model: int, d_ff: int, activation: str = "gelu", bias: bool = True):
        super().__init__()
        self.num_experts, self.d_model, self.d_ff = num_experts, d_model, d_ff
        self.activation = activation
        self.act = ACTIVATION_FNS[activation]
        self.w1 = nn.Parameter(torch.empty(num_experts, d_model, d_ff))
        self.w2 = nn.Parameter(torch.empty(num_experts, d_ff, d_model))
        self.b1 = nn.Parameter(torch.zeros(num_experts, d_ff)) if bias else None
        self.b2 = nn.Parameter(torch.zeros(num_experts, d_model)) if bias else None
        nn.init.normal_(self.w1, std=1.0 / math.sqrt(d_model))
        nn.init.normal_(self.w2, std=1.0 / math.sqrt(d_ff))

    def expert_forward(self, e: int, x: Tensor) -> Tensor:
        """One expert on ``x [n, d]`` (reference implementation, used by tests and loops)."""
        h = x @ self.w1[e]
        if self.b1 is not None:
            h = h + self.b1[e]
        y = self.act(h) @ self.w2[e]
        return y + self.b2[e] if self.b2 is not None else y


def sort_by_expert(indices: Tensor, num_experts: int) -> tuple[Tensor, Tensor, Tensor]:
    """Order the non-empty (token, slot) assignments by expert.

    Returns ``slot_ids`` (flat positions into ``[N*K]``, grouped by expert, token order inside a
    group), ``token_ids`` (``slot_ids // K``) and ``counts [E]``.
    """
    k = indices.shape[1]
    flat = indices.reshape(-1)
    # empty slots (−1) sort to the end under key E; one stable sort, no N×E tensor
    key = torch.where(flat >= 0, flat, torch.full_like(flat, num_experts))
    order = torch.sort(key, stable=True).indices
    counts = torch.bincount(key, minlength=num_experts + 1)
    n_valid = int(flat.numel() - counts[num_experts])
    slot_ids = order[:n_valid]
    return slot_ids, torch.div(slot_ids, k, rounding_mode="floor"), counts[:num_experts]


class TorchDroplessBackend(nn.Module):
    """Dropless experts in plain PyTorch: gather tokens sorted by expert, one matmul pair per
    expert group (weights taken with ``unbind`` so backward writes no full-size gradients per
    expert), scale by the combine weight, scatter-add back. No per-token Python, no N×E×C tensor.
    """

    def forward(self, experts: Experts, x: Tensor, indices: Tensor, weights: Tensor) -> Tensor:
        n, d = x.shape
        slot_ids, token_ids, counts = sort_by_expert(indices, experts.num_experts)
        xs = x.index_select(0, token_ids)
        w1s, w2s = experts.w1.unbind(0), experts.w2.unbind(0)
        b1s = experts.b1.unbind(0) if experts.b1 is not None else None
        b2s = experts.b2.unbind(0) if experts.b2 is not None else None
        outs = []
        for e, chunk in enumerate(torch.split(xs, counts.tolist())):
            if chunk.shape[0] == 0:
                continue
            h = torch.addmm(b1s[e], chunk, w1s[e]) if b1s is not None else chunk @ w1s[e]
            h = experts.act(h)
            outs.append(torch.addmm(b2s[e], h, w2s[e]) if b2s is not None else h @ w2s[e])
        out = torch.zeros_like(x)
        if not outs:
            return out
        ys = torch.cat(outs) * weights.reshape(-1).index_select(0, slot_ids).to(x.dtype).unsqueeze(-1)
        return out.index_add(0, token_ids, ys)


class MegaBlocksBackend(nn.Module):
    """Feeds our routing decision to MegaBlocks' dropless grouped path (GPU only).

    Uses ``megablocks.ops`` to permute tokens by expert and ``grouped_gemm`` for the expert
    matmuls, on our own parameters (same layout as the torch backend). MegaBlocks' router and its
    module-level load-balancing lists are not used.
    """

    def __init__(self) -> None:
        super().__init__()
        self._mods = None

    @staticmethod
    def check_available() -> tuple:
        if not torch.cuda.is_available():
            raise RuntimeError("backend='megablocks' needs a CUDA device; none is available. "
                               "Use backend=torch on CPU (same parameters, same results).")
        try:
            ops = importlib.import_module("megablocks.ops")
            gg = importlib.import_module("grouped_gemm.ops")
        except ImportError as exc:  # pragma: no cover - depends on the GPU extra
            raise RuntimeError("backend='megablocks' needs the optional GPU extra: "
                               "pip install -e '.[megablocks]' (megablocks, grouped_gemm) — "
                               f"import failed: {exc}") from exc
        return ops, gg

    def forward(self, experts: Experts, x: Tensor, indices: Tensor, weights: Tensor) -> Tensor:  # pragma: no cover
        if self._mods is None:
            self._mods = self.check_available()
        _, gg = self._mods
        slot_ids, token_ids, counts = sort_by_expert(indices, experts.num_experts)
        xs = x.index_select(0, token_ids)
        batch_sizes = counts.cpu()
        h = gg.gmm(xs, experts.w1, batch_sizes)
        if experts.b1 is not None:
            h = h + experts.b1.repeat_interleave(counts, dim=0)
        y = gg.gmm(experts.act(h), experts.w2, batch_sizes)
        if experts.b2 is not None:
            y = y + experts.b2.repeat_interleave(counts, dim=0)
        y = y * weights.reshape(-1).index_select(0, slot_ids).to(y.dtype).unsqueeze(-1)
        return torch.zeros_like(x).index_add(0, token_ids, y)


BACKENDS: dict[str, type[nn.Module]] = {"torch": TorchDroplessBackend, "megablocks": MegaBlocksBackend}
