"""Exact mid-epoch resume, end to end: real ``python -m tasks.train`` processes.

An uninterrupted run is compared with a run SIGKILLed after a mid-epoch checkpoint and resumed in
place from its ``last.ckpt`` (``ckpt_path=<run>/checkpoints/last.ckpt``, no ``hydra.run.dir``: the
run continues in its own folder): the final weights, fusion state ``m``, DynMoE mask and pool
records, λ and its phase, the stability probe history, the AdamW moments (tensor by tensor) and the
whole ``metrics.csv`` (row by row: the killed attempt's rows before the checkpoint, then the resumed
ones) are identical (CPU, one thread). The expectation is the uninterrupted run, not the code's own state.
"""

import csv
import json
import os
import signal
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
HELPERS = os.path.dirname(os.path.abspath(__file__))  # _resume_helpers.py (test-only callbacks)

COMMON = ["trainer.log_every_n_steps=1", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
          "callbacks.routing_stability.plots=false"]
# CoLA, tiny BERT, RMoE (top-any + Stateful Fusion + linear λ ramp): 40 rows / batch 8 = 5 batches per
# epoch, 3 epochs = 15 steps; last.ckpt every 3 steps (3, 6, 9, 12: mid-epoch) and after each validation
GLUE = ["task=glue/cola", "backbone=tiny_bert", "moe=rmoe", "moe.initial_experts=2", "moe.max_experts=4",
        "data.max_train_samples=40", "data.batch_size=8", "data.max_eval_samples=16", "data.max_length=32",
        "trainer.max_epochs=3", "callbacks.last_checkpoint.every_n_train_steps=3",
        "callbacks.routing_stability.probe_every_n_steps=2", *COMMON]
# RotatedDigits, ViT + RMoE (pool adapted every step), 24 steps of one endless stream, validation on
# DomainBed's schedule with checkpoint_freq 10 (after updates 1, 11, 21, 24 = DomainBed steps 0, 10, 20, 23);
# last.ckpt every 4 steps (4, 8, 12, 16, 20) and after each validation
# Stateful Fusion switched on (the vision protocol has none) so that its state is checked too
DOMAINBED = ["task=domainbed/rotated_digits", "trainer.max_steps=24", "trainer.val_check_interval=10",
             "moe.fusion={beta: 0.99, agg: sum, update_in_eval: false, mix_alpha: 1.0}",
             "callbacks.last_checkpoint.every_n_train_steps=4", "callbacks.routing_stability.probe_every_n_steps=3",
             *COMMON]


@pytest.fixture(autouse=True)
def _needs_data(data_dir):
    return data_dir


