"""summary.json of a tiny real run against the CSV logger's metrics.csv (an independent record)."""

import csv
import json

import pytest

from tasks.job import train


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(autouse=True)
def _needs_data(data_dir):
    return data_dir


def test_summary_matches_metrics_csv(compose_cfg, tmp_path, monkeypatch):
    # the checkout moves on while the run trains: the record names the commit the run started with
    import callbacks.run_summary as rs

    moved = []
    validated = rs.RunSummaryCallback.on_validation_end

    def on_validation_end(self, *a):  # the checkout moves on once training is under way
        moved.append(True)
        return validated(self, *a)

    monkeypatch.setattr(rs.RunSummaryCallback, "on_validation_end", on_validation_end)
    monkeypatch.setattr(rs, "git_commit", lambda *a: "moved-on" if moved else "at-start")
    cfg = compose_cfg(["backbone=tiny_bert", "debug=fast", "task=glue/rte", "moe=rmoe", "variant=rmoe_test", "seed=3",
                       "data.heldout_samples=16", "trainer.max_epochs=2", "module.lr=3e-4",
                       "callbacks.routing_stability.probe_every_n_steps=2"], output_dir=tmp_path)
    train(cfg)
    s = json.loads((tmp_path / "summary.json").read_text())
    # a debug=fast run logs under its own task name (debug/<task>), never collected as a result
    assert (s["schema"], s["done"], s["benchmark"], s["task_name"], s["task"]) == (1, True, "debug", "debug/rte", "rte")
    assert (s["method"], s["variant"], s["seed"], s["lr"], s["headline"]) == ("rmoe", "rmoe_test", 3, 3e-4, "acc")
    rows = read_csv(tmp_path / "metrics.csv")
    val = [r for r in rows if r.get("val/score")]
    assert len(s["epochs"]) == len(val) == 2
    for i, (e, r) in enumerate(zip(s["epochs"], val)):
        assert (e["epoch"], e["step"]) == (i, 4 * (i + 1))  # debug=fast: 4 optimizer steps per epoch
        assert e["dev"]["score"] == pytest.approx(float(r["val/score"]))
        assert e["dev"]["acc"] == pytest.approx(float(r["val/acc"]))
        assert e["heldout"]["score"] == pytest.approx(float(r["val_heldout/score"]))
    # the last logged value of every routing metric
    for key in ("load_cv", "top1_flip_rate", "jaccard_churn", "fusion_drift", "val_load_cv", "active_experts"):
        col = [float(r[f"routing/moe0/{key}"]) for r in rows if r.get(f"routing/moe0/{key}")]
        assert col, key
        assert s["stability"]["moe0"][key] == pytest.approx(col[-1]), key
    # the lambda history: the linear ramp 1e-3 -> 1e-2 over T = 8 steps; the entry after optimizer
    # step s holds the lambda that step used, i.e. the ramp at tau = s - 1
    assert s["series"]["step"] == list(range(1, 9))  # debug=fast logs every step
    for step, v in zip(s["series"]["step"], s["series"]["lambda"]):
        assert v == pytest.approx(1e-3 + 9e-3 * (step - 1) / 8, rel=1e-5)
    assert len(s["series"]["load"]["moe0"]) == len(s["series"]["step"])
    assert all(sum(row) == pytest.approx(1.0) for row in s["series"]["load"]["moe0"])
    assert s["wall_time_s"] > 0
    assert s["commit"] == "at-start"
