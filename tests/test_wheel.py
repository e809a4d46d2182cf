"""A non-editable install runs: the wheel carries the Hydra configs and ``rmoe-train`` composes from them.

The wheel is built from this checkout, installed with ``--no-deps`` into a fresh virtual environment
whose dependencies come from the project venv's site-packages (a ``.pth`` line, so the project's own
editable install is not picked up), and ``rmoe-train --cfg job`` runs there from an empty folder.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(cmd, **kw):
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, **kw)
    assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc


def test_wheel_install_runs_rmoe_train(tmp_path):
    src = tmp_path / "src"  # a copy of what the build reads, so the checkout gets no build/ folder
    for name in ("rmoe", "tasks", "callbacks"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    wheels = tmp_path / "wheels"
    _run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation", "-q",
          "-w", str(wheels)])
    (wheel,) = list(wheels.glob("rmoe-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    configs = [n for n in names if n.startswith("tasks/conf/") and n.endswith(".yaml")]
    in_tree = list((ROOT / "tasks" / "conf").rglob("*.yaml"))
    assert len(configs) == len(in_tree) > 100, (len(configs), len(in_tree))
    assert "tasks/conf/train.yaml" in names and "tasks/conf/protocol/glue/rmoe.yaml" in names

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    py = venv / "bin" / "python"
    _run([sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-deps", str(wheel)])
    site = Path(_run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    (site / "project_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    where = _run([str(py), "-c", "import tasks.train; print(tasks.train.CONF_DIR)"], cwd=work, env=env).stdout
    assert where.strip().startswith(str(site)), where  # the installed package, not this checkout
    out = _run([str(venv / "bin" / "rmoe-train"), "task=glue/rte", "moe=dynmoe", "--cfg", "job"], cwd=work,
               env=env).stdout
    assert "task_name: glue/rte" in out and "_target_: tasks.glue.datamodule.GLUEDataModule" in out
    assert "name: dynmoe" in out and "lambda0: 0.01" in out  # the protocol files came along