def run_train(out_dir, args, extra=(), check=True, in_place=False):
    """``python -m tasks.train`` into ``out_dir`` (``in_place``: no ``hydra.run.dir``; the run folder is
    the one ``ckpt_path`` lies in)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", WANDB_MODE="offline",
               PYTHONPATH=os.pathsep.join([HELPERS, ROOT, os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "tasks.train", *args, *([] if in_place else [f"hydra.run.dir={out_dir}"]),
           "+callbacks.dump._target_=_resume_helpers.DumpState", f"+callbacks.dump.path={out_dir}/final", *extra]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


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
    # optimizer (AdamW moments, tensor by tensor) and LR scheduler of the final checkpoints
    ca = torch.load(f"{full_dir}/checkpoints/last.ckpt", weights_only=False)
    cb = torch.load(f"{resumed_dir}/checkpoints/last.ckpt", weights_only=False)
    differ = nested_differences(ca["optimizer_states"], cb["optimizer_states"])
    assert not differ, f"optimizer states differ after resume: {differ[:5]}"
    assert count_tensors(ca["optimizer_states"]) > 0
    assert ca["lr_schedulers"] == cb["lr_schedulers"]
    return a


def nested_differences(a, b, path="state"):
    """Paths where two nested structures differ: tensors by ``torch.equal`` (dtype and shape too),
    everything else by ``==``."""
    if torch.is_tensor(a) or torch.is_tensor(b):
        same = (torch.is_tensor(a) and torch.is_tensor(b) and a.dtype == b.dtype and a.shape == b.shape
                and torch.equal(a, b))
        return [] if same else [path]
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return [f"{path}: keys {sorted(map(str, a))} != {sorted(map(str, b))}"]
        return [d for k in a for d in nested_differences(a[k], b[k], f"{path}[{k!r}]")]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return [f"{path}: length {len(a)} != {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in nested_differences(x, y, f"{path}[{i}]")]
    return [] if a == b else [f"{path}: {a!r} != {b!r}"]


def count_tensors(obj):
    if torch.is_tensor(obj):
        return 1
    if isinstance(obj, dict):
        return sum(count_tensors(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(count_tensors(v) for v in obj)
    return 0


def test_nested_differences_sees_one_changed_element_in_a_large_tensor():
    """The comparison the resume tests rely on: a +1.0 in one element of a [30522, 32] moment (the
    size of tiny BERT's embedding) is found, where comparing ``repr`` strings would miss it."""
    g = torch.Generator().manual_seed(0)
    state = {"state": {0: {"step": torch.tensor(6.0), "exp_avg": torch.randn(30522, 32, generator=g),
                           "exp_avg_sq": torch.rand(30522, 32, generator=g)}}, "param_groups": [{"lr": 1e-3}]}
    other = {"state": {0: {k: v.clone() for k, v in state["state"][0].items()}}, "param_groups": [{"lr": 1e-3}]}
    assert nested_differences(state, other) == []
    other["state"][0]["exp_avg"][15000, 7] += 1.0
    assert repr(state) == repr(other)  # the old check could not see it
    assert nested_differences(state, other) == ["state['state'][0]['exp_avg']"]
    other["state"][0]["exp_avg"] = state["state"][0]["exp_avg"].clone()
    other["param_groups"][0]["lr"] = 2e-3
    assert nested_differences(state, other) == ["state['param_groups'][0]['lr']: 0.001 != 0.002"]


def csv_rows(path):
    """metrics.csv as a list of rows (only non-empty cells), in file order, without the wall times
    (``time/*``; a row holding nothing else is left out: the epoch a run was interrupted in has none)."""
    out = []
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            row = {k: v for k, v in r.items() if v not in (None, "") and not k.startswith("time/")}
            if set(row) - {"step", "epoch"}:
                out.append(row)
    return out


def assert_same_history(full_dir, resumed_dir):
    """The resumed-in-place run's metrics.csv is the uninterrupted run's, row by row."""
    full, resumed = csv_rows(f"{full_dir}/metrics.csv"), csv_rows(f"{resumed_dir}/metrics.csv")
    assert len(full) > 10
    for i, (a, b) in enumerate(zip(full, resumed)):
        assert a == b, f"row {i} differs: uninterrupted {a}, resumed {b}"
    assert len(full) == len(resumed), (len(full), len(resumed))


def kill_then_resume(tmp_path, args, kill_step, where="train"):
    """SIGKILL a run in ``tmp_path/run`` at ``kill_step``, then continue it in place from its last.ckpt."""
    run = tmp_path / "run"
    proc = run_train(run, args, ["+callbacks.kill._target_=_resume_helpers.KillAtStep",
                                 f"+callbacks.kill.step={kill_step}", f"+callbacks.kill.where={where}"], check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    ckpt = run / "checkpoints" / "last.ckpt"
    saved = torch.load(ckpt, weights_only=False)
    assert not (run / "done").exists() and (run / ".rmoe.lock").exists()  # the killed run's lock is stale
    killed_rows = csv_rows(run / "metrics.csv")
    # no hydra.run.dir: continues in `run`, with the run's own config less the kill callback (allowed)
    run_train(run, [*args, f"ckpt_path={ckpt}", "~callbacks.kill", "resume.allow_changes=[callbacks.kill]"],
              in_place=True)
    assert (run / "done").is_file() and not (run / ".rmoe.lock").exists()
    resumed_rows = csv_rows(run / "metrics.csv")
    # the killed attempt's rows logged before the checkpoint are kept as they were
    before = [r for r in killed_rows if int(r["step"]) < saved["global_step"]]
    assert before and resumed_rows[:len(before)] == before
    return saved, run


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_glue_sigkill_mid_epoch_then_resume_matches_uninterrupted_run(tmp_path, precision):
    args = [*GLUE, f"trainer.precision={precision}"]
    full = tmp_path / "full"
    run_train(full, args)
    # killed before step 8 of 15; its last.ckpt is the step-6 save: epoch 1, after 1 of its 5 batches
    saved, resumed = kill_then_resume(tmp_path, args, kill_step=8)
    assert saved["global_step"] == 6 and saved["epoch"] == 1
    progress = saved["loops"]["fit_loop"]["epoch_loop.batch_progress"]["current"]
    assert progress["processed"] == 1  # mid-epoch
    assert saved["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]["samples"] == 8
    final = assert_same_final_state(full, resumed)
    assert final["global_step"] == 15
    assert_same_history(full, resumed)


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
    assert_same_history(full, resumed)


@pytest.mark.slow
def test_domainbed_sigkill_mid_stream_then_resume_matches_uninterrupted_run(tmp_path):
    full = tmp_path / "full"
    run_train(full, DOMAINBED)
    saved, resumed = kill_then_resume(tmp_path, DOMAINBED, kill_step=14)
    assert saved["global_step"] == 12  # a step save between the validations after updates 11 and 21
    assert_same_final_state(full, resumed)
    assert_same_history(full, resumed)
    # DomainBed's records: the killed run's before the checkpoint (steps 0, 10), then the resumed run's
    # (steps 20, 23), equal to the uninterrupted run's
    import json

    def records(d):
        with open(d / "results.jsonl") as f:
            recs = [json.loads(line) for line in f]
        return [r["step"] for r in recs], {r["step"]: {k: v for k, v in r.items() if k.startswith("env")} for r in recs}

    (steps_a, ra), (steps_b, rb) = records(full), records(resumed)
    assert steps_a == steps_b == [0, 10, 20, 23]  # in order, no step twice
    assert all(ra[s] == rb[s] for s in rb)


@pytest.mark.slow
def test_glue_resume_with_a_half_filled_pool_recording_window_matches(tmp_path):
    """Killed while DynMoE's pool window (batches n//2 .. 3n//4 of an epoch) is half recorded: the
    checkpoint holds the open window and its partial counts, and the resumed run adapts the pool
    exactly as the uninterrupted run."""
    full = tmp_path / "full"
    run_train(full, GLUE)
    saved, resumed = kill_then_resume(tmp_path, GLUE, kill_step=4)  # last.ckpt: the step-3 save (batch 2)
    assert saved["global_step"] == 3 and saved["epoch"] == 0
    sd = saved["state_dict"]
    recording = [k for k in sd if k.endswith("router.recording")]
    assert recording and all(bool(sd[k]) for k in recording)  # the window is open ...
    assert all(float(sd[k.replace("recording", "routed_count")].sum()) > 0 for k in recording)  # ... half filled
    final = assert_same_final_state(full, resumed)
    assert final["global_step"] == 15
    assert_same_history(full, resumed)


def preempt_then_resume(tmp_path, args, step, signum):
    """Send ``signum`` to a run in ``tmp_path/run`` at the start of the batch after ``step`` steps: it
    saves the checkpoint of the moment (after that batch), records the attempt as preempted, prints the
    resume command and exits 128 + signum; then run that printed command (its overrides) in place."""
    run = tmp_path / "run"
    proc = run_train(run, args, ["+callbacks.sig._target_=_resume_helpers.SignalAtStep", f"+callbacks.sig.step={step}",
                                 f"+callbacks.sig.signum={signum}"], check=False)
    code = 128 + getattr(signal, signum)
    assert proc.returncode == code, proc.stderr[-3000:]
    ckpt = run / "checkpoints" / "last.ckpt"
    saved = torch.load(ckpt, weights_only=False)
    assert saved["global_step"] == step + 1  # the moment: right after the batch the signal arrived in
    attempts = [json.loads(line) for line in (run / "attempts.jsonl").read_text().splitlines()]
    assert attempts[-1]["event"] == "preempted" and attempts[-1]["signal"] == signum
    assert attempts[-1]["global_step"] == step + 1 and attempts[-1]["exit_code"] == code
    resume = f"rmoe-train ckpt_path={ckpt.resolve()}"
    assert attempts[-1]["resume"] == resume and f"resume with:\n  {resume}" in proc.stderr
    assert not (run / "done").exists()
    run_train(run, [resume.split(" ", 1)[1], "~callbacks.sig", "resume.allow_changes=[callbacks.sig]"],
              in_place=True)
    assert (run / "done").is_file()
    return saved, run


def test_glue_sigterm_saves_the_moment_exits_143_and_the_resume_matches_uninterrupted_run(tmp_path):
    full = tmp_path / "full"
    run_train(full, GLUE)
    saved, resumed = preempt_then_resume(tmp_path, GLUE, step=7, signum="SIGTERM")
    assert saved["epoch"] == 1  # mid-epoch (epoch 1 is steps 6..10), not a scheduled save (every 3 steps)
    assert_same_final_state(full, resumed)
    assert_same_history(full, resumed)


@pytest.mark.slow
def test_glue_sigusr1_saves_the_moment_exits_138_and_the_resume_matches_uninterrupted_run(tmp_path):
    full = tmp_path / "full"
    run_train(full, GLUE)
    _, resumed = preempt_then_resume(tmp_path, GLUE, step=3, signum="SIGUSR1")
    assert_same_final_state(full, resumed)
    assert_same_history(full, resumed)
