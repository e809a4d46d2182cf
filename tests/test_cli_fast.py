"""rmoe-train answers --help, completion and config errors fast (torch is not imported for them), with one
line per error, a "did you mean" for unknown keys and options, and moe.top_k refused for top-any."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tasks.run.checks import ConfigError, check_overrides

ROOT = Path(__file__).resolve().parents[1]


def rmoe_train(*args, env=None):
    """``python -X importtime -m tasks.train ARGS``: (process, wall seconds, imported module names)."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "tasks.train", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, env=dict(os.environ, **(env or {})))
    wall = time.perf_counter() - t0
    imported = {ln.split("|")[-1].strip() for ln in proc.stderr.splitlines() if ln.startswith("import time:")}
    message = "\n".join(ln for ln in proc.stderr.splitlines() if not ln.startswith("import time:"))
    return proc, message, wall, imported


def test_help_is_fast_and_imports_no_torch():
    proc, _, wall, imported = rmoe_train("--help")
    assert proc.returncode == 0 and "== Configuration groups ==" in proc.stdout and "Examples:" in proc.stdout
    assert "task/glue: cola, mnli, mrpc" in proc.stdout and 'eval "$(rmoe-train -sc install=bash)"' in proc.stdout
    assert "torch" not in imported and "lightning" not in imported and "hydra" not in imported
    assert wall < 2.0, wall  # 0.5-0.6 s measured on the 2-core machine under load; slack for CI


def test_completion_imports_no_torch():
    proc, _, _, imported = rmoe_train("-sc", "query=bash", env={"COMP_LINE": "rmoe-train moe=rm"})
    assert proc.returncode == 0 and proc.stdout.split() == ["moe=rmoe", "moe=rmoe_released"]
    assert "torch" not in imported


def test_a_config_value_error_is_one_line_without_torch(tmp_path):
    proc, msg, wall, imported = rmoe_train("trainer.max_steps=0", f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode == 2
    assert msg.strip().splitlines() == [
        "rmoe-train: error: invalid config: trainer.max_steps=0 (a run of 0 steps trains nothing); allowed: -1 (no "
        "step limit; trainer.max_epochs decides) or an integer >= 1"]
    assert "torch" not in imported and "lightning" not in imported
    assert not (tmp_path / "run" / "attempts.jsonl").exists()  # no attempt started


@pytest.mark.parametrize("args,hint", [
    (["moe.topk=3"], "rmoe-train: unknown key moe.topk; did you mean moe.top_k?"),
    (["trainer.max_step=3"], "rmoe-train: unknown key trainer.max_step; did you mean trainer.max_steps?"),
    (["moe=rmeo"], "rmoe-train: unknown moe=rmeo; did you mean moe=rmoe?"),
    (["task=glue/rt"], "rmoe-train: unknown task=glue/rt; did you mean task=glue/rte?"),
])
def test_unknown_keys_and_options_get_a_did_you_mean(args, hint):
    proc, msg, _, imported = rmoe_train(*args)
    assert proc.returncode == 1 and msg.rstrip().endswith(hint)
    assert "torch" not in imported


@pytest.mark.parametrize("moe,refused", [("rmoe", True), ("dynmoe", True), ("expert_choice", True),
                                         ("moe_topk", False), ("gmoe", False)])
def test_top_k_override_is_refused_for_routers_that_ignore_it(compose_cfg, moe, refused):
    cfg = compose_cfg([f"moe={moe}", "moe.top_k=1"])
    if refused:
        with pytest.raises(ConfigError, match=rf"moe.top_k=1 \(the {cfg.moe.router} router ignores top_k"):
            check_overrides(cfg, [f"moe={moe}", "moe.top_k=1"])
    else:
        check_overrides(cfg, [f"moe={moe}", "moe.top_k=1"])
    check_overrides(cfg, [f"moe={moe}"])  # the group's own top_k is not an override


def test_top_k_100_with_rmoe_is_refused_through_the_cli(tmp_path):
    proc, msg, _, _ = rmoe_train("moe=rmoe", "moe.top_k=100", f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode == 2
    assert "rmoe-train: error: invalid config: moe.top_k=100 (the topany router ignores top_k" in msg


def test_a_moe_field_error_comes_before_the_config_is_printed(tmp_path):
    proc, msg, _, _ = rmoe_train("moe.initial_experts=0", f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode == 2 and "Traceback" not in msg
    assert msg.strip().splitlines() == [
        "rmoe-train: error: invalid config: moe.initial_experts=0; allowed: an integer >= 1"]
    assert "trainer:" not in proc.stdout and "config (resolved)" not in proc.stdout  # no config tree first


def test_rmoe_eval_without_a_checkpoint_is_refused_without_hydra_or_torch():
    """rmoe-eval's front (tasks/eval.py) refuses a command that names no checkpoint before it hands the command to
    tasks.evaluation (Hydra, torch, Lightning)."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "tasks.eval", "task=glue/rte"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    wall = time.perf_counter() - t0
    imported = {ln.split("|")[-1].strip() for ln in proc.stderr.splitlines() if ln.startswith("import time:")}
    assert proc.returncode == 2 and "rmoe-eval: error: ckpt_path is mandatory" in proc.stderr
    assert not imported & {"torch", "lightning", "hydra", "tasks.evaluation"}, sorted(imported & {"torch", "hydra"})
    assert wall < 2.0, wall  # 0.03-0.09 s measured on the 2-core machine under load
