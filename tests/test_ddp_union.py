"""Two gloo ranks equal ONE process over the union of both ranks' batches.

``tests/test_ddp_cpu.py`` shows the ranks agree with each other; that would also hold if rmoe averaged
where it must sum, or did not reduce at all on some path. Here two real processes
(``torch.distributed`` over gloo, world size 2; ``tests/_ddp_union_worker.py``) each feed their half of
every batch through the same seeded MoE layers, and the states they end with are compared with one
process (no process group) that sees the whole batch at each step: Stateful Fusion ``m`` of every layer
after every step (agg ``sum`` and ``mean``; top-any and top-k routers; the ranks hold different token
counts), DynMoE's recorded window and ``adapt()`` (removed / added slots, mask, the added slot's ``W``
column from the unrouted-token sum), and the stability callback's token counts (per-step counts behind
its load metrics, its load history, per-domain validation loads). No weight is trained, so these depend
on the initial weights, the batches and the reductions only.
"""

import importlib.util
import os
import subprocess
import sys

import torch
from torch.testing import assert_close

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "_ddp_union_worker.py")


def _worker_module():
    spec = importlib.util.spec_from_file_location("_ddp_union_worker", WORKER)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _two_ranks(tmp_path) -> list[dict]:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, WORKER, str(tmp_path / "pg_init"), str(tmp_path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]


def test_two_gloo_ranks_equal_one_process_over_the_union_of_their_batches(tmp_path):
    w = _worker_module()
    ranks = _two_ranks(tmp_path)
    torch.set_num_threads(1)
    one = w.run(0, 1)  # this process has no process group: nothing is reduced
    assert not (torch.distributed.is_available() and torch.distributed.is_initialized())
    r0, r1 = ranks
    assert r0["world_size"] == r1["world_size"] == 2 and one["world_size"] == 1
    layers = list(w.LAYERS)
    topany = [n for n in layers if w.LAYERS[n]["router"] == "topany"]

    # premises: the ranks hold different numbers of real tokens, which add up to the union's
    for step in range(w.STEPS):
        for n in layers:
            t0, t1 = r0["tokens"][step][n], r1["tokens"][step][n]
            assert t0 > t1 > 0 and t0 + t1 == one["tokens"][step][n]

    # DynMoE pool: each rank records its own tokens; adapt() acts on the sum over ranks
    first = 0
    for n in topany:
        c0, c1 = r0["windows"][first][n]["routed_count"], r1["windows"][first][n]["routed_count"]
        assert c0[w.SKIP_ON_RANK1] > 0 and c1[w.SKIP_ON_RANK1] == 0  # expert 2: rank 0's tokens only
        assert r0["windows"][first][n]["unrouted_count"] > 0 and r1["windows"][first][n]["unrouted_count"] > 0
    for i in range(len(w.WINDOWS)):
        for n in topany:
            a, b, u = r0["windows"][i][n], r1["windows"][i][n], one["windows"][i][n]
            assert torch.equal(a["routed_count"] + b["routed_count"], u["routed_count"]), (i, n)
            assert torch.equal(a["unrouted_count"] + b["unrouted_count"], u["unrouted_count"]), (i, n)
            assert_close(a["unrouted_sum"] + b["unrouted_sum"], u["unrouted_sum"], rtol=1e-9, atol=1e-9)
            x0, x1, x = r0["adapt"][i][n], r1["adapt"][i][n], one["adapt"][i][n]
            for key in ("removed", "added"):
                assert x0[key] == x1[key] == x[key], (i, n, key, x0[key], x1[key], x[key])
            assert torch.equal(x0["mask"], x1["mask"]) and torch.equal(x0["mask"], x["mask"]), (i, n)
            assert torch.equal(x0["weight"], x1["weight"]) and torch.equal(x0["thresholds"], x["thresholds"])
            assert_close(x0["weight"], x["weight"], rtol=1e-5, atol=1e-6)
    assert all(one["adapt"][first][n]["added"] for n in topany)  # a slot was switched on from the unrouted sum
    for n in topany:
        j = one["adapt"][first][n]["added"][0]
        expected = torch.nn.functional.normalize(one["windows"][first][n]["unrouted_sum"], dim=0).float()
        assert_close(r0["adapt"][first][n]["weight"][:, j], expected, rtol=1e-5, atol=1e-6)

    # Stateful Fusion m of every layer after every step (sum: token counts; mean: over all ranks' tokens)
    for step in range(w.STEPS):
        for n in layers:
            m0, m1, m = r0["m"][step][n], r1["m"][step][n], one["m"][step][n]
            assert torch.equal(m0, m1), (step, n)
            assert float(m.abs().sum()) > 0
            assert_close(m0, m, rtol=1e-5, atol=1e-6, msg=lambda s, n=n, step=step: f"fusion m, {n}, step {step}: {s}")

    # stability callback: the token counts behind its per-step load metrics are the union's ...
    for step in range(w.STEPS):
        for n in layers:
            assert r0["counts"][step].keys() == one["counts"][step].keys() == set(layers)
            c0, c1, c = r0["counts"][step][n], r1["counts"][step][n], one["counts"][step][n]
            assert torch.equal(c0, c1) and torch.equal(c0, c), (step, n, c0, c)
            assert float(c.sum()) > 0
    h0, h1, h = r0["history"], r1["history"], one["history"]
    assert h0["load"].keys() == h["load"].keys() == set(one["names"]) and h["load"]["moe0"]
    for name in h["load"]:
        assert_close(torch.tensor(h0["load"][name]), torch.tensor(h["load"][name]), rtol=1e-9, atol=1e-12)
        assert h0["load"][name] == h1["load"][name]
        # ... and so are its per-domain validation loads (absolute counts, summed over ranks)
        assert torch.equal(torch.tensor(h0["domain_loads"][name]), torch.tensor(h["domain_loads"][name])), name
        assert h0["domain_loads"][name] == h1["domain_loads"][name]
