"""Two gloo ranks under DistributedDataParallel equal one process over the union of their rows, for the
balancing methods (``tests/_ddp_balancing_worker.py``; the ranks hold different numbers of real tokens):

* ``global_batch``: the loss values of the two ranks average to the one-process loss of the union, and
  the router gradient after DDP's averaging is the one-process gradient — not off by the data-parallel
  size, and exact with unequal token counts;
* ``global_batch`` with gradient accumulation (``rmoe.accumulation``'s routing pre-pass): 2 micro-batches on
  each of 2 ranks give the gradient of one forward over all their rows in one process;
* ``lossfree``: the counts accumulated over 2 micro-batches (first under ``no_sync``, DDP broadcasting
  rank 0's buffers at every forward) are the union's on both ranks, and so is the bias after each
  ``update_bias()``; the second step's routing depends on the first step's bias.

(With ``P_e`` the plain local mean instead of the rank-weighted sum, the global-batch gradient is wrong
whenever the ranks' token counts differ: this test fails.)
"""

import importlib.util
import os
import subprocess
import sys

import torch
from torch.testing import assert_close

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "_ddp_balancing_worker.py")


def _worker_module():
    spec = importlib.util.spec_from_file_location("_ddp_balancing_worker", WORKER)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_two_gloo_ranks_equal_one_process_for_global_batch_and_lossfree(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, WORKER, str(tmp_path / "pg_init"), str(tmp_path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    w = _worker_module()
    torch.set_num_threads(1)
    one = w.run(0, 1)
    assert not (torch.distributed.is_available() and torch.distributed.is_initialized())

    # premise: unequal real tokens per rank, adding up to the union's
    assert r0["gb_tokens"] > r1["gb_tokens"] > 0 and r0["gb_tokens"] + r1["gb_tokens"] == one["gb_tokens"]
    for t0, t1, t in zip(r0["tokens"], r1["tokens"], one["tokens"]):
        assert t0 > t1 > 0 and t0 + t1 == t

    # global-batch loss: mean over ranks = the union's loss; DDP-averaged gradient = the union's gradient
    assert abs((r0["gb_loss"] + r1["gb_loss"]) / 2 - one["gb_loss"]) < 1e-6
    assert_close(r0["gb_grad"], one["gb_grad"], rtol=1e-5, atol=1e-7)
    assert_close(r1["gb_grad"], one["gb_grad"], rtol=1e-5, atol=1e-7)
    assert float(one["gb_grad"].abs().sum()) > 0

    # Megatron-Core's rule: the ranks' losses *sum* to the union's loss, each rank's is 1/R of ours, and DDP's
    # averaged gradient is 1/R of the union's (one process: the same loss and gradient as ours)
    assert abs(r0["gbm_loss"] + r1["gbm_loss"] - one["gbm_loss"]) < 1e-6
    assert abs(one["gbm_loss"] - one["gb_loss"]) < 1e-6
    assert abs(r0["gb_loss"] - 2 * r0["gbm_loss"]) < 1e-6 and abs(r1["gb_loss"] - 2 * r1["gbm_loss"]) < 1e-6
    assert_close(r0["gbm_grad"], one["gb_grad"] / 2, rtol=1e-5, atol=1e-7)
    assert_close(r1["gbm_grad"], one["gb_grad"] / 2, rtol=1e-5, atol=1e-7)

    # global_batch accumulated over 2 micro-batches on 2 ranks: the window counts every token of both, and the
    # gradient is that of one forward over all of them in one process
    assert r0["gba_window_tokens"] == r1["gba_window_tokens"] == one["gba_window_tokens"]
    assert_close(r0["gba_grad"], one["gba_grad"], rtol=1e-5, atol=1e-7)
    assert_close(r1["gba_grad"], one["gba_grad"], rtol=1e-5, atol=1e-7)
    assert float(one["gba_grad"].abs().sum()) > 0

    # loss-free balancing: the step's counts (both micro-batches, both ranks) and the bias, on every rank
    for step in range(w.STEPS):
        assert torch.equal(r0["counts"][step], one["counts"][step]), (step, r0["counts"][step], one["counts"][step])
        assert torch.equal(r1["counts"][step], one["counts"][step])
        assert int(one["counts"][step].sum()) == 2 * sum(one["tokens"][step * w.MICRO:(step + 1) * w.MICRO])
        assert torch.equal(r0["bias"][step], one["bias"][step]) and torch.equal(r1["bias"][step], one["bias"][step])
    assert float(one["bias"][0].abs().sum()) > 0
