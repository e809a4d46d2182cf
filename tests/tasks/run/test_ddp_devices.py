"""trainer=ddp's process count follows trainer.accelerator (cpu forces CPU processes, also on a GPU host)."""

import pytest
import torch

from tasks.run.distributed import ddp_devices


def test_process_count_follows_the_accelerator():
    assert ddp_devices(3, "cpu") == 3
    assert ddp_devices(3, "gpu") == -1 and ddp_devices(3, "cuda") == -1
    assert ddp_devices(3, "auto") == (-1 if torch.cuda.is_available() else 3)
    with pytest.raises(ValueError, match=r"trainer.accelerator='tpu' for trainer=ddp; allowed: auto\|cpu\|gpu\|cuda"):
        ddp_devices(2, "tpu")


def test_the_composed_trainer_passes_the_accelerator(compose_cfg):
    cfg = compose_cfg(["trainer=ddp", "trainer.accelerator=cpu"])
    assert cfg.trainer.devices.accelerator == "cpu" and cfg.trainer.devices.cpu_processes == 2


def test_ddp_strategy_keeps_each_ranks_buffers(compose_cfg):
    """torch DDP's default broadcast_buffers=True copies rank 0's buffers over the others' before every
    forward, which would replace each rank's recorded DynMoE pool counts with rank 0's (summed twice by
    adapt()); rmoe synchronises its routing buffers itself."""
    import hydra

    cfg = compose_cfg(["trainer=ddp", "trainer.accelerator=cpu"])
    strategy = hydra.utils.instantiate(cfg.trainer.strategy)
    assert strategy._ddp_kwargs == {"find_unused_parameters": True, "broadcast_buffers": False}
