"""DomainBed through ``train(cfg)``: composition, results.jsonl records, resume, failures before training."""

import json
import os

import pytest
import torch
from omegaconf import OmegaConf

from tasks.domainbed.datasets import DomainBedDataError
from tasks.job import train

TINY = ["trainer.val_check_interval=3", "data.batch_size=4", "data.eval_batch_size=256", "logger=csv",
        "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
        "backbone.embed_dim=16", "backbone.num_heads=2", "backbone.depth=2", "backbone.moe_layers=[1]"]


@pytest.fixture(scope="session")
def make_cfg(compose_cfg):
    def make_cfg_(out_dir, overrides):
        cfg = compose_cfg(["task=domainbed/rotated_digits"] + overrides, output_dir=out_dir)
        return cfg
    return make_cfg_


def records(out_dir):
    with open(os.path.join(out_dir, "results.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_default_task_is_rmoe_on_rotated_digits_with_a_small_vit(compose_cfg):
    cfg = compose_cfg()
    assert cfg.task_name == "domainbed/rotated_digits"
    assert cfg.data.dataset == "RotatedDigits" and cfg.backbone.name == "vit_tiny"
    assert cfg.moe.name == "rmoe" and cfg.curriculum.mode == "exp_decay"
    assert cfg.module.block_weight == 0.01
    assert cfg.callbacks.adaptive_experts.mode == "every_step"


def test_command_line_groups_win_over_the_task_choices(compose_cfg):
    cfg = compose_cfg(["task=domainbed/pacs", "moe=gmoe", "curriculum=constant"])
    assert cfg.moe.name == "gmoe" and cfg.curriculum.mode == "constant" and cfg.backbone.name == "deit_small"
    assert list(cfg.backbone.moe_layers) == [8, 10] and list(cfg.moe.layers) == [8, 10]


def test_train_resume_and_records(make_cfg, tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    metrics, objs = train(make_cfg(straight, TINY + ["trainer.max_steps=9"]))
    recs = records(straight)
    # DomainBed's schedule and numbering (step = index of the update just taken): after the first
    # update, when step % checkpoint_freq == 0, and after the last update (step 8 of 0..8)
    assert [r["step"] for r in recs] == [0, 3, 6, 8]
    r = recs[-1]
    for i in range(6):
        assert 0.0 <= r[f"env{i}_in_acc"] <= 1.0 and 0.0 <= r[f"env{i}_out_acc"] <= 1.0
    a = r["args"]
    assert (a["dataset"], a["algorithm"], a["test_envs"], a["trial_seed"], a["steps"], a["checkpoint_freq"]) == (
        "RotatedDigits", "rmoe", [0], 0, 9, 3)  # algorithm = the method identity (variant)
    assert r["hparams"]["lr"] == 1e-3 and r["hparams"]["moe"]["router"] == "topany"
    # epoch = step / DomainBed's steps_per_epoch = min_e len(in_e) / batch (240 / 4 = 60 -> 8 / 60)
    assert r["epoch"] == pytest.approx(8 / (min(objs["datamodule"].describe()["in_sizes"]) / 4))
    # val/score: mean out accuracy of the training domains
    assert metrics["val/score"] == pytest.approx(sum(r[f"env{i}_out_acc"] for i in range(1, 6)) / 5, abs=1e-6)

    # 7 updates end on a scheduled evaluation (step 6): its last.ckpt is saved after that evaluation
    train(make_cfg(split, TINY + ["trainer.max_steps=7"]))
    assert [r["step"] for r in records(split)] == [0, 3, 6]
    ckpt = split / "checkpoints" / "last.ckpt"
    assert ckpt.exists()
    _, objs2 = train(make_cfg(split, TINY + ["trainer.max_steps=9", f"ckpt_path={ckpt}"]))
    resumed = records(split)
    assert [r["step"] for r in resumed] == [0, 3, 6, 8]  # step 6 neither lost nor evaluated twice
    # the resumed run sees the same batches and states as the uninterrupted one
    for k in recs[-1]:
        if k.endswith("_acc"):
            assert resumed[-1][k] == pytest.approx(recs[-1][k], abs=1e-6), k
    assert objs2["model"].lambda_aux == pytest.approx(recs[-1]["lambda_aux"])


def test_resume_drops_records_after_the_checkpoint(make_cfg, tmp_path):
    out = tmp_path / "run"
    train(make_cfg(out, TINY + ["trainer.max_steps=6", "callbacks.model_checkpoint.save_last=false",
                                "callbacks.model_checkpoint.monitor=null",
                                "+callbacks.model_checkpoint.every_n_train_steps=3",
                                "callbacks.model_checkpoint.save_top_k=-1",
                                "callbacks.model_checkpoint.filename='s{step}'"]))
    ckpts = sorted(os.listdir(out / "checkpoints"))
    assert "s3.ckpt" in ckpts
    assert [r["step"] for r in records(out)] == [0, 3, 5]
    before = records(out)
    # s3.ckpt: 3 updates (steps 0..2); the records of steps 3 and 5 are dropped, then evaluated again
    train(make_cfg(out, TINY + ["trainer.max_steps=6", f"ckpt_path={out / 'checkpoints' / 's3.ckpt'}"]))
    after = records(out)
    assert [r["step"] for r in after] == [0, 3, 5]
    assert after[0] == before[0]


def test_bad_test_envs_fail_before_training(make_cfg, tmp_path):
    # raised by the datamodule's constructor (Hydra wraps it in an InstantiationException)
    with pytest.raises(Exception, match=r"test_envs=\[7\]: 7 is not an environment of RotatedDigits"):
        train(make_cfg(tmp_path, TINY + ["trainer.max_steps=3", "data.test_envs=[7]"]))
    assert not (tmp_path / "results.jsonl").exists()


def test_missing_data_root_fails_before_training(make_cfg, tmp_path):
    with pytest.raises(DomainBedDataError, match="MNIST idx files not found"):
        train(make_cfg(tmp_path, TINY + ["task=domainbed/rotated_mnist", f"data.root={tmp_path / 'none'}"]))


def test_vit_small_loads_local_weights_and_upcycles_blocks_8_and_10(tmp_path):
    import timm

    from tasks.domainbed.model import build_moe_vit

    ref = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=1000)
    path = tmp_path / "vit_s.pth"
    torch.save({"model": ref.state_dict()}, path)
    backbone = {"name": "vit_small", "arch": "vit_small_patch16_224", "pretrained": True, "weights_path": str(path)}
    moe = {"name": "gmoe", "router": "cosine", "initial_experts": 6, "top_k": 1, "capacity_factor": 1.5,
           "gate_noise": 1.0, "layers": [8, 10], "init": "upcycle"}
    model, layers = build_moe_vit(backbone, moe, (3, 224, 224), 7)
    assert len(layers) == 2 and model.head.out_features == 7
    assert torch.equal(model.patch_embed.proj.weight, ref.patch_embed.proj.weight)
    for b in (8, 10):
        w1 = model.blocks[b].mlp.moe.experts.w1  # [E, d, d_ff] = fc1.weight.T per expert
        for e in range(6):
            assert torch.equal(w1[e], ref.blocks[b].mlp.fc1.weight.t())
    assert not hasattr(model.blocks[9].mlp, "moe")
    with pytest.raises(FileNotFoundError, match="weights_path"):
        build_moe_vit({**backbone, "weights_path": str(tmp_path / "nope.pth")}, moe, (3, 224, 224), 7)


@pytest.mark.parametrize("dataset", ["pacs", "vlcs", "office_home", "domain_net", "terra_incognita"])
def test_the_papers_image_datasets_start_from_deit_s(compose_cfg, dataset):
    """The released vision code builds deit_small_patch16_224(pretrained=True) (R-MoE RMoE/Vision/domainbed/
    algorithms.py; GMoE domainbed/algorithms.py): the DeiT-S/16 ImageNet-1k weights. With no weights_path the hub
    gives that checkpoint, not timm's augreg ViT-S (timm's registry only: no download)."""
    from tasks.domainbed.model import weights_source

    for over in ([f"task=domainbed/{dataset}"], [f"experiment=domainbed/{dataset}_rmoe"]):
        cfg = compose_cfg(over)
        bb = OmegaConf.to_container(cfg.backbone, resolve=True)
        assert (bb["name"], bb["arch"], bb["drop_path_rate"], bb["moe_layers"]) == (
            "deit_small", "deit_small_patch16_224", 0.1, [8, 10]), over
        assert weights_source(bb) == "hub timm/deit_small_patch16_224.fb_in1k"
        assert weights_source({**bb, "weights_path": "/w/deit.pth"}) == "file /w/deit.pth"
        assert weights_source({**bb, "pretrained": False}) is None
    other = weights_source({"arch": "vit_small_patch16_224", "pretrained": True})
    assert other == "hub timm/vit_small_patch16_224.augreg_in21k_ft_in1k"  # what vit_small would have loaded
