"""The MegaBlocks adapter (rmoe/megablocks.py) against the torch backend on CPU.

MegaBlocks' CUDA-only ops are replaced by the torch reference implementations of
bench/megablocks_parity.py (same signatures, same input checks), injected through the backend's
``ops`` seam; the adapter's own logic — sentinel bin for empty slots, bins, row selection,
per-expert biases, dropout-mask alignment, dtype flow — is what runs.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench.megablocks_parity import CASES, GRADS, TorchReferenceOps, run_case
from rmoe import build_moe_layer
from rmoe.experts import TorchDroplessBackend
from rmoe.megablocks import MegaBlocksBackend
from rmoe.registry import BACKENDS

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("case", list(CASES))
def test_reference_ops_match_the_torch_backend_output_and_every_gradient(case):
    errors = run_case(case, TorchReferenceOps())
    assert set(errors) == {"out", *GRADS}
    assert max(errors.values()) <= 1e-5, errors


def _layer_and_routing(n=40, d=16, d_ff=32, **cfg):
    layer = build_moe_layer(d, d_ff, **cfg)
    x = torch.randn(n, d)
    with torch.no_grad():
        rec = layer.router(x)
    return layer, x, rec.expert_indices, rec.expert_weights.float()


def test_fresh_dropout_draw_matches_the_torch_backend_for_the_same_rng_state():
    # no explicit mask: both backends draw one [m, d_ff] keep-mask after the sort, in the same row order
    layer, x, idx, w = _layer_and_routing(router="topk", initial_experts=4, top_k=2, expert_dropout=0.4)
    layer.train()
    torch.manual_seed(7)
    ref = TorchDroplessBackend()(layer.experts, x, idx, w)
    torch.manual_seed(7)
    out = MegaBlocksBackend(ops=TorchReferenceOps())(layer.experts, x, idx, w)
    assert torch.allclose(out, ref, atol=1e-6)
    torch.manual_seed(8)  # another draw drops other units
    assert not torch.allclose(MegaBlocksBackend(ops=TorchReferenceOps())(layer.experts, x, idx, w), ref, atol=1e-3)


def test_empty_slots_add_nothing_and_their_weights_get_no_gradient():
    layer, x, idx, w = _layer_and_routing(router="topk", initial_experts=4, top_k=2)
    idx = idx.clone()
    idx[0] = -1  # token 0: both slots empty
    idx[1, 1] = -1  # token 1: its second slot empty
    w = w.clone().requires_grad_(True)
    out = MegaBlocksBackend(ops=TorchReferenceOps())(layer.experts, x, idx, w)
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    e = int(idx[1, 0])
    assert torch.allclose(out[1], w[1, 0] * layer.experts.expert_forward(e, x[1:2])[0], atol=1e-6)
    out.sum().backward()
    assert torch.equal(w.grad[0], torch.zeros(2)) and w.grad[1, 1] == 0 and w.grad[1, 0] != 0


def test_all_slots_empty_gives_zeros():
    layer, x, idx, w = _layer_and_routing(router="topk", initial_experts=4, top_k=2)
    out = MegaBlocksBackend(ops=TorchReferenceOps())(layer.experts, x, torch.full_like(idx, -1), w)
    assert torch.equal(out, torch.zeros_like(x))


@pytest.mark.parametrize("autocast", [False, True])
def test_bf16_compute_returns_the_input_dtype_close_to_fp32(autocast):
    # the GPU dtype flow on CPU: gmm sees bf16 rows and bf16 weights (the reference gmm checks
    # a.dtype == b.dtype), the combine weights stay fp32, the output comes back in x's dtype
    layer, x, idx, w = _layer_and_routing(router="topk", initial_experts=4, top_k=2)
    seen = []

    class Bf16Ops(TorchReferenceOps):
        def gmm(self, a, b, batch_sizes, trans_b=False):
            seen.append((a.dtype, b.dtype))
            return super().gmm(a, b, batch_sizes, trans_b)

    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = MegaBlocksBackend(ops=Bf16Ops(torch.bfloat16))(layer.experts, x, idx, w)
    ref = TorchDroplessBackend()(layer.experts, x, idx, w)
    assert out.dtype == torch.float32 and seen == [(torch.bfloat16, torch.bfloat16)] * 2
    assert (out - ref).abs().max() <= 3e-2 * ref.abs().max().clamp_min(1.0)


def test_registered_backend_is_the_adapter_and_needs_cuda_at_first_use():
    assert BACKENDS["megablocks"] is MegaBlocksBackend and MegaBlocksBackend.supports_capacity
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    layer, x, idx, w = _layer_and_routing(router="topk", initial_experts=4, top_k=2)
    with pytest.raises(RuntimeError, match="backend='megablocks' needs a CUDA device"):
        MegaBlocksBackend()(layer.experts, x, idx, w)


@pytest.mark.skipif(importlib.util.find_spec("megablocks") is None, reason="megablocks not installed (make megablocks)")
def test_megablocks_triton_kernels_in_the_interpreter_match_the_torch_backend():
    # MegaBlocks' own Triton gather/scatter (forward and backward kernels) on CPU tensors
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "bench.megablocks_parity", "--ops", "triton"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "PASS" in proc.stdout


@pytest.mark.gpu
@pytest.mark.parametrize("case", list(CASES))
def test_megablocks_ops_match_the_torch_backend_on_gpu(case):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from rmoe.megablocks import MegaBlocksOps

    errors = run_case(case, MegaBlocksOps(), device="cuda", n=512, d=128, d_ff=256)
    assert max(errors.values()) <= 3e-2, errors  # bf16 experts against the fp32 torch backend


def test_pickling_drops_the_loaded_cuda_ops():
    import pickle

    from rmoe.megablocks import MegaBlocksOps

    b = MegaBlocksBackend()
    b.ops = object.__new__(MegaBlocksOps)  # as after a first forward (the real ops are CUDA modules)
    b.ops.sort = lambda *a: None  # noqa: E731 - a function pickle cannot store
    assert pickle.loads(pickle.dumps(b)).ops is None
    ref = MegaBlocksBackend(ops=TorchReferenceOps())
    assert isinstance(pickle.loads(pickle.dumps(ref)).ops, TorchReferenceOps)  # injected ops travel
