"""Resuming from a checkpoint that cannot be resumed fails before training, naming the file and why
(tasks/run/resume.py, called by train()); and last.ckpt's save schedule (callbacks/resume.LastCheckpoint)."""

import os
import re

import pytest
import torch

from tasks.job import train
from tasks.run.resume import CheckpointMismatchError

HELPERS = os.path.dirname(os.path.abspath(__file__))
RMOE = ["backbone=tiny_bert", "debug=fast", "task=glue/cola", "moe=rmoe", "moe.initial_experts=2", "moe.max_experts=4"]


@pytest.fixture(scope="session")
def make_cfg(compose_cfg):
    return lambda out_dir, *overrides: compose_cfg(overrides, output_dir=out_dir)


@pytest.fixture(scope="module")
def rmoe_ckpt(make_cfg, tmp_path_factory):
    if not os.path.isdir(os.environ.get("RMOE_DATA_DIR", "")):
        pytest.skip("RMOE_DATA_DIR is not set to the offline data folder")
    out = tmp_path_factory.mktemp("rmoe_run")
    train(make_cfg(out, *RMOE))
    return out / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="session")
def fails_before_training(make_cfg):
    def fails_before_training_(out, exc, match, *overrides):
        with pytest.raises(exc, match=match) as info:
            train(make_cfg(out, *overrides))
        assert not os.path.exists(out / "checkpoints")  # the trainer never started
        return str(info.value)
    return fails_before_training_


def test_checkpoint_of_another_pool_size_names_file_keys_and_shapes(fails_before_training, tmp_path, rmoe_ckpt):
    msg = fails_before_training(tmp_path / "run", CheckpointMismatchError, "does not fit the model",
                                *RMOE[:-1], "moe.max_experts=8", f"ckpt_path={rmoe_ckpt}")
    assert f"ckpt_path='{rmoe_ckpt}'" in msg
    # e.g. "...fusion.m: checkpoint [4], model expects [8]"
    assert re.search(r"fusion\.m: checkpoint \[4\], model expects \[8\]", msg), msg
    assert re.search(r"router\.expert_mask: checkpoint \[4\], model expects \[8\]", msg), msg
    assert "allowed:" in msg


def test_checkpoint_of_another_moe_option_names_missing_and_unexpected_keys(fails_before_training, tmp_path, rmoe_ckpt):
    msg = fails_before_training(tmp_path / "run", CheckpointMismatchError, "does not fit the model",
                                "backbone=tiny_bert", "debug=fast", "task=glue/cola", "moe=dense",
                                f"ckpt_path={rmoe_ckpt}")
    assert f"ckpt_path='{rmoe_ckpt}'" in msg
    # the dense model expects the FFN the MoE layer replaced; the checkpoint has the MoE's tensors
    assert re.search(r"key\(s\) the model expects are missing: encoder\.\S*intermediate\.dense\.weight", msg), msg
    assert re.search(r"key\(s\) the model does not have: \S*moe\.", msg), msg


def test_missing_truncated_and_foreign_files_name_the_path(fails_before_training, tmp_path, rmoe_ckpt):
    missing = tmp_path / "nope" / "last.ckpt"
    fails_before_training(tmp_path / "a", FileNotFoundError, re.escape(f"ckpt_path='{missing}': no such file"),
                          *RMOE, f"ckpt_path={missing}")

    truncated = tmp_path / "truncated.ckpt"
    data = rmoe_ckpt.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])  # a copy cut short (not how our atomic saves fail)
    fails_before_training(tmp_path / "b", ValueError,
                          re.escape(f"ckpt_path='{truncated}' is not a readable checkpoint (truncated or corrupt?)"),
                          *RMOE, f"ckpt_path={truncated}")

    empty = tmp_path / "empty.ckpt"
    empty.write_bytes(b"")
    fails_before_training(tmp_path / "c", ValueError, re.escape(f"ckpt_path='{empty}' is an empty file"),
                          *RMOE, f"ckpt_path={empty}")

    foreign = tmp_path / "weights.pt"
    torch.save({"weights": torch.zeros(2)}, foreign)
    fails_before_training(tmp_path / "d", ValueError,
                          re.escape(f"ckpt_path='{foreign}' is not a Lightning checkpoint: no 'state_dict'"),
                          *RMOE, f"ckpt_path={foreign}")


