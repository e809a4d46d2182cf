"""Exact mid-epoch resume, end to end: real ``python -m tasks.train`` processes.

An uninterrupted run is compared with a run SIGKILLed after a mid-epoch checkpoint and resumed from
its ``last.ckpt`` (``ckpt_path=...``): the final weights, fusion state ``m``, DynMoE mask and pool
records, λ and its phase, the stability probe history and every logged metric of the resumed steps
are identical (CPU, one thread). The expectation is the uninterrupted run, not the code's own state.
"""

import csv
import os
import signal
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HELPERS = os.path.dirname(os.path.abspath(__file__))  # _resume_helpers.py (test-only callbacks)

COMMON = ["trainer.log_every_n_steps=1", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
          "callbacks.routing_stability.plots=false"]
# CoLA, tiny BERT, RMoE (top-any + Stateful Fusion + linear λ ramp): 40 rows / batch 8 = 5 batches per
# epoch, 3 epochs = 15 steps; last.ckpt every 3 steps (3, 6, 9, 12: mid-epoch) and after each validation
GLUE = ["task=glue/cola", "backbone=tiny_bert", "moe=rmoe", "moe.num_experts=2", "moe.max_experts=4",
        "data.max_train_samples=40", "data.batch_size=8", "data.max_eval_samples=16", "data.max_length=32",
        "trainer.max_epochs=3", "callbacks.last_checkpoint.every_n_train_steps=3",
        "callbacks.routing_stability.probe_every_n_steps=2", *COMMON]
# RotatedDigits, ViT + RMoE (pool adapted every step), 24 steps of one endless stream, validation every
# 10 steps; last.ckpt every 4 steps (4, 8, 12, 16, 20) and after each validation
DOMAINBED = ["task=domainbed/rotated_digits", "trainer.max_steps=24", "trainer.val_check_interval=10",
             "callbacks.last_checkpoint.every_n_train_steps=4", "callbacks.routing_stability.probe_every_n_steps=3",
             *COMMON]


@pytest.fixture(autouse=True)
def _needs_data(data_dir):
    return data_dir


