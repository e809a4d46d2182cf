"""The whole path learns: tiny_bert + RMoE layer memorises 64 CoLA sentences (dev = the same rows)."""

import os

import pytest

from tasks.job import train


@pytest.mark.slow  # 160 optimizer steps: ~5 min on 2 loaded cores
def test_tiny_rmoe_memorises_64_sentences(compose_cfg, tmp_path, data_dir):
    glue = tmp_path / "glue" / "CoLA"
    glue.mkdir(parents=True)
    with open(os.path.join(data_dir, "glue", "CoLA", "train.tsv"), encoding="utf-8") as f:
        lines = "".join(next(f) for _ in range(64))
    (glue / "train.tsv").write_text(lines, encoding="utf-8")
    (glue / "dev.tsv").write_text(lines, encoding="utf-8")
    overrides = ["task=glue/cola", "backbone=tiny_bert", "moe=rmoe", f"data.glue_dir={tmp_path / 'glue'}",
                 "data.batch_size=16", "data.max_length=32", "trainer.max_epochs=40", "module.lr=3e-3",
                 "trainer.enable_progress_bar=false", "trainer.num_sanity_val_steps=0", "~callbacks.routing_stability",
                 "callbacks.early_stopping=null"]  # memorisation, not the GLUE protocol's early stop
    cfg = compose_cfg(overrides, output_dir=tmp_path / "run")
    metrics, _ = train(cfg)
    # majority class is 48/64 = 0.75; memorised means (nearly) every row right
    assert metrics["val/acc"] >= 0.95
    assert metrics["val/score_best"] >= 0.9  # Matthews corr.
