"""`make clean` keeps the runs, `make clean-runs` removes them; an RMOE_DATA_DIR that is not a folder (the
Makefile's default beside a fresh clone) is named in one line, for GLUE and MNIST; a missing MNIST file too."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tasks.run.checks import ConfigError, check_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("make") is None, reason="no make")
def test_clean_keeps_runs_and_clean_runs_removes_them(tmp_path):
    shutil.copy(ROOT / "Makefile", tmp_path / "Makefile")
    for d in ("logs/glue/rte/runs/x/checkpoints", ".venv/bin", ".pytest_cache", "pkg/__pycache__", "outputs/y"):
        (tmp_path / d).mkdir(parents=True)
    (tmp_path / "logs/glue/rte/runs/x/checkpoints/last.ckpt").write_text("weights")
    r = subprocess.run(["make", "clean"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "logs/glue/rte/runs/x/checkpoints/last.ckpt").read_text() == "weights"
    assert (tmp_path / "outputs/y").is_dir()
    assert not (tmp_path / ".venv").exists() and not (tmp_path / ".pytest_cache").exists()
    assert not (tmp_path / "pkg/__pycache__").exists()
    r = subprocess.run(["make", "clean-runs"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "removing logs" in r.stdout
    assert not (tmp_path / "logs").exists() and not (tmp_path / "outputs").exists()


@pytest.mark.parametrize("overrides,key", [(["task=glue/rte", "backbone=tiny_bert"], "data.glue_dir"),
                                           (["experiment=domainbed/rotated_mnist_rmoe"], "data.root")])
def test_a_missing_data_root_names_the_variable(compose_cfg, monkeypatch, tmp_path, overrides, key):
    missing = tmp_path / "shared" / "data"
    monkeypatch.setenv("RMOE_DATA_DIR", str(missing))
    monkeypatch.setenv("RMOE_DATA_DIR_ORIGIN", "the Makefile's default, ../shared/data beside the clone")
    cfg = compose_cfg(overrides)
    with pytest.raises(ConfigError) as err:
        check_config(cfg)
    msg = str(err.value)
    assert f"RMOE_DATA_DIR='{missing}' is not a folder (the Makefile's default, ../shared/data beside the clone)" in msg
    assert f"{key}='{missing}/" in msg and "allowed: RMOE_DATA_DIR=<the data folder>" in msg


def _train(args, env):
    return subprocess.run([sys.executable, "-m", "tasks.train", *args, "print_config=false"], cwd=ROOT,
                          env=dict(os.environ, **env), capture_output=True, text=True, timeout=300)


def test_mnist_without_its_files_is_one_line(tmp_path):
    (tmp_path / "data").mkdir()
    r = _train(["experiment=domainbed/rotated_mnist_rmoe", f"hydra.run.dir={tmp_path / 'run'}"],
               {"RMOE_DATA_DIR": str(tmp_path / "data")})
    errors = [ln for ln in r.stderr.splitlines() if "rror" in ln]
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert len(errors) == 1, errors
    assert errors[0].startswith(f"rmoe-train: error: MNIST idx files not found under "
                                f"data.root='{tmp_path / 'data' / 'mnist'}'")
    assert "set data.root to the folder holding MNIST/raw" in errors[0]
