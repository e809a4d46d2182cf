"""Console and records say each fact once: print_config=false, the config whole off a terminal, one key for the
expert pool size, a multirun summary at the end (real runs and real job folders)."""

from __future__ import annotations

import io
import json
import os

import pytest
from omegaconf import OmegaConf

from callbacks.records import read_jsonl
from tasks.job import _announce, _commit_attempt, train
from tasks.run.console import print_config_tree
from tasks.run.multirun_summary import MultirunSummary


@pytest.fixture(scope="session")
def cfg_of(compose_cfg):
    def cfg_of_(out_dir, *overrides):
        cfg = compose_cfg(["backbone=tiny_bert", "debug=fast", "task=glue/rte", *overrides], output_dir=out_dir)
        return cfg
    return cfg_of_


def test_print_config_false_prints_no_tree_and_still_saves_it(cfg_of, tmp_path, capsys):
    _announce(cfg_of(tmp_path, "print_config=false"), str(tmp_path))
    out = capsys.readouterr().out
    assert "trainer:" not in out and "config (resolved)" not in out and "variant rmoe" in out
    # the resolved config is saved when the attempt's checks passed, whether printed or not
    _commit_attempt(cfg_of(tmp_path, "print_config=false"), str(tmp_path), None, [], None)
    assert (tmp_path / "config_resolved.yaml").is_file()
    _announce(cfg_of(tmp_path), str(tmp_path))
    assert "trainer:" in capsys.readouterr().out


def test_off_a_terminal_the_config_is_printed_whole(cfg_of, tmp_path):
    long_dir = "/data/" + "a-rather-long-folder-name/" * 8 + "glue"
    cfg = cfg_of(tmp_path, f"data.glue_dir={long_dir}")
    buf = io.StringIO()  # not a terminal (a pipe, a Slurm log)
    print_config_tree(cfg, file=buf)
    text = buf.getvalue()
    assert f"glue_dir: {long_dir}\n" in text  # one line of 230+ columns, not cut at 80
    assert OmegaConf.create(text).data.glue_dir == long_dir


def test_one_key_for_the_pool_size(cfg_of, tmp_path):
    metrics, objects = train(cfg_of(tmp_path, "moe=rmoe"))
    assert not [k for k in metrics if k.startswith("moe/")]
    from rmoe.routing import TopAnyRouter

    (router,) = [m for m in objects["model"].modules() if isinstance(m, TopAnyRouter)]
    assert metrics["routing/moe0/active_experts"] == float(router.expert_mask.sum())


def _job(sweep, num, overrides, done=None, attempts=()):
    d = sweep / str(num)
    (d / ".hydra").mkdir(parents=True)
    (d / ".hydra" / "overrides.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(list(overrides))))
    if done is not None:
        (d / "done").write_text(json.dumps({"metrics": done}))
    (d / "attempts.jsonl").write_text("".join(json.dumps(a) + "\n" for a in attempts))


def test_multirun_summary_lists_every_job(tmp_path, capsys):
    sweep = tmp_path / "multiruns" / "x"
    _job(sweep, 0, ["task=glue/rte", "moe=moe_topk", "seed=0"], done={"val/score_best": 0.625})
    _job(sweep, 1, ["task=glue/rte", "moe=rmoe", "seed=0"], done={"val/score_best": 0.6875})
    _job(sweep, 2, ["task=glue/rte", "moe=moe_topk", "seed=1"],
         attempts=[{"event": "start"}, {"event": "failed", "error": "ValueError: bad\nthing"}])
    _job(sweep, 10, ["task=glue/rte", "moe=rmoe", "seed=1"], attempts=[{"event": "start"}])
    MultirunSummary().on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep)}},
                                                        "optimized_metric": "val/score_best"}))
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"multirun: 4 jobs in {sweep}: 2 done, 1 failed, 1 killed"
    assert lines[1].split() == ["job", "overrides", "status", "val/score_best"]
    assert [ln.split()[:4] for ln in lines[2:6]] == [["0", "moe=moe_topk", "seed=0", "done"],
                                                     ["1", "moe=rmoe", "seed=0", "done"],
                                                     ["2", "moe=moe_topk", "seed=1", "failed"],
                                                     ["10", "moe=rmoe", "seed=1", "killed"]]
    assert lines[2].endswith("0.6250") and lines[4].endswith("ValueError: bad thing")
    assert lines[6] == f"best val/score_best: 0.6875 (job 1, {sweep / '1'})"
    assert (sweep / "multirun_summary.txt").read_text().splitlines() == lines
    assert [r["status"] for r in json.loads((sweep / "multirun_summary.json").read_text())] == \
        ["done", "done", "failed", "killed"]


def test_the_summary_callback_is_configured(compose_cfg):
    cfg = compose_cfg(hydra=True)
    assert cfg.hydra.callbacks.multirun_summary._target_ == "tasks.run.multirun_summary.MultirunSummary"


@pytest.mark.parametrize("epoch,max_epochs,text", [(0, 2, "Epoch 0 (of 2)"), (1, 2, "Epoch 1 (of 2)"),
                                                   (3, -1, "Epoch 3")])
def test_epoch_description(epoch, max_epochs, text):
    from tasks.run.console import epoch_description

    assert epoch_description(epoch, max_epochs) == text


def test_one_step_number_per_moment_in_every_record(tmp_path, capsys, compose_cfg):
    """A DomainBed run of 4 updates evaluated after updates 1 and 4: metrics.csv, summary.json (its evaluations
    and its routing series), the best checkpoint's name, the printed table say the same step
    for the same moment -- the updates completed; results.jsonl keeps DomainBed's own step (that number - 1)."""
    import csv

    if not os.path.isdir(os.path.join(os.environ.get("RMOE_DATA_DIR", ""), "mnist")):
        pytest.skip("RMOE_DATA_DIR is not set to the offline data folder (MNIST)")
    cfg = compose_cfg([
        "task=domainbed/rotated_digits", "trainer.max_steps=4", "trainer.val_check_interval=3",
        "trainer.log_every_n_steps=1", "data.batch_size=4", "data.eval_batch_size=256", "logger=csv",
        "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", "backbone.embed_dim=16",
        "backbone.num_heads=2", "backbone.depth=2", "backbone.moe_layers=[1]", "print_config=false"],
        output_dir=tmp_path)
    train(cfg)
    out = capsys.readouterr().out
    evaluated = [1, 4]  # DomainBed's schedule: after the first update and after the last
    assert [r["step"] for r in read_jsonl(tmp_path / "results.jsonl")] == [n - 1 for n in evaluated]
    with open(tmp_path / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows if r.get("val/score")] == evaluated
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [e["step"] for e in summary["epochs"]] == evaluated and summary["global_step"] == 4
    # the routing rows of metrics.csv and the series the plots draw: the same steps
    assert sorted({int(r["step"]) for r in rows if r.get("routing/moe0/load_cv")}) == summary["series"]["step"] \
        == [1, 2, 3, 4]
    scores = {e["step"]: e["dev"]["score"] for e in summary["epochs"]}
    (best,) = list((tmp_path / "checkpoints").glob("best_step*.ckpt"))
    n_best = int(best.stem.removeprefix("best_step"))
    assert n_best in evaluated
    # the table labels: the last evaluation and the one training-domain validation chose (its checkpoint)
    header = next(ln for ln in out.splitlines() if ln.startswith("| domain"))
    assert [c.strip() for c in header.strip("|").split("|")][2:] == ["in @4", "out @4", f"in @{n_best}*",
                                                                      f"out @{n_best}*"]
    assert max(scores.values()) == scores[n_best]  # the checkpoint monitors val/score (max)
