"""tasks.reproduce: the planned grid and its order, job folder names == the folders Hydra makes, done
detection from docs/results alone, grouping the pending jobs into multiruns, the budget stop, the
export after each multirun, meta.json, the ceiling. No training: ``launch`` is replaced by a fake
that writes the records a finished job leaves."""

import json
import logging
import time
from pathlib import Path

import pytest

from tasks.run import jobs
from tasks.study import driver as reproduce
from tasks.train import CONF_DIR

SWEEPS = Path(CONF_DIR).parents[1] / "sweeps"


# --- helpers ------------------------------------------------------------------------------------
def glue_summary(job, score=0.5):
    """A minimal GLUE summary.json of a planned job (study report schema)."""
    c = job.expected
    epochs = [{"epoch": i, "step": 10 * (i + 1), "dev": {"score": score - .1 + .05 * i}} for i in range(3)]
    return {"schema": 1, "done": True, "benchmark": "glue", "task": c["task"], "variant": c.get("variant", "dense"),
            "method": c.get("variant", "dense"), "seed": c.get("seed", 0), "lr": c.get("lr", 3e-4),
            "headline": "score", "epochs": epochs, "task_name": f"glue/{c['task']}"}


def domainbed_files(job):
    c = job.expected
    n = reproduce.DOMAINBED[c["task"]][1]
    rec = {"step": 100, "epoch": 1.0, "hparams": {}, "args": {"dataset": c["task"], "algorithm": c["variant"],
                                                              "test_envs": [c["test_env"]],
                                                              "trial_seed": c["trial_seed"], "hparams_seed": 0}}
    for i in range(n):
        rec[f"env{i}_in_acc"] = rec[f"env{i}_out_acc"] = .5 + .01 * i
    summary = {"schema": 1, "done": True, "benchmark": "domainbed", "task": c["task"], "variant": c["variant"],
               "method": c["variant"], "seed": 0, "test_envs": [c["test_env"]], "trial_seed": c["trial_seed"],
               "task_name": "domainbed/x"}
    return summary, json.dumps(rec) + "\n"


