"""A GLUE run shorter than log_every_n_steps logs its train/routing/curriculum rows, and one whose max_steps ends
inside the first epoch validates after its last step instead of failing in early stopping (real runs)."""

import csv
import os

import pytest
from omegaconf import open_dict

from tasks.job import train


def rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="session")
def run(compose_cfg):
    def run_(tmp_path, *overrides):
        if not os.path.isdir(os.path.join(os.environ.get("RMOE_DATA_DIR", ""), "glue")):
            pytest.skip("RMOE_DATA_DIR is not set to the offline data folder")
        cfg = compose_cfg(["task=glue/rte", "backbone=tiny_bert", "moe=rmoe", "trainer.enable_progress_bar=false",
                           "trainer.enable_model_summary=false", "trainer.num_sanity_val_steps=0", *overrides])
        assert cfg.trainer.val_check_interval is None
        assert "early_stopping" in cfg.callbacks
        with open_dict(cfg):
            cfg.paths.output_dir = str(tmp_path)
        metrics, objects = train(cfg)
        return metrics, objects, rows(tmp_path / "metrics.csv")
    return run_


def test_max_steps_inside_the_first_epoch_validates_at_the_end_and_logs_train_rows(run, tmp_path):
    metrics, objects, table = run(tmp_path, "trainer.max_steps=3", "trainer.limit_val_batches=2",
                                  "data.batch_size=8")
    trainer = objects["trainer"]
    assert trainer.global_step == 3 and trainer.num_training_batches > 3  # RTE: 312 batches of 8
    assert "val/score" in metrics and "val/score_best" in metrics
    val = [r for r in table if r.get("val/score")]
    assert len(val) == 1 and int(val[0]["step"]) == 3  # the step column: updates completed (global_step)
    train_rows = [r for r in table if r.get("train/loss")]
    assert [int(r["step"]) for r in train_rows] == [3]  # the last of the 3 steps (log_every_n_steps 50 -> 3)
    for key in ("curriculum/lambda", "routing/moe0/active_experts"):
        assert any(r.get(key) for r in table), key
    assert list((tmp_path / "checkpoints").glob("best_*.ckpt"))


def test_a_run_longer_than_its_cadences_is_untouched(run, tmp_path):
    _, objects, _ = run(tmp_path, "trainer.max_epochs=1", "trainer.limit_train_batches=6",
                        "trainer.log_every_n_steps=4", "trainer.limit_val_batches=1", "data.batch_size=4")
    trainer = objects["trainer"]
    assert trainer.log_every_n_steps == 4 and trainer.val_check_batch == 6
