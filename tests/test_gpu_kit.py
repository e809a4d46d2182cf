"""The device kit stays runnable: tools/gpu/check's CPU dry run, tools/gpu/prep, `make megablocks`'s script,
and the packaging facts the GPU host relies on."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _env(**extra):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PY": sys.executable, **extra}
    env.pop("OUT", None)
    return env


def _check(tmp_path, steps: str, timeout: int):
    out = tmp_path / "out"
    proc = subprocess.run(["bash", "tools/gpu/check", "--dry", "--out", str(out), "--steps", steps], cwd=ROOT,
                          env=_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out, (out / "summary.txt").read_text()


def test_check_dry_run_reports_cuda_steps_skipped_and_runs_the_parity(tmp_path):
    out, summary = _check(tmp_path, "setup,build,parity,glue_megablocks", 300)
    assert "mode=dry (CPU)" in summary
    for name in ("setup", "parity"):
        assert f"step {name}: ok" in summary, summary
    for name in ("build", "glue_megablocks"):
        assert f"step {name}: skipped: no CUDA" in summary, summary
    assert "PASS" in (out / "parity.txt").read_text()


@pytest.mark.slow
def test_check_dry_run_every_step(tmp_path, data_dir):
    # the training runs (the device's commands, tiny), pytest -m gpu and the bench, on CPU: minutes
    out, summary = _check(tmp_path, "setup,versions,build,glue_torch,domainbed,parity,pytest_gpu,bench_gpu,"
                                    "glue_megablocks", 1800)
    assert "FAILED" not in summary, summary
    assert summary.count(": ok") == 7, summary
    bench = (out / "bench_gpu.txt").read_text()
    assert "megablocks" in bench and "skipped: no CUDA" in bench and "torch blocked" in bench
    assert "metrics.csv" in (out / "glue_torch.log").read_text()  # the run wrote its metrics
    assert len(list(out.iterdir())) <= 8  # what a device call brings back


def test_gpu_bench_dry_run_reports_the_cuda_rows_skipped(capsys):
    from bench import gpu

    assert gpu.main(["--dry", "--reps", "1"]) == 0
    text = capsys.readouterr().out
    assert "torch blocked" in text and "floor" in text
    assert "megablocks" in text and "skipped: no CUDA" in text


def test_check_step_timeouts_leave_the_rest(tmp_path):
    # a deadline already spent: every step is skipped, none hangs, the script still ends 0
    out = tmp_path / "out"
    proc = subprocess.run(["bash", "tools/gpu/check", "--dry", "--out", str(out), "--steps", "versions,parity"],
                          cwd=ROOT, env=_env(DEADLINE_S="0"), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    summary = (out / "summary.txt").read_text()
    assert "step versions: skipped: no time left" in summary and "step parity: skipped: no time left" in summary


@pytest.mark.slow
def test_prep_assembles_the_kit_under_the_size_limit(data_dir):
    # needs the registry (pip download); replaces .gpu/
    proc = subprocess.run(["bash", "tools/gpu/prep"], cwd=ROOT, env=_env(PY=sys.executable), capture_output=True,
                          text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    kit = ROOT / ".gpu"
    names = {p.name.split("-")[0].lower() for p in (kit / "wheels").glob("*.whl")}
    assert {"hydra_core", "omegaconf", "antlr4_python3_runtime", "datasets", "dill", "multiprocess"} <= names
    assert len(list((kit / "sdist").glob("*.tar.gz"))) == 3
    assert (kit / "data/glue/CoLA/train.tsv").exists() and (kit / "minilm/vocab.txt").exists()
    size = sum(p.stat().st_size for p in kit.rglob("*") if p.is_file())
    assert size < 32 << 20, size


@pytest.mark.slow
def test_make_megablocks_script_builds_importable_packages(tmp_path):
    # tools/megablocks/build.sh (what `make megablocks` runs) into a scratch target: 8-10 min on 2 cores
    if importlib.util.find_spec("torch") is None or subprocess.run(["which", "nvcc"]).returncode != 0:
        pytest.skip("needs nvcc")
    target = tmp_path / "site"
    proc = subprocess.run(["bash", "tools/megablocks/build.sh", "--python", sys.executable, "--target", str(target)],
                          cwd=ROOT, capture_output=True, text=True, timeout=3600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    imp = subprocess.run([sys.executable, "-c", "import megablocks, stk, grouped_gemm"], capture_output=True,
                         text=True, env={**os.environ, "PYTHONPATH": str(target)})
    assert imp.returncode == 0, imp.stderr


def test_pyproject_admits_the_gpu_hosts_python_and_claims_no_uninstallable_extra():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert meta["requires-python"] == ">=3.11,<3.13"  # 3.12: the GPU hosts; CI: 3.11
    assert "megablocks" not in meta["optional-dependencies"]  # built by `make megablocks` instead