def finish(folder: Path, bench, job, version=None, checkpoint=False):
    """Write what a finished job leaves in ``folder`` (records of study version ``version``,
    default the current one)."""
    version = reproduce.STUDY_VERSION[bench] if version is None else version
    (folder / ".hydra").mkdir(parents=True, exist_ok=True)
    overrides = [f"{k}={v}" for k, v in job.axes] + list(job.fixed)
    overrides = [o for o in overrides if not o.startswith("++study_version")]
    if version > 1:
        overrides.append(f"++study_version={version}")
    (folder / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    if bench == "domainbed":
        summary, results = domainbed_files(job)
        (folder / "results.jsonl").write_text(results)
    else:
        summary = glue_summary(job)
    (folder / "summary.json").write_text(json.dumps(dict(summary, overrides=overrides)))
    if checkpoint:
        (folder / "checkpoints").mkdir()
        (folder / "checkpoints" / "last.ckpt").write_bytes(b"x" * 100)
    jobs.mark_done(folder, {"val/score": 0.5})


class FakeLaunch:
    """Records each multirun; finishes its jobs in the log dir and advances the fake clock."""

    def __init__(self, monkeypatch, minutes_per_run=0.0, check=None):
        self.calls, self.now, self.minutes, self.check = [], 0.0, minutes_per_run, check
        monkeypatch.setattr(reproduce, "launch", self)
        monkeypatch.setattr(reproduce, "_clock", lambda: self.now)
        monkeypatch.setattr(reproduce, "git_commit", lambda: "abc1234")

    def __call__(self, mr, log_dir, n_jobs, extra):
        if self.check:
            self.check(self, mr)
        self.calls.append(mr)
        bench = {"reproduce_glue": "glue", "reproduce_domainbed": "domainbed", "glue_ceiling": "ceiling"}[mr.config]
        for j in mr.jobs:
            finish(Path(log_dir) / bench / j.name, bench, j)
        self.now += 60.0 * self.minutes
        return 0


# --- the plan -----------------------------------------------------------------------------------
def test_plan_sizes_match_the_issue():
    glue = reproduce.glue_plan()
    # CoLA, MRPC, RTE x 5 methods x 5 seeds + 2 ablations x 3 tasks x 3 seeds
    assert len(glue) == 3 * 5 * 5 + 2 * 3 * 3 == 93 and len({j.name for j in glue}) == 93
    assert {j.expected["variant"] for j in glue} == {"dense", "moe_topk", "dynmoe", "rmoe", "lossfree",
                                                      "rmoe_nofusion", "rmoe_nocurriculum"}
    assert {j.expected["task"] for j in glue if j.expected["variant"] == "rmoe_nofusion"} == {"cola", "mrpc", "rte"}
    db = reproduce.domainbed_plan()
    # RotatedMNIST 6 + ColoredMNIST 3 test domains x 3 trial seeds x 5 methods
    assert len(db) == (6 + 3) * 3 * 5 == 135 and len({j.name for j in db}) == 135
    assert {j.expected["variant"] for j in db} == {"dense", "gmoe", "dynmoe", "rmoe", "lossfree"}
    ceiling = reproduce.ceiling_plan()
    assert [j.name for j in ceiling] == [f"{t}_lr{lr}" for t in ("cola", "mrpc", "rte")
                                         for lr in ("5e-05", "0.0001", "0.0002")]


def test_glue_is_seed_major_then_ablations_and_domainbed_trial_seed_major():
    glue = reproduce.glue_plan()
    assert list(dict.fromkeys(j.piece for j in glue)) == [f"seed {s}" for s in range(5)] + [
        "ablation rmoe_nofusion", "ablation rmoe_nocurriculum"]
    # the first 45 jobs are every (task, method) cell for seeds 0-2: complete comparisons early
    assert {j.expected["seed"] for j in glue[:45]} == {0, 1, 2}
    assert len({(j.expected["task"], j.expected["variant"]) for j in glue[:45]}) == 15
    db = reproduce.domainbed_plan()
    assert [j.expected["trial_seed"] for j in db] == sorted(j.expected["trial_seed"] for j in db)


@pytest.fixture(scope="session")
def _subdir(compose_cfg):
    def _subdir_(config, overrides):
        # rmoe-train -cd sweeps: the primary config dir is sweeps/, conf/ stays on the search path
        cfg = compose_cfg(overrides, config_name=config, config_dir=SWEEPS, hydra=True)
        return cfg.hydra.sweep.subdir, cfg
    return _subdir_


def _one(job):
    return [*job.fixed, *(f"{k}={v}" for k, v in job.axes)]


@pytest.mark.parametrize("name", ["cola_dense_s0", "rte_lossfree_s4", "mrpc_rmoe_s3", "cola_rmoe_nofusion_s2",
                                  "rte_rmoe_nocurriculum_s0"])
def test_glue_job_names_are_the_folders_hydra_makes(_subdir, name):
    job = {j.name: j for j in reproduce.glue_plan()}[name]
    sub, cfg = _subdir(job.config, _one(job))
    assert sub == name
    assert cfg.skip_if_done is True and cfg.variant == job.expected["variant"] and cfg.study_version == 2
    if job.expected["variant"] == "rmoe_nofusion":
        assert cfg.moe.fusion is None and cfg.curriculum.mode == "linear_ramp"
    if job.expected["variant"] == "rmoe_nocurriculum":
        assert cfg.moe.fusion is not None and cfg.curriculum.mode == "constant"
    if job.expected["variant"] == "lossfree":
        assert cfg.moe.router == "lossfree"


@pytest.mark.parametrize("name", ["RotatedMNIST_dense_env0_t0", "RotatedMNIST_lossfree_env5_t2",
                                  "ColoredMNIST_lossfree_env1_t0", "ColoredMNIST_gmoe_env2_t1"])
def test_domainbed_job_names_are_the_folders_hydra_makes(_subdir, name):
    job = {j.name: j for j in reproduce.domainbed_plan()}[name]
    sub, cfg = _subdir(job.config, _one(job))
    assert sub == name and cfg.study_version == 2
    assert cfg.data.dataset == job.expected["task"] and cfg.variant == job.expected["variant"]


@pytest.mark.skipif(not (SWEEPS / "glue_ceiling.yaml").is_file(), reason="sweeps/glue_ceiling.yaml not written yet")
@pytest.mark.parametrize("i", range(9))
def test_ceiling_job_names_are_the_folders_hydra_makes(_subdir, i):
    job = reproduce.ceiling_plan()[i]
    sub, cfg = _subdir(job.config, _one(job))
    assert sub == job.name and "study_version" not in cfg  # version 1: no marker
    assert cfg.data.task == job.expected["task"] and cfg.module.lr == pytest.approx(job.expected["lr"])
    # the driver's axes are the sweep's own grid
    params = cfg.hydra.sweeper.params
    assert sorted(params) == sorted(k for k, _ in job.axes)


# --- grouping -----------------------------------------------------------------------------------
def test_a_fresh_plan_is_one_multirun_per_piece():
    runs = reproduce.group(reproduce.glue_plan())
    assert [(mr.piece, len(mr.jobs)) for mr in runs] == [(f"seed {s}", 15) for s in range(5)] + [
        ("ablation rmoe_nofusion", 9), ("ablation rmoe_nocurriculum", 9)]
    assert runs[0].command() == ("rmoe-train -m -cd sweeps -cn reproduce_glue ++study_version=2 "
                                 "task=glue/cola,glue/mrpc,glue/rte moe=dense,moe_topk,dynmoe,rmoe,lossfree seed=0")
    assert runs[5].overrides == ["moe=rmoe", "variant=rmoe_nofusion", "moe.fusion=null", "++study_version=2",
                                 "task=glue/cola,glue/mrpc,glue/rte", "seed=0,1,2"]
    assert [len(mr.jobs) for mr in reproduce.group(reproduce.domainbed_plan())] == [30, 15] * 3


def test_grouping_covers_exactly_the_pending_jobs():
    plan = reproduce.glue_plan()
    done = {"cola_dense_s0", "mrpc_dense_s0", "rte_rmoe_s1", "cola_rmoe_nofusion_s1"}
    todo = [j for j in plan if j.name not in done and j.expected["seed"] != 4]
    runs = reproduce.group(todo)
    got = [j.name for mr in runs for j in mr.jobs]
    assert sorted(got) == sorted(j.name for j in todo)  # each pending job once, nothing else
    order = [j.piece for j in plan].index
    assert [order(mr.piece) for mr in runs] == sorted(order(mr.piece) for mr in runs)  # pieces in plan order
    # seed 0 without CoLA/MRPC dense: the 13 others in two grids
    seed0 = sorted((mr for mr in runs if mr.piece == "seed 0"), key=lambda mr: len(mr.jobs))
    assert [len(mr.jobs) for mr in seed0] == [1, 12]
    assert [o for o in seed0[0].overrides if o.startswith(("task=", "moe="))] == ["task=glue/rte", "moe=dense"]
    assert "moe=moe_topk,dynmoe,rmoe,lossfree" in seed0[1].overrides
    # each multirun's grid is exactly its jobs (the product of its value lists)
    for mr in runs:
        sizes = [len(o.split("=", 1)[1].split(",")) for o in mr.overrides if o.split("=")[0] in ("task", "moe", "seed")]
        n = 1
        for s in sizes:
            n *= s
        assert n == len(mr.jobs)


def test_done_from_docs_results_alone_on_a_fresh_clone(tmp_path):
    """A fresh clone: no log folder, committed records only. Current records count as done,
    superseded ones (no study_version override) and incomplete ones do not."""
    results, logs = tmp_path / "docs" / "results", tmp_path / "logs"  # logs/ does not exist
    plan = reproduce.glue_plan()
    for j in plan[:15]:
        finish(results / "glue" / j.name, "glue", j)
    finish(results / "glue" / plan[15].name, "glue", plan[15], version=1)  # the superseded study's record
    (results / "glue" / plan[16].name).mkdir(parents=True)  # summary without done
    (results / "glue" / plan[16].name / "summary.json").write_text("{}")
    todo = reproduce.pending("glue", plan, logs, results)
    assert [j.name for j in todo] == [j.name for j in plan[15:]]
    assert not logs.exists()


def test_dry_run_lists_the_pending_multiruns_and_changes_nothing(tmp_path, monkeypatch, caplog):
    results, logs = tmp_path / "results", tmp_path / "logs"
    plan = reproduce.glue_plan()
    for j in plan[:45]:  # seeds 0-2 committed
        finish(results / "glue" / j.name, "glue", j)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    monkeypatch.setattr(reproduce, "launch", lambda *a: pytest.fail("a dry run launched a multirun"))
    with caplog.at_level(logging.INFO, logger="tasks.study.driver"):
        assert reproduce.main(["glue", "--dry-run", "--log_dir", str(logs), "--results_dir", str(results)]) == 0
    would = [r.getMessage() for r in caplog.records if r.getMessage().startswith("would run")]
    assert len(would) == 4
    assert would[0].startswith("would run (seed 3, 15 jobs): rmoe-train -m -cd sweeps -cn reproduce_glue")
    assert "glue: 93 planned jobs, 45 done, 48 to run in 4 multirun(s)" in caplog.text
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


# --- running: export after each multirun, the budget, the second invocation -----------------------
def test_budget_stops_between_multiruns_and_each_multirun_is_exported_at_once(tmp_path, monkeypatch):
    results, logs = tmp_path / "results", tmp_path / "logs"

    def check(fake, mr):  # when a multirun starts, the previous one's records are already exported
        for prev in fake.calls:
            for j in prev.jobs:
                assert reproduce.finished(results / "glue" / j.name, 2), j.name
        meta = results / "glue" / "meta.json"
        if fake.calls:
            inv = json.loads(meta.read_text())["invocations"]
            assert len(inv) == 1 and inv[0]["jobs_run"] == 15 * len(fake.calls)

    fake = FakeLaunch(monkeypatch, minutes_per_run=10, check=check)
    rc = reproduce.main(["small", "--budget-min", "15", "--log_dir", str(logs), "--results_dir", str(results),
                         "--output", str(tmp_path / "RESULTS.md")])
    assert rc == 0
    # t = 0 and t = 10 min start a multirun; at t = 20 min the budget is spent (DomainBed too)
    assert [mr.piece for mr in fake.calls] == ["seed 0", "seed 1"]
    meta = json.loads((results / "glue" / "meta.json").read_text())
    assert meta["study_version"] == 2 and len(meta["expected"]) == 93
    (inv,) = meta["invocations"]
    assert inv["jobs_run"] == 30 and inv["stopped_by_budget"] is True and inv["jobs_not_started"] == 63
    assert inv["wall_time_s"] == 1200.0 and inv["commit"] == "abc1234"
    assert len(list((results / "glue").glob("*/done"))) == 30
    assert not (results / "domainbed" / "meta.json").exists() or not json.loads(
        (results / "domainbed" / "meta.json").read_text())["invocations"]
    # the next invocation goes on where this one stopped
    fake.calls.clear()
    reproduce.main(["glue", "--budget-min", "5", "--log_dir", str(logs), "--results_dir", str(results),
                    "--output", str(tmp_path / "RESULTS.md")])
    assert [mr.piece for mr in fake.calls] == ["seed 2"]
    assert len(json.loads((results / "glue" / "meta.json").read_text())["invocations"]) == 2


def test_second_invocation_runs_nothing_and_keeps_results_md(tmp_path, monkeypatch):
    """Everything done in docs/results (no log folder): no multirun, the same RESULTS.md, fast."""
    results, logs = tmp_path / "results", tmp_path / "logs"
    fake = FakeLaunch(monkeypatch)
    for bench in ("glue", "domainbed"):
        for j in reproduce.PLANS[bench]():
            finish(results / bench / j.name, bench, j)
    args = ["small", "--log_dir", str(logs), "--results_dir", str(results), "--output", str(tmp_path / "RESULTS.md")]
    assert reproduce.main(args) == 0
    first = (tmp_path / "RESULTS.md").read_bytes()
    metas = {b: (results / b / "meta.json").read_bytes() for b in ("glue", "domainbed")}
    t0 = time.perf_counter()
    assert reproduce.main(args) == 0
    assert time.perf_counter() - t0 < 60
    assert fake.calls == []
    assert (tmp_path / "RESULTS.md").read_bytes() == first
    assert {b: (results / b / "meta.json").read_bytes() for b in ("glue", "domainbed")} == metas
    assert json.loads(metas["glue"])["invocations"] == []  # nothing was trained


def test_a_done_log_folder_of_the_superseded_study_is_set_aside_and_rerun(tmp_path, monkeypatch):
    results, logs = tmp_path / "results", tmp_path / "logs"
    plan = reproduce.glue_plan()
    old = logs / "glue" / plan[0].name
    finish(old, "glue", plan[0], version=1)  # skip_if_done would skip it
    for j in plan[1:]:
        finish(results / "glue" / j.name, "glue", j)
    fake = FakeLaunch(monkeypatch)
    reproduce.main(["glue", "--log_dir", str(logs), "--results_dir", str(results),
                    "--output", str(tmp_path / "RESULTS.md")])
    assert [[j.name for j in mr.jobs] for mr in fake.calls] == [[plan[0].name]]
    assert (logs / "superseded" / "glue" / plan[0].name / "done").is_file()
    assert reproduce.finished(results / "glue" / plan[0].name, 2)


def test_export_replaces_a_superseded_record_and_meta_keeps_the_old_study_as_previous(tmp_path):
    results, logs = tmp_path / "results", tmp_path / "logs"
    plan = reproduce.glue_plan()
    j = plan[0]
    dst = results / "glue" / j.name
    finish(dst, "glue", j, version=1)
    (dst / "stale.txt").write_text("from the old study")
    finish(logs / "glue" / j.name, "glue", j, checkpoint=True)
    (results / "glue" / "meta.json").write_text(json.dumps({
        "benchmark": "glue", "command": "make reproduce-glue", "shortened": ["old"], "superseded": "why",
        "invocations": [{"wall_time_s": 10.0, "commit": "old", "jobs_run": 48}], "expected": []}))
    assert reproduce.export("glue", plan, logs, results) == 1
    assert sorted(p.name for p in dst.iterdir()) == [".hydra", "done", "summary.json"]  # no checkpoint, no stale
    assert reproduce.finished(dst, 2)
    assert reproduce.export("glue", plan, logs, results) == 0  # a current record stays as it is
    meta = json.loads(reproduce.write_meta("glue", plan, results, {"jobs_run": 1}).read_text())
    assert meta["study_version"] == 2 and [i["jobs_run"] for i in meta["invocations"]] == [1]
    assert meta["previous"] == {"command": "make reproduce-glue", "invocations": [
        {"wall_time_s": 10.0, "commit": "old", "jobs_run": 48}], "shortened": ["old"], "superseded": "why",
        "study_version": 1}
    assert "superseded" not in meta and meta["expected"][0] == {"task": "cola", "variant": "dense", "seed": 0}
    meta = json.loads(reproduce.write_meta("glue", plan, results, {"jobs_run": 2}, replace_last=True).read_text())
    assert [i["jobs_run"] for i in meta["invocations"]] == [2] and meta["previous"]["invocations"][0]["commit"] == "old"
    meta = json.loads(reproduce.write_meta("glue", plan, results, {"jobs_run": 3}).read_text())
    assert [i["jobs_run"] for i in meta["invocations"]] == [2, 3]


def test_ceiling_runs_its_sweep_and_exports_to_docs_results_ceiling(tmp_path, monkeypatch):
    results, logs = tmp_path / "results", tmp_path / "logs"
    plan = reproduce.ceiling_plan()
    finish(logs / "ceiling" / plan[0].name, "ceiling", plan[0])  # finished by hand (no version marker)
    fake = FakeLaunch(monkeypatch)
    reproduce.main(["ceiling", "--log_dir", str(logs), "--results_dir", str(results),
                    "--output", str(tmp_path / "RESULTS.md")])
    # the 8 pending jobs: two grids; the finished one is not launched again
    assert [mr.command() for mr in fake.calls] == [
        "rmoe-train -m -cd sweeps -cn glue_ceiling task=glue/cola,glue/mrpc,glue/rte module.lr=0.0001,0.0002",
        "rmoe-train -m -cd sweeps -cn glue_ceiling task=glue/mrpc,glue/rte module.lr=5e-05"]
    assert sorted(p.parent.name for p in (results / "ceiling").glob("*/done")) == sorted(j.name for j in plan)
    assert (results / "ceiling" / "cola_lr5e-05" / "summary.json").is_file()
    meta = json.loads((results / "ceiling" / "meta.json").read_text())
    assert meta["benchmark"] == "ceiling" and meta["command"] == "make reproduce-ceiling"
    assert meta["study_version"] == 1 and meta["expected"][1] == {"task": "cola", "lr": 1e-04}
    assert "GLUE full fine-tune (the ceilings)" in (tmp_path / "RESULTS.md").read_text()
    assert not (results / "glue").exists()  # `ceiling` is not part of `small`, nor `small` of it
