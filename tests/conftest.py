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
