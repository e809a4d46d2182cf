"""tasks.reproduce: the planned grid, job folder names == the folders Hydra makes, export and meta."""

import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from tasks.run import jobs
from tasks.study import driver as reproduce
from tasks.train import CONF_DIR

SWEEPS = str(Path(CONF_DIR).parents[1] / "sweeps")


def test_plan_sizes_match_the_issue():
    glue = reproduce.glue_plan()
    cells = [j for mr in glue for j in mr.jobs]
    # CoLA, MRPC, RTE x 4 methods x 3 seeds + 2 ablations x (MRPC, RTE) x 3 seeds
    assert len(cells) == 3 * 4 * 3 + 2 * 2 * 3 == 48
    assert len({j["name"] for j in cells}) == 48
    db = [j for mr in reproduce.domainbed_plan() for j in mr.jobs]
    # RotatedMNIST 6 + ColoredMNIST 3 test domains x 3 trial seeds x 4 methods
    assert len(db) == (6 + 3) * 3 * 4 == 108 and len({j["name"] for j in db}) == 108


def _subdir(config, overrides):
    with initialize_config_dir(config_dir=SWEEPS, version_base="1.3"):
        # rmoe-train -cd sweeps: the primary config dir is sweeps/, conf/ stays on the search path
        cfg = compose(config_name=config, overrides=[*overrides, f"hydra.searchpath=[file://{CONF_DIR}]"],
                      return_hydra_config=True)
    return cfg.hydra.sweep.subdir, cfg


@pytest.mark.parametrize("job", [0, 20, 40, 47])
def test_glue_job_names_are_the_folders_hydra_makes(job):
    cells = [(mr, j) for mr in reproduce.glue_plan() for j in mr.jobs]
    mr, j = cells[job]
    fixed = [o for o in mr.overrides if not o.startswith("task=")]
    sub, cfg = _subdir(mr.config, [*fixed, f"task=glue/{j['task']}", f"seed={j['seed']}"]
                       + ([] if any(o.startswith("moe=") for o in fixed) else [f"moe={j['variant']}"]))
    assert sub == j["name"]
    assert cfg.skip_if_done is True and cfg.variant == j["variant"]
    if j["variant"] == "rmoe_nofusion":
        assert cfg.moe.fusion is None and cfg.curriculum.mode == "linear_ramp"
    if j["variant"] == "rmoe_nocurriculum":
        assert cfg.moe.fusion is not None and cfg.curriculum.mode == "constant"


@pytest.mark.parametrize("job", [0, 50, 100])
def test_domainbed_job_names_are_the_folders_hydra_makes(job):
    cells = [(mr, j) for mr in reproduce.domainbed_plan() for j in mr.jobs]
    mr, j = cells[job]
    stem = reproduce.DOMAINBED[j["task"]][0]
    sub, cfg = _subdir(mr.config, [f"experiment=domainbed/{stem}_{j['variant']}", f"data.test_envs=[{j['test_env']}]",
                                   f"data.trial_seed={j['trial_seed']}"])
    assert sub == j["name"]
    assert cfg.data.dataset == j["task"] and cfg.data.max_images == 6000 and cfg.trainer.max_steps == 200


def test_pending_export_and_meta(tmp_path):
    plan = reproduce.glue_plan()
    bench_dir = tmp_path / "logs" / "glue"
    first = plan[0].jobs[:3]
    for j in first:  # three finished jobs, one killed (no done file)
        d = bench_dir / j["name"]
        (d / ".hydra").mkdir(parents=True)
        (d / "summary.json").write_text(json.dumps({"variant": j["variant"]}))
        (d / ".hydra" / "overrides.yaml").write_text("- seed=0\n")
        (d / "checkpoints").mkdir()
        (d / "checkpoints" / "last.ckpt").write_bytes(b"x" * 100)
        jobs.mark_done(d, {"val/score": 0.5})
    killed = bench_dir / plan[0].jobs[3]["name"]
    killed.mkdir()
    (killed / "summary.json").write_text("{}")
    assert len(reproduce.pending(plan[0], bench_dir)) == len(plan[0].jobs) - 3
    out = tmp_path / "results"
    assert reproduce.export("glue", plan, bench_dir, out) == 3
    for j in first:
        d = out / "glue" / j["name"]
        assert sorted(p.name for p in d.iterdir()) == [".hydra", "done", "summary.json"]  # no checkpoints
    assert not (out / "glue" / killed.name).exists()
    inv = {"wall_time_s": 12.5, "commit": "abc", "jobs_run": 3}
    meta = json.loads(reproduce.write_meta("glue", plan, out, inv).read_text())
    assert meta["command"] == "make reproduce-glue" and len(meta["expected"]) == 48
    assert meta["expected"][0] == {"task": "cola", "variant": "dense", "seed": 0}
    # a later invocation that ran nothing keeps the recorded ones; one that ran jobs is appended
    reproduce.write_meta("glue", plan, out, None)
    meta = json.loads(reproduce.write_meta("glue", plan, out, dict(inv, jobs_run=1)).read_text())
    assert [i["jobs_run"] for i in meta["invocations"]] == [3, 1]
