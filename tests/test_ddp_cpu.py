"""``trainer=ddp`` on CPU: two real processes over gloo (``python -m tasks.train``, real torch.distributed).

RMoE on RotatedDigits (top-any router with its pool adapted every step + exp-decay λ; Stateful Fusion,
off in the vision protocol, switched on here so that its state is checked too).
The ranks draw different batches, yet at the end every tensor of the model -- weights, fusion state
``m``, DynMoE expert mask and pool records -- is identical on both, and so are λ, its schedule and the
stability callback's history (loads, fusion π, probe flips): rmoe all-reduces what routing accumulates.
"""

import csv
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HELPERS = os.path.join(ROOT, "tests", "tasks", "run")  # _resume_helpers.DumpState


def test_ddp_two_cpu_processes_keep_routing_state_identical(tmp_path):
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", WANDB_MODE="offline",
               PYTHONPATH=os.pathsep.join([HELPERS, ROOT, os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "tasks.train", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
           "trainer.max_steps=8", "trainer.val_check_interval=4", "trainer.log_every_n_steps=1",
           "callbacks.routing_stability.probe_every_n_steps=2", "callbacks.routing_stability.plots=false",
           "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", f"hydra.run.dir={out}",
           "moe.fusion={beta: 0.99, agg: sum, update_in_eval: false, mix_alpha: 1.0}",
           "+callbacks.dump._target_=_resume_helpers.DumpState", f"+callbacks.dump.path={out}/final"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "distributed_backend=gloo" in proc.stdout + proc.stderr
    r0 = torch.load(out / "final.rank0.pt", weights_only=False)
    r1 = torch.load(out / "final.rank1.pt", weights_only=False)
    assert r0["world_size"] == r1["world_size"] == 2 and r0["global_step"] == r1["global_step"] == 8

    # the ranks trained on different data ...
    assert len(r0["batches"]) == len(r1["batches"]) == 8
    assert all(a != b for a, b in zip(r0["batches"], r1["batches"]))
    # ... yet hold the same model, fusion state and expert pool
    sd0, sd1 = r0["state_dict"], r1["state_dict"]
    assert sd0.keys() == sd1.keys()
    differ = [k for k in sd0 if not torch.equal(sd0[k], sd1[k])]
    assert not differ, differ[:5]
    fusion = [k for k in sd0 if k.endswith("fusion.m")]
    masks = [k for k in sd0 if k.endswith("router.expert_mask")]
    assert fusion and masks and all(float(sd0[k].abs().sum()) > 0 for k in fusion)  # fusion state moved
    assert all(int(sd0[k].sum()) >= 1 for k in masks)

    # the same λ on both ranks, and it follows the vision RMoE protocol: max(1e-3, 1e-2 * 0.9^(τ+1)) (SPEC §3)
    assert r0["lambda"] == r1["lambda"] == pytest.approx(max(1e-3, 1e-2 * 0.9 ** 8))
    assert r0["callbacks"]["CurriculumCallback"] == r1["callbacks"]["CurriculumCallback"]
    with open(out / "metrics.csv", newline="") as f:
        lam = [float(r["curriculum/lambda"]) for r in csv.DictReader(f) if r.get("curriculum/lambda")]
    assert lam == pytest.approx([max(1e-3, 1e-2 * 0.9 ** (t + 1)) for t in range(8)])

    # routing statistics (token counts summed over ranks), fusion π and probe flips: one history
    h0 = r0["callbacks"]["RoutingStabilityCallback"]["history"]
    h1 = r1["callbacks"]["RoutingStabilityCallback"]["history"]
    assert h0["load"] and h0["probe"]
    assert repr(h0) == repr(h1)
