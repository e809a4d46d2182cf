"""``trainer.precision=bf16-mixed`` end to end on CPU (Lightning's CPU autocast): every ``moe`` option
trains, validates (sanity check included: eval mode under no_grad) and resumes from a mid-run
``last.ckpt`` to the uninterrupted run's final weights and routing state, tensor by tensor.
``trainer=gpu`` asks for bf16-mixed."""

import os

import pytest
import torch

from tasks.job import train

HELPERS = os.path.dirname(os.path.abspath(__file__))  # _resume_helpers.RaiseAtStep
MOES = ["dense", "moe_topk", "gmoe", "dynmoe", "rmoe", "lossfree", "expert_choice"]
COMMON = ["task=glue/cola", "backbone=tiny_bert", "debug=fast", "++trainer.precision=bf16-mixed",
          "trainer.num_sanity_val_steps=1", "callbacks.last_checkpoint.every_n_train_steps=2",
          "callbacks.routing_stability.plots=false"]


@pytest.fixture(autouse=True)
def _needs_data(data_dir, monkeypatch):
    monkeypatch.syspath_prepend(HELPERS)
    return data_dir


@pytest.fixture(scope="session")
def make_cfg(compose_cfg):
    def make_cfg_(out_dir, *overrides):
        cfg = compose_cfg([*COMMON, *overrides], output_dir=out_dir)
        return cfg
    return make_cfg_


def test_trainer_gpu_is_bf16_mixed(compose_cfg):
    cfg = compose_cfg(["trainer=gpu"])
    assert cfg.trainer.precision == "bf16-mixed" and cfg.trainer.accelerator == "gpu"


@pytest.mark.parametrize("moe", MOES)
def test_bf16_mixed_trains_validates_and_resumes_exactly(make_cfg, tmp_path, moe):
    _, full = train(make_cfg(tmp_path / "full", f"moe={moe}"))
    assert full["trainer"].global_step == 4
    assert full["trainer"].precision_plugin.precision == "bf16-mixed"
    cut = tmp_path / "cut"
    with pytest.raises(RuntimeError, match="interrupted at step 3"):
        train(make_cfg(cut, f"moe={moe}", "+callbacks.stop._target_=_resume_helpers.RaiseAtStep",
                       "+callbacks.stop.step=3"))
    ckpt = cut / "checkpoints" / "last.ckpt"
    assert torch.load(ckpt, weights_only=False)["global_step"] == 2
    _, resumed = train(make_cfg(cut, f"moe={moe}", f"ckpt_path={ckpt}"))
    assert resumed["trainer"].global_step == 4
    a, b = full["model"].state_dict(), resumed["model"].state_dict()
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"differ after resume: {differ[:5]}"
