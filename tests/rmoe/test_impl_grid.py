"""``python -m bench.impl_grid`` runs and prints one row per size, the ``matmuls`` column included
(its bound is timed against the floor's own matmuls)."""

from __future__ import annotations

from bench import impl_grid


def test_impl_grid_prints_a_row_per_size_with_the_matmul_bound(capsys):
    impl_grid.main(["--E", "4", "--k", "1,2", "--N", "8", "--impls", "auto,blocked,matmuls", "--reps", "1"])
    out = capsys.readouterr().out
    assert "matmuls: against the floor's matmuls" in out
    rows = [ln.split() for ln in out.splitlines() if ln.strip().startswith("4 ")]
    assert [(r[1], r[2]) for r in rows] == [("1", "8"), ("2", "8")]
    for r in rows:  # E k N rows/E floor-ms, then "median (min)" per variant, then auto's pick
        assert len(r) == 5 + 2 * 3 + 1 and r[-1] in ("blocked", "grouped_mm")


def test_matmul_fns_run_both_sides():
    import torch

    from bench.__main__ import DenseFloor
    from rmoe import build_moe_layer
    torch.manual_seed(0)
    moe = build_moe_layer(impl_grid.D_MODEL, impl_grid.D_FF, router="topk", initial_experts=4, top_k=2)
    fns = impl_grid.matmul_fns(moe, DenseFloor(2), torch.randn(16, impl_grid.D_MODEL))
    assert set(fns) == {"floor matmuls", "matmuls"}
    for f in fns.values():
        f()