def run_train(out_dir, args, extra=(), check=True):
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", WANDB_MODE="offline",
               PYTHONPATH=os.pathsep.join([HELPERS, ROOT, os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "tasks.train", *args, f"hydra.run.dir={out_dir}",
           "+callbacks.dump._target_=_resume_helpers.DumpState", f"+callbacks.dump.path={out_dir}/final", *extra]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def logged(path):
    """``{(step, key): value}`` of every metric in metrics.csv except wall times."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return {(r["step"], k): v for r in rows for k, v in r.items()
            if v not in (None, "") and k not in ("step", "epoch") and not k.startswith("time/")}


def assert_same_final_state(full_dir, resumed_dir):
    a = torch.load(f"{full_dir}/final.rank0.pt", weights_only=False)
    b = torch.load(f"{resumed_dir}/final.rank0.pt", weights_only=False)
    assert a["global_step"] == b["global_step"]
    assert a["state_dict"].keys() == b["state_dict"].keys()
    differ = [k for k in a["state_dict"] if not torch.equal(a["state_dict"][k], b["state_dict"][k])]
    assert not differ, f"tensors differ after resume: {differ[:5]}"
    names = list(a["state_dict"])
    assert any(k.endswith("fusion.m") for k in names) and any(k.endswith("router.expert_mask") for k in names)
    assert a["lambda"] == b["lambda"]
    assert a["callbacks"]["CurriculumCallback"] == b["callbacks"]["CurriculumCallback"]  # λ, phase, step
    ha = a["callbacks"]["RoutingStabilityCallback"]["history"]
    hb = b["callbacks"]["RoutingStabilityCallback"]["history"]
    assert repr(ha) == repr(hb)  # probe flips/churn, loads, π, λ and phase per logged step
    # optimizer (AdamW moments) and LR scheduler of the final checkpoints
    ca = torch.load(f"{full_dir}/checkpoints/last.ckpt", weights_only=False)
    cb = torch.load(f"{resumed_dir}/checkpoints/last.ckpt", weights_only=False)
    assert repr(ca["optimizer_states"]) == repr(cb["optimizer_states"])
    assert ca["lr_schedulers"] == cb["lr_schedulers"]
    return a


def assert_same_metrics(full_dir, resumed_dir, first_step):
    full, resumed = logged(f"{full_dir}/metrics.csv"), logged(f"{resumed_dir}/metrics.csv")
    killed = logged(f"{os.path.dirname(resumed_dir)}/killed/metrics.csv")
    steps = sorted({int(s) for s, _ in resumed})
    assert steps and steps[0] == first_step, steps  # the resumed run starts at the checkpoint's step
    assert {k for _, k in resumed} >= {"train/loss", "curriculum/lambda", "val/score", "val/score_best"}
    missing = [k for k in resumed if k not in full]
    assert not missing, missing[:5]
    differ = [(k, full[k], v) for k, v in resumed.items() if full[k] != v]
    assert not differ, differ[:5]
    # nothing the uninterrupted run logged from the checkpoint on is missing (the checkpointed batch's
    # own end-of-batch metrics share its step number and were logged by the killed run)
    lost = [k for k in full if int(k[0]) >= first_step and k not in resumed and killed.get(k) != full[k]]
    assert not lost, lost[:5]


def kill_then_resume(tmp_path, args, kill_step, where="train"):
    killed = tmp_path / "killed"
    proc = run_train(killed, args, ["+callbacks.kill._target_=_resume_helpers.KillAtStep",
                                    f"+callbacks.kill.step={kill_step}", f"+callbacks.kill.where={where}"], check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    ckpt = killed / "checkpoints" / "last.ckpt"
    saved = torch.load(ckpt, weights_only=False)
    resumed = tmp_path / "resumed"
    run_train(resumed, [*args, f"ckpt_path={ckpt}"])
    return saved, resumed


def test_glue_sigkill_mid_epoch_then_resume_matches_uninterrupted_run(tmp_path):
    full = tmp_path / "full"
    run_train(full, GLUE)
    # killed before step 8 of 15; its last.ckpt is the step-6 save: epoch 1, after 1 of its 5 batches
    saved, resumed = kill_then_resume(tmp_path, GLUE, kill_step=8)
    assert saved["global_step"] == 6 and saved["epoch"] == 1
    progress = saved["loops"]["fit_loop"]["epoch_loop.batch_progress"]["current"]
    assert progress["processed"] == 1  # mid-epoch
    assert saved["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]["samples"] == 8
    final = assert_same_final_state(full, resumed)
    assert final["global_step"] == 15
    assert_same_metrics(full, resumed, first_step=6)


@pytest.mark.slow
def test_glue_sigkill_during_validation_resumes_from_the_save_before_it(tmp_path):
    """Killed while validating after the epoch's last batch: the step save of that batch was skipped
    (Lightning does not redo a validation on resume), so the run resumes before it and still matches."""
    full = tmp_path / "full"
    run_train(full, [*GLUE, "callbacks.last_checkpoint.every_n_train_steps=5"])
    saved, resumed = kill_then_resume(tmp_path, [*GLUE, "callbacks.last_checkpoint.every_n_train_steps=5"],
                                      kill_step=10, where="validation")
    assert saved["global_step"] == 5  # the save after epoch 0's validation, not a step-10 save
    assert_same_final_state(full, resumed)
    assert_same_metrics(full, resumed, first_step=5)


@pytest.mark.slow
def test_domainbed_sigkill_mid_stream_then_resume_matches_uninterrupted_run(tmp_path):
    full = tmp_path / "full"
    run_train(full, DOMAINBED)
    saved, resumed = kill_then_resume(tmp_path, DOMAINBED, kill_step=14)
    assert saved["global_step"] == 12  # a step save between the validations at 10 and 20
    assert_same_final_state(full, resumed)
    assert_same_metrics(full, resumed, first_step=12)
    # DomainBed's records: the resumed run's evaluations (steps 20, 24) are the uninterrupted run's
    import json

    def records(d):
        with open(d / "results.jsonl") as f:
            return {r["step"]: {k: v for k, v in r.items() if k.startswith("env")} for r in map(json.loads, f)}

    ra, rb = records(full), records(resumed)
    assert sorted(rb) == [20, 24] and all(ra[s] == rb[s] for s in rb)
