"""``logger=csv_tensorboard`` in one tiny real DomainBed run (RMoE on RotatedDigits): the TensorBoard
event file holds the routing scalars (the values metrics.csv holds) and the routing plots as images
after every validation (the pixels of the PNGs in <run>/plots); ``python -m tasks.plots <run>``
redraws the same image set, pixel for pixel, from the run's records alone."""

import csv
import glob
import io
import os

import numpy as np
import pytest
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tasks.job import train
from tasks.plots import main as plots_main
from tasks.results.records import read_run

TINY = ["task=domainbed/rotated_digits", "logger=csv_tensorboard", "trainer.max_steps=7",
        "trainer.val_check_interval=3", "data.batch_size=4", "data.eval_batch_size=256",
        "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
        "backbone.embed_dim=16", "backbone.num_heads=2", "backbone.depth=2", "backbone.moe_layers=[1]",
        "trainer.log_every_n_steps=1", "callbacks.routing_stability.log_every_n_steps=1",
        "callbacks.routing_stability.probe_every_n_steps=1"]


@pytest.fixture(scope="module")
def run(compose_cfg, tmp_path_factory):
    out = tmp_path_factory.mktemp("tb_run")
    cfg = compose_cfg(TINY, output_dir=out)
    metrics, _ = train(cfg)
    events = glob.glob(str(out / "tensorboard" / "events.out.tfevents.*"))
    assert len(events) == 1, events
    ea = EventAccumulator(events[0], size_guidance={"images": 0, "scalars": 0})
    ea.Reload()
    pngs = {os.path.basename(p)[:-4]: p for p in glob.glob(str(out / "plots" / "*.png"))}
    return {"out": out, "ea": ea, "pngs": pngs, "record": read_run(str(out)), "metrics": metrics}


def _pixels(path_or_bytes) -> np.ndarray:
    src = io.BytesIO(path_or_bytes) if isinstance(path_or_bytes, bytes) else path_or_bytes
    return np.asarray(Image.open(src).convert("RGB"))


def test_tensorboard_gets_the_routing_scalars_metrics_csv_holds(run):
    ea, out = run["ea"], run["out"]
    tags = set(ea.Tags()["scalars"])
    for k in ("load_cv", "max_vio", "load_entropy", "dead_experts", "active_experts", "experts_per_token",
              "router_entropy", "aux_loss", "top1_flip_rate", "jaccard_churn", "val_load_cv", "domain_js"):
        assert f"routing/moe0/{k}" in tags, k
    assert {"curriculum/lambda", "val/score"} <= tags
    with open(out / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for key in ("routing/moe0/load_cv", "routing/moe0/top1_flip_rate", "curriculum/lambda"):
        from_csv = {int(r["step"]): float(r[key]) for r in rows if r.get(key)}
        from_tb = {e.step: e.value for e in ea.Scalars(key)}
        assert from_csv and from_tb == pytest.approx(from_csv, rel=1e-6), key


def test_tensorboard_gets_every_plot_after_every_validation(run):
    ea, pngs = run["ea"], run["pngs"]
    assert {"load_heatmap_moe0", "tokens_hist_moe0", "lambda", "fluctuation_moe0", "domain_expert_moe0"} <= set(pngs)
    assert set(ea.Tags()["images"]) == {f"plots/{n}" for n in pngs}
    # DomainBed evaluates after its steps 0, 3 and 6 (the last): global steps 1, 4 and 7; the plots
    # are redrawn each time (a killed run keeps those of its last validation)
    val_steps = [e["step"] for e in run["record"].summary["epochs"]]
    assert val_steps == [1, 4, 7]
    for name, path in pngs.items():
        images = ea.Images(f"plots/{name}")
        # (the fluctuation plot needs two probes: from the second validation on)
        assert [i.step for i in images] == (val_steps[1:] if name.startswith("fluctuation") else val_steps), name
        # the last one is the PNG the run left in <run>/plots (150 dpi: a 7-inch-wide plot is 1050 px)
        last = _pixels(images[-1].encoded_image_string)
        assert np.array_equal(last, _pixels(path)), name
    assert _pixels(pngs["load_heatmap_moe0"]).shape[1] == 7 * 150


def test_redraw_from_the_records_gives_the_same_images(run, tmp_path):
    assert plots_main([str(run["out"]), "--out", str(tmp_path)]) == 0
    redrawn = {os.path.basename(p)[:-4]: p for p in glob.glob(str(tmp_path / "*.png"))}
    assert set(redrawn) == set(run["pngs"])
    for name, path in redrawn.items():
        assert np.array_equal(_pixels(path), _pixels(run["pngs"][name])), name


def test_the_records_name_the_domains_and_the_test_domain(run):
    series = run["record"].summary["series"]
    rows = series["domain_rows"]
    assert [(r["name"], r["split"]) for r in rows] == [(e, s) for s in ("in", "out")
                                                       for e in ("0", "15", "30", "45", "60", "75")]
    assert [r["test"] for r in rows] == [r["name"] == "0" for r in rows]  # data.test_envs=[0]
    assert series["schedule"]["mode"] == "exp_decay" and series["schedule"]["total_steps"] == 7
    assert series["layers"] == {"moe0": "model.blocks.1.mlp.moe"}
    assert len(series["active"]["moe0"]) == len(series["load"]["moe0"]) == len(series["step"])


def test_redraw_of_a_folder_without_summary_is_an_error_naming_it(tmp_path, capsys):
    assert plots_main([str(tmp_path)]) == 1
    assert str(tmp_path) in capsys.readouterr().err


def test_hparams_tab_has_the_config_and_the_final_metrics(run):
    """The hparams plugin data (what TensorBoard's HPARAMS tab reads): the flattened config as the session's
    hyperparameters, the run's final metrics as its metrics, each with a scalar whose last value is the final one."""
    from tensorboard.plugins.hparams import plugin_data_pb2

    ea, metrics = run["ea"], run["metrics"]
    content = ea.PluginTagToContent("hparams")
    data = {tag: plugin_data_pb2.HParamsPluginData.FromString(raw) for tag, raw in content.items()}
    kinds = {d.WhichOneof("data") for d in data.values()}
    assert kinds == {"experiment", "session_start_info", "session_end_info"}
    start = next(d.session_start_info for d in data.values() if d.WhichOneof("data") == "session_start_info")
    assert start.hparams["moe/name"].string_value == "rmoe"
    assert start.hparams["trainer/max_steps"].number_value == 7
    assert start.hparams["data/test_envs"].string_value == "[0]"
    exp = next(d.experiment for d in data.values() if d.WhichOneof("data") == "experiment")
    names = {m.name.tag for m in exp.metric_infos}
    assert "val/score_best" in names and "routing/moe0/load_cv" in names and names == set(metrics)
    for tag in ("val/score_best", "routing/moe0/load_cv"):
        assert ea.Scalars(tag)[-1].value == pytest.approx(metrics[tag], rel=1e-6)
