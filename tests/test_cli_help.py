"""The command line's conveniences: a missing data root names RMOE_DATA_DIR, `--help` lists examples
and every sweep, `task=` / `experiment=` complete, `make help` lists the targets."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import hydra
import pytest

from tasks.run.cli import complete_nested, group_options
from tasks.train import CONF_DIR

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def _data(compose_cfg):
    def _data_(overrides):
        cfg = compose_cfg(overrides)
        return hydra.utils.instantiate(cfg.data, _convert_="all")
    return _data_


@pytest.mark.parametrize("overrides,key", [
    (["task=glue/rte", "backbone=tiny_bert"], "data.glue_dir=None"),
    (["task=domainbed/rotated_mnist"], "data.root=None"),
    (["task=domainbed/pacs"], "data.root=None"),
])
def test_missing_data_root_names_the_variable_and_the_key(_data, monkeypatch, overrides, key):
    monkeypatch.delenv("RMOE_DATA_DIR", raising=False)
    with pytest.raises(Exception) as err:
        _data(overrides)
    msg = str(err.value)
    assert key in msg and "RMOE_DATA_DIR" in msg and "allowed:" in msg


def test_the_hub_is_used_only_when_asked(_data, monkeypatch):
    monkeypatch.delenv("RMOE_DATA_DIR", raising=False)
    dm = _data(["task=glue/rte", "backbone=tiny_bert", "data.glue_dir=hub"])  # constructing reads nothing
    assert dm.glue_dir is None  # setup() would load nyu-mll/glue


def _help() -> str:
    proc = subprocess.run([sys.executable, "-m", "tasks.train", "--help"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def test_help_shows_examples_groups_and_every_sweep():
    out = _help()
    assert "Examples:" in out and "rmoe-train experiment=glue/cola_rmoe" in out
    assert "task/glue: cola, mnli" in out and "moe: " in out
    listed = set(re.findall(r"^  (\w+) {2,}", out.split("Sweeps", 1)[1], flags=re.M))
    assert listed == {p.stem for p in (ROOT / "sweeps").glob("*.yaml")}


def test_nested_groups_complete(capsys):
    env = {"COMP_LINE": "rmoe-train backbone=tiny_bert task=glue/r"}
    assert complete_nested(["-sc", "query=bash"], CONF_DIR, env)
    assert capsys.readouterr().out.split() == ["task=glue/rte"]
    env = {"COMP_LINE": "rmoe-train experiment="}
    assert complete_nested(["-sc", "query=bash"], CONF_DIR, env)
    words = capsys.readouterr().out.split()
    assert "experiment=domainbed/pacs_rmoe" in words and "experiment=glue/cola_rmoe" in words
    assert len(words) == len(group_options(CONF_DIR, "experiment"))
    # other groups are Hydra's own completion
    assert not complete_nested(["-sc", "query=bash"], CONF_DIR, {"COMP_LINE": "rmoe-train moe="})
    assert not complete_nested(["task=glue/rte"], CONF_DIR, env)


def test_completion_through_the_entry_point():
    env = dict(os.environ, COMP_LINE="rmoe-train task=domainbed/rot")
    proc = subprocess.run([sys.executable, "-m", "tasks.train", "-sc", "query=bash"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.stdout.split() == ["task=domainbed/rotated_digits", "task=domainbed/rotated_mnist"]


def test_make_help_lists_the_targets():
    proc = subprocess.run(["make", "-s", "help"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    for target in ("train", "test", "test-slow", "bench", "reproduce-small", "lint"):
        assert re.search(rf"^\s*{re.escape(target)}\s+\S", proc.stdout, flags=re.M), target
