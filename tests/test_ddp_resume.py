"""``trainer=ddp`` on CPU, resumed under DDP: two real gloo processes (``python -m tasks.train``).

A DDP run that fails at step 6 (both ranks) is continued in place from its ``last.ckpt`` (the save after
the validation after update 5, mid-stream) under DDP. It runs to the end (before: the stability callback's
replay of this epoch's values after a resume logged them with other ``self.log`` arguments than the live
values -- ``MisconfigurationException: You called self.log(routing/moe0/load_cv, ...) twice``), both ranks
end with one model, each rank draws the uninterrupted run's batches after the checkpoint, and the final
weights and λ are the uninterrupted DDP run's, tensor by tensor (before: max |Δ| 0.13 at step 8 -- the
checkpoint held rank 0's RNG states only, so rank 1 resumed with rank 0's dropout and noise streams; now
every rank's states are saved and each rank gets its own back, ``callbacks.resume.RNGStateCallback``).
"""

import os
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.abspath(__file__)).rsplit(os.sep, 1)[0]
HELPERS = os.path.join(ROOT, "tests", "tasks", "run")  # _resume_helpers.DumpState, _run_helpers.FailAtStep
DDP = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.max_steps=8",
       "trainer.val_check_interval=4", "trainer.log_every_n_steps=1",
       "callbacks.routing_stability.probe_every_n_steps=2",
       "callbacks.routing_stability.plots=false", "trainer.enable_progress_bar=false",
       "trainer.enable_model_summary=false", "moe.fusion={beta: 0.99, agg: sum, update_in_eval: false, mix_alpha: 1.0}"]


def run(args, out=None):
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", WANDB_MODE="offline",
               PYTHONPATH=os.pathsep.join([HELPERS, ROOT, os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "tasks.train", *args, *([f"hydra.run.dir={out}"] if out else [])]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def _fail_then_resume(tmp_path):
    full, run_dir = tmp_path / "full", tmp_path / "run"
    dump = ["+callbacks.dump._target_=_resume_helpers.DumpState"]
    proc = run([*DDP, *dump, f"+callbacks.dump.path={full}/final"], full)
    assert proc.returncode == 0, proc.stderr[-4000:]
    proc = run([*DDP, *dump, f"+callbacks.dump.path={run_dir}/final",
                "+callbacks.fail._target_=_run_helpers.FailAtStep", "+callbacks.fail.step=6"], run_dir)
    assert proc.returncode != 0 and "injected failure at step 6" in proc.stderr, proc.stderr[-4000:]
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    assert torch.load(ckpt, weights_only=False)["global_step"] == 5  # the save after the validation at update 5
    proc = run([f"ckpt_path={ckpt}", "~callbacks.fail", "resume.allow_changes=[callbacks.fail]"])
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (run_dir / "done").is_file()
    return [[torch.load(d / f"final.rank{r}.pt", weights_only=False) for r in (0, 1)] for d in (full, run_dir)]


def test_a_ddp_run_resumed_under_ddp_equals_the_uninterrupted_ddp_run(tmp_path, data_dir):
    (a0, a1), (b0, b1) = _fail_then_resume(tmp_path)
    for a, b in ((a0, b0), (a1, b1)):
        assert a["world_size"] == b["world_size"] == 2 and a["global_step"] == b["global_step"] == 8
        assert b["batches"] == a["batches"][-len(b["batches"]):] and len(b["batches"]) == 3
        differ = [k for k in a["state_dict"] if not torch.equal(a["state_dict"][k], b["state_dict"][k])]
        assert not differ, differ[:5]
        assert a["lambda"] == b["lambda"]
    assert all(torch.equal(v, b1["state_dict"][k]) for k, v in b0["state_dict"].items())  # one model
