"""Sweeps under faults: a failing job does not stop the others, finished jobs are skipped
on a rerun (idempotent job folders), a killed job's partial outputs are cleared and it is redone,
and collect ignores incomplete runs. Real ``rmoe-train -m`` subprocesses on tiny_bert + CoLA."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from tasks.run import jobs

EXE = shutil.which("rmoe-train", path=os.path.dirname(sys.executable)) or shutil.which("rmoe-train")
pytestmark = pytest.mark.skipif(EXE is None, reason="the rmoe-train console script is not installed")


def run(args, cwd, timeout=600):
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="offline",
               OMP_NUM_THREADS="1")
    return subprocess.run([EXE, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def sweep_args(sweep, lrs):
    # job folders named by their parameters (as sweeps/reproduce_*.yaml do), skip_if_done on
    return ["-m", "task=glue/cola", "backbone=tiny_bert", "debug=fast", "moe=moe_topk",
            "trainer.limit_train_batches=2", "trainer.limit_val_batches=1", "skip_if_done=true",
            "callbacks.model_checkpoint=null", "callbacks.last_checkpoint=null", "trainer.enable_checkpointing=false",
            f"hydra.sweep.dir={sweep}", "hydra.sweep.subdir=lr${module.lr}", f"module.lr={lrs}"]


def test_failing_job_does_not_stop_the_others_and_reruns_skip_finished_jobs(tmp_path, data_dir):
    sweep = tmp_path / "sweep"
    # the middle job has a bad value (lr must be > 0): it fails at construction, before training
    r = run(sweep_args(sweep, "1e-4,-1.0,2e-4"), tmp_path)
    # the failed job makes the multirun exit non-zero ...
    assert r.returncode != 0
    assert "module.lr=-1.0" in r.stderr, r.stderr[-2000:]
    ok, bad = [sweep / "lr0.0001", sweep / "lr0.0002"], sweep / "lr-1.0"
    # ... but only after the job after it ran to the end
    assert all(jobs.is_done(d) for d in ok)
    assert not bad.exists()  # a refused job leaves no folder behind (nor .hydra/, train.log)
    for d in ok:
        assert (d / "summary.json").is_file() and (d / "metrics.csv").is_file()
        assert "val/score" in jobs.read_done(d)["metrics"]
    stamp = {d: (d / "done").stat().st_mtime_ns for d in ok}
    records = {d: {p.name: p.read_bytes() for p in [*(d / ".hydra").iterdir(), d / "train.log"]} for d in ok}

    # a job killed mid-way left partial outputs and no done file: cleared and redone from scratch
    killed = sweep / "lr0.0003"
    (killed / "checkpoints").mkdir(parents=True)
    (killed / "results.jsonl").write_text('{"step": 99}\n')
    (killed / "summary.json").write_text("{}")
    (killed / "checkpoints" / "last.ckpt").write_bytes(b"truncated")
    r = run(sweep_args(sweep, "1e-4,2e-4,3e-4"), tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert jobs.is_done(killed)
    assert not (killed / "results.jsonl").exists() and not (killed / "checkpoints").exists()
    assert json.loads((killed / "summary.json").read_text())["done"] is True
    # finished jobs were not trained again: their done files are untouched and their log says so
    assert {d: (d / "done").stat().st_mtime_ns for d in ok} == stamp
    # ... and their records (.hydra/, train.log) are the ones of the run that finished, not the skipped job's
    assert "is done (skip_if_done=true): not training again" in r.stdout + r.stderr
    assert {d: {p.name: p.read_bytes() for p in [*(d / ".hydra").iterdir(), d / "train.log"]} for d in ok} == records