def test_a_matching_checkpoint_resumes(make_cfg, tmp_path, rmoe_ckpt):
    _, obj = train(make_cfg(tmp_path / "run", *RMOE, "trainer.max_epochs=2", f"ckpt_path={rmoe_ckpt}"))
    assert obj["trainer"].global_step == 8  # 4 restored + 4 more


@pytest.mark.parametrize("every,saves", [(2, [2, 4, 5, 6, 8, 10]), (5, [5, 10])])
def test_last_checkpoint_every_n_steps_and_after_each_validation(make_cfg, tmp_path, monkeypatch, every, saves):
    """5 batches per epoch, 2 epochs, validation at each epoch end. A step save is skipped when the
    epoch's validation follows the batch: the save after the validation (with its score) covers it."""
    monkeypatch.syspath_prepend(HELPERS)
    from _resume_helpers import SaveSpy

    SaveSpy.saves = []
    train(make_cfg(tmp_path, *RMOE, "callbacks.model_checkpoint=null", "trainer.limit_train_batches=5",
                   "trainer.max_epochs=2", f"callbacks.last_checkpoint.every_n_train_steps={every}",
                   "+callbacks.spy._target_=_resume_helpers.SaveSpy"))
    assert [s for s, _ in SaveSpy.saves] == saves
    # saves at an epoch end hold that epoch's validation result; mid-epoch saves the previous one
    scores = dict(SaveSpy.saves)
    assert scores[5] > float("-inf") and (every != 2 or scores[4] == float("-inf"))
    assert os.path.isfile(tmp_path / "checkpoints" / "last.ckpt")
    assert os.listdir(tmp_path / "checkpoints") == ["last.ckpt"]


# --- another architecture: backbone, number of experts, MoE layers -----------------------------
TOPK = ["backbone=tiny_bert", "debug=fast", "task=glue/cola", "moe=moe_topk", "moe.initial_experts=2"]


@pytest.fixture(scope="module")
def topk_ckpt(make_cfg, tmp_path_factory):
    if not os.path.isdir(os.environ.get("RMOE_DATA_DIR", "")):
        pytest.skip("RMOE_DATA_DIR is not set to the offline data folder")
    out = tmp_path_factory.mktemp("topk_run")
    train(make_cfg(out, *TOPK))
    return out / "checkpoints" / "last.ckpt"


def test_checkpoint_of_another_backbone_names_the_embedding_shapes(fails_before_training, tmp_path, rmoe_ckpt):
    # tiny_bert (hidden 32) -> a hidden-64 BERT of the same depth
    msg = fails_before_training(tmp_path / "run", CheckpointMismatchError, "does not fit the model", *RMOE,
                                "backbone.config.hidden_size=64", "backbone.config.intermediate_size=128",
                                f"ckpt_path={rmoe_ckpt}")
    assert re.search(r"embeddings\.word_embeddings\.weight: checkpoint \[30522, 32\], model expects \[30522, 64\]",
                     msg), msg


def test_checkpoint_of_another_number_of_experts_names_the_router_shape(fails_before_training, tmp_path, topk_ckpt):
    msg = fails_before_training(tmp_path / "run", CheckpointMismatchError, "does not fit the model", *TOPK[:-1],
                                "moe.initial_experts=4", f"ckpt_path={topk_ckpt}")
    assert re.search(r"router\.weight: checkpoint \[2, 32\], model expects \[4, 32\]", msg), msg


