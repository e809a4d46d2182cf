"""README "Add a method": a new router costs the files the walk-through names (at most 3), and nothing else.

The walk-through's numbered file list is read from README.md; the test writes a toy router in exactly those files
(under ``tmp_path``: the class in a module standing for ``rmoe/routing.py``, its ``conf/moe`` option in a config
folder put on Hydra's search path, its test), runs the toy's test, and trains the toy a few steps on
RotatedDigits, which has no protocol cell for it: the composition falls back to the benchmark's baseline cell.
"""

from __future__ import annotations

import importlib.util
import math
import re
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf, open_dict

from rmoe import find_moe_layers
from rmoe.registry import ROUTERS
from tasks.job import train
from tasks.train import CONF_DIR

ROOT = Path(__file__).resolve().parents[1]
NAME = "toy_top1"

TOY_ROUTER = '''
import torch
import torch.nn.functional as F
from torch import nn

from rmoe.registry import ROUTERS
from rmoe.routing import Route, Router


@ROUTERS.register("toy_top1")
class ToyTop1Router(Router):
    """Each token to the top-1 expert of softmax(W x), weighted by its probability."""

    family = "softmax"
    default_aux_loss = "switch"

    def __init__(self, d_model, cfg):
        super().__init__(d_model, cfg)
        self.weight = nn.Parameter(torch.empty(self.max_experts, d_model))
        nn.init.normal_(self.weight, std=0.02)

    def logits(self, x):
        return F.linear(x, self.weight.float())

    def route(self, x, logits):
        probs = torch.softmax(logits, dim=-1)
        top_p, top_i = probs.max(-1, keepdim=True)
        return Route(indices=top_i, weights=top_p, probs=probs)
'''

TOY_MOE = '''
defaults:
  - _layer
  - _self_

name: toy_top1
router: toy_top1
initial_experts: 4
top_k: 1
'''

TOY_TEST = '''
import math

import torch

from rmoe import build_moe_layer


def test_toy_top1_by_hand():
    layer = build_moe_layer(2, 4, router="toy_top1", initial_experts=2, top_k=1).eval()
    with torch.no_grad():
        layer.router.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    _, rec = layer(torch.tensor([[2.0, 0.0], [0.0, 1.0]]))
    assert rec.expert_indices.tolist() == [[0], [1]]
    p = [math.exp(2) / (math.exp(2) + 1), math.e / (math.e + 1)]
    assert torch.allclose(rec.expert_weights.flatten(), torch.tensor(p), atol=1e-6)
'''


def walkthrough_files() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("### Add a method", 1)[1].split("\n#", 1)[0]
    return re.findall(r"^\d+\. `([^`]+)`", section, flags=re.M)


def _load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture
def toy_files(tmp_path):
    """The walk-through's files for the toy, written under tmp_path; the router unregistered afterwards."""
    files = walkthrough_files()
    content = {"rmoe/routing.py": ("rmoe/toy_top1_routing.py", TOY_ROUTER),
               "conf/moe/<name>.yaml": (f"conf/moe/{NAME}.yaml", TOY_MOE),
               "tests/rmoe/test_<name>.py": (f"tests/rmoe/test_{NAME}.py", TOY_TEST)}
    assert files == list(content), "README's Add-a-method file list changed: update this test with it"
    written = {}
    for f in files:
        rel, text = content[f]
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text.lstrip())
        written[f] = tmp_path / rel
    yield written
    if NAME in ROUTERS:
        ROUTERS.unregister(NAME)


def test_the_walkthrough_names_at_most_three_files():
    files = walkthrough_files()
    assert 1 <= len(files) <= 3, files
    # nothing of the benchmarks: no protocol cell, no experiment file, no sweep
    assert not any(f.startswith(("conf/protocol", "conf/experiment", "sweeps")) for f in files), files


@pytest.mark.parametrize("task,baseline_lambda0", [("domainbed/rotated_digits", 1.0), ("glue/rte", 0.01)])
def test_a_method_without_a_cell_gets_the_benchmarks_baseline_cell(toy_files, tmp_path, task, baseline_lambda0):
    overrides = [f"task={task}", f"moe={NAME}", f"hydra.searchpath=[file://{tmp_path / 'conf'}]"]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
        base = compose(config_name="train", overrides=[f"task={task}", "moe=moe_topk"])
    assert not (Path(CONF_DIR) / "protocol" / task.split("/")[0] / f"{NAME}.yaml").exists()
    assert OmegaConf.to_container(cfg.curriculum) == {"mode": "constant", "lambda0": baseline_lambda0}
    # the cell's settings are the baseline's: λ, early stopping, trainer, seed, the expert dropout
    def raw(c, key):  # the value as the files state it (interpolations unresolved)
        node = OmegaConf.to_container(c, resolve=False)
        for part in key.split("."):
            node = (node or {}).get(part)
        return node

    for key in ("curriculum", "callbacks.early_stopping", "trainer", "seed", "moe.expert_dropout",
                "moe.expert_dropout_position"):
        assert raw(cfg, key) == raw(base, key), key
    assert cfg.moe.router == NAME and cfg.variant == NAME


def test_a_toy_router_added_as_the_walkthrough_says_trains(toy_files, tmp_path):
    _load(toy_files["rmoe/routing.py"], "toy_top1_routing")  # registers the router, as rmoe/routing.py would
    toy_test = _load(toy_files["tests/rmoe/test_<name>.py"], "test_toy_top1")
    toy_test.test_toy_top1_by_hand()
    overrides = ["task=domainbed/rotated_digits", f"moe={NAME}", "debug=fast", "trainer.limit_train_batches=3",
                 f"hydra.searchpath=[file://{tmp_path / 'conf'}]"]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "run")
    metrics, obj = train(cfg)
    layers = find_moe_layers(obj["model"])
    assert layers and all(type(m.router).__name__ == "ToyTop1Router" for _, m in layers)
    assert obj["model"].global_step == 3
    assert math.isfinite(float(metrics["val/score_best"]))
    assert len(toy_files) <= 3
