import os

import pytest
import torch

from tasks.resolvers import register_resolvers

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
register_resolvers()  # ${rmoe_data:...}, ${rmoe_seed_hash:...}: tests compose configs without rmoe-train


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def data_dir():
    """Root of the offline data (glue/, mnist/), from $RMOE_DATA_DIR."""
    root = os.environ.get("RMOE_DATA_DIR")
    if not root or not os.path.isdir(root):
        pytest.skip("RMOE_DATA_DIR is not set to the offline data folder")
    return root


def _compose_config(overrides=(), *, config_name: str = "train", config_dir=None, output_dir=None,
                    hydra: bool = False):
    """The config ``rmoe-train``/``rmoe-eval`` would compose: Hydra's compose API on ``config_name`` in
    ``config_dir`` (default: the project's conf/; another folder, e.g. sweeps/, searches conf/ too), with
    ``overrides``; ``output_dir`` sets ``paths.output_dir`` (the run folder Hydra's runtime would give);
    ``hydra=True`` keeps the ``hydra`` node (sweeper params, runtime choices)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import open_dict

    from tasks.train import CONF_DIR

    config_dir = str(config_dir or CONF_DIR)
    extra = [] if config_dir == CONF_DIR else [f"hydra.searchpath=[file://{CONF_DIR}]"]
    with initialize_config_dir(config_dir=config_dir, version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=[*overrides, *extra], return_hydra_config=hydra)
    if output_dir is not None:
        with open_dict(cfg):
            cfg.paths.output_dir = str(output_dir)
    return cfg


@pytest.fixture(scope="session")
def compose_cfg():
    """``compose_cfg(overrides, config_name="train", config_dir=None, output_dir=None, hydra=False)``: the one
    compose-through-Hydra helper of the tests (see :func:`_compose_config`)."""
    return _compose_config


@pytest.fixture(scope="session")
def build_module(compose_cfg):
    """``build_module(overrides, **args)``: the benchmark's LightningModule as ``rmoe-train`` builds it (its
    arguments from conf/module/ and the protocol, composed with ``overrides``), each of ``args`` replacing the
    config's value of that argument (e.g. a tiny ``backbone`` or ``moe`` mapping)."""
    from hydra.utils import get_class
    from omegaconf import OmegaConf

    def build(overrides=(), **args):
        node = OmegaConf.to_container(compose_cfg(overrides).module, resolve=True)
        target = get_class(node.pop("_target_"))
        return target(**{**node, **args})  # the module's own exceptions, not Hydra's wrapper

    return build