def test_checkpoint_with_moe_at_other_layers_names_the_missing_and_unexpected_layers(fails_before_training, tmp_path,
                                                                                     rmoe_ckpt):
    msg = fails_before_training(tmp_path / "run", CheckpointMismatchError, "does not fit the model", *RMOE,
                                "moe.layers=[0]", f"ckpt_path={rmoe_ckpt}")
    # the checkpoint has the MoE at encoder layer 1 (tiny_bert's default), the model at layer 0
    assert re.search(r"missing: \S*layer\.0\.\S*moe\.", msg), msg
    assert re.search(r"does not have: \S*layer\.0\.intermediate\.dense\.weight|does not have: \S*layer\.1\.\S*moe\.",
                     msg), msg


# --- another run: same architecture, another task ------------------------------------------------
def test_checkpoint_of_another_task_is_refused_naming_the_difference(fails_before_training, tmp_path, rmoe_ckpt):
    """A CoLA checkpoint resumed into an RTE run of the same architecture would put CoLA's state (and
    its dev scores) into RTE's records: refused before training, nothing recorded."""
    from tasks.run.resume import CheckpointIdentityError

    out = tmp_path / "rte"
    msg = fails_before_training(out, CheckpointIdentityError, "was written by another run",
                                *[o if o != "task=glue/cola" else "task=glue/rte" for o in RMOE],
                                "trainer.max_epochs=2", f"ckpt_path={rmoe_ckpt}")
    assert f"ckpt_path='{rmoe_ckpt}' was written by another run (task_name: checkpoint 'debug/cola', this run " \
           "'debug/rte'; task: checkpoint 'cola', this run 'rte')" in msg  # debug=fast runs: task_name debug/<task>
    assert "allowed: a checkpoint of this run" in msg and "init_from=<ckpt>" in msg
    assert not (out / "summary.json").exists() and not (out / "metrics.csv").exists()
    # the identity written into the checkpoint is the CoLA run's
    saved = torch.load(rmoe_ckpt, weights_only=False)["rmoe_run_identity"]
    assert saved == {"task_name": "debug/cola", "task": "cola", "test_envs": None, "method": "rmoe",
                     "variant": "rmoe", "backbone": "tiny_bert"}


def test_init_from_starts_a_new_run_from_another_tasks_weights(make_cfg, tmp_path, rmoe_ckpt):
    from tasks.glue.module import GLUEModule  # noqa: F401  (instantiated by the config)
    from tasks.run.resume import init_from_checkpoint

    rte = [o if o != "task=glue/cola" else "task=glue/rte" for o in RMOE]
    cfg = make_cfg(tmp_path / "init", *rte)
    import hydra

    model = hydra.utils.instantiate(cfg.module, _convert_="all")
    init_from_checkpoint(rmoe_ckpt, model)
    saved = torch.load(rmoe_ckpt, weights_only=False)["state_dict"]
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())
    # as a run: trains from step 0 and records RTE
    _, obj = train(make_cfg(tmp_path / "run", *rte, f"init_from={rmoe_ckpt}"))
    assert obj["trainer"].global_step == 4
    ident = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)["rmoe_run_identity"]
    assert ident["task"] == "rte"


def test_a_bad_init_from_file_names_init_from_not_ckpt_path(fails_before_training, tmp_path, rmoe_ckpt):
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(open(rmoe_ckpt, "rb").read()[:2000])
    want = re.escape(f"init_from='{truncated}' is not a readable checkpoint (truncated or corrupt?)")
    msg = fails_before_training(tmp_path / "a", ValueError, want, *RMOE, f"init_from={truncated}")
    assert "ckpt_path" not in msg and "init_from=null" in msg
    missing = tmp_path / "missing.ckpt"
    fails_before_training(tmp_path / "b", FileNotFoundError, re.escape(f"init_from='{missing}': no such file"),
                          *RMOE, f"init_from={missing}")
