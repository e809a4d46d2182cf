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
    # CoLA, STS-B x 5 methods x 5 seeds + 2 ablations x 2 tasks x 3 seeds + MRPC dense x 5 seeds (gate only)
    assert len(glue) == 2 * 5 * 5 + 2 * 2 * 3 + 5 == 67 and len({j.name for j in glue}) == 67
    assert {j.name for j in glue if j.expected["task"] == "mrpc"} == {f"mrpc_dense_s{s}" for s in range(5)}
    assert {j.expected["variant"] for j in glue} == {"dense", "moe_cosine", "dynmoe", "rmoe", "lossfree",
                                                      "rmoe_nofusion", "rmoe_nocurriculum"}
    assert {j.expected["task"] for j in glue if j.expected["variant"] == "rmoe_nofusion"} == {"cola", "stsb"}
    db = reproduce.domainbed_plan()
    # RotatedMNIST 6 test domains x 3 trial seeds x 5 methods + ColoredMNIST dense 3 test domains x 3 (gate only)
    assert len(db) == 6 * 3 * 5 + 3 * 3 == 99 and len({j.name for j in db}) == 99
    assert {j.expected["variant"] for j in db if j.expected["task"] == "ColoredMNIST"} == {"dense"}
    assert {j.expected["variant"] for j in db} == {"dense", "gmoe", "dynmoe", "rmoe", "lossfree"}
    ceiling = reproduce.ceiling_plan()
    assert [j.name for j in ceiling] == [f"{t}_lr{lr}" for t in ("cola", "mrpc", "rte", "stsb")
                                         for lr in ("5e-05", "0.0001", "0.0002")]


def test_glue_is_seed_major_then_ablations_and_domainbed_trial_seed_major():
    glue = reproduce.glue_plan()
    assert list(dict.fromkeys(j.piece for j in glue)) == [f"seed {s}" for s in range(5)] + [
        "ablation rmoe_nofusion", "ablation rmoe_nocurriculum", "gate only"]
    # the first 30 jobs are every (task, method) cell for seeds 0-2: complete comparisons early
    assert {j.expected["seed"] for j in glue[:30]} == {0, 1, 2}
    assert len({(j.expected["task"], j.expected["variant"]) for j in glue[:30]}) == 10
    db = reproduce.domainbed_plan()
    assert [j.expected["trial_seed"] for j in db[:90]] == sorted(j.expected["trial_seed"] for j in db[:90])
    assert [j.piece for j in db[90:]] == ["gate only"] * 9


@pytest.fixture(scope="session")
def _subdir(compose_cfg):
    def _subdir_(config, overrides):
        # rmoe-train -cd sweeps: the primary config dir is sweeps/, conf/ stays on the search path
        cfg = compose_cfg(overrides, config_name=config, config_dir=SWEEPS, hydra=True)
        return cfg.hydra.sweep.subdir, cfg
    return _subdir_


def _one(job):
    return [*job.fixed, *(f"{k}={v}" for k, v in job.axes)]


@pytest.mark.parametrize("name", ["cola_dense_s0", "stsb_lossfree_s4", "stsb_rmoe_s3", "cola_rmoe_nofusion_s2",
                                  "stsb_rmoe_nocurriculum_s0", "cola_moe_cosine_s1"])
def test_glue_job_names_are_the_folders_hydra_makes(_subdir, name):
    job = {j.name: j for j in reproduce.glue_plan()}[name]
    sub, cfg = _subdir(job.config, _one(job))
    assert sub == name
    assert cfg.skip_if_done is True and cfg.variant == job.expected["variant"] and cfg.study_version == 3
    assert cfg.data.max_train_samples is None and cfg.trainer.max_epochs == 3
    if job.expected["variant"] == "rmoe_nofusion":
        assert cfg.moe.fusion is None and cfg.curriculum.mode == "linear_ramp"
    if job.expected["variant"] == "rmoe_nocurriculum":
        assert cfg.moe.fusion is not None and cfg.curriculum.mode == "constant"
    if job.expected["variant"] == "lossfree":
        assert cfg.moe.router == "lossfree"
    if job.expected["variant"] == "moe_cosine":
        assert cfg.moe.router == "cosine" and cfg.curriculum.mode == "constant"


@pytest.mark.parametrize("name", ["RotatedMNIST_dense_env0_t0", "RotatedMNIST_lossfree_env5_t2",
                                  "ColoredMNIST_dense_env1_t0", "ColoredMNIST_dense_env2_t1"])
def test_domainbed_job_names_are_the_folders_hydra_makes(_subdir, name):
    job = {j.name: j for j in reproduce.domainbed_plan()}[name]
    sub, cfg = _subdir(job.config, _one(job))
    assert sub == name and cfg.study_version == 3
    assert cfg.trainer.max_steps == 1500 and cfg.data.max_images == 20000
    assert cfg.data.dataset == job.expected["task"] and cfg.variant == job.expected["variant"]


@pytest.mark.skipif(not (SWEEPS / "glue_ceiling.yaml").is_file(), reason="sweeps/glue_ceiling.yaml not written yet")
@pytest.mark.parametrize("i", range(12))
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
    assert [(mr.piece, len(mr.jobs)) for mr in runs] == [(f"seed {s}", 10) for s in range(5)] + [
        ("ablation rmoe_nofusion", 6), ("ablation rmoe_nocurriculum", 6), ("gate only", 5)]
    assert runs[0].command() == ("rmoe-train -m -cd sweeps -cn reproduce_glue ++study_version=3 "
                                 "task=glue/cola,glue/stsb moe=dense,moe_cosine,dynmoe,rmoe,lossfree seed=0")
    assert runs[5].overrides == ["moe=rmoe", "variant=rmoe_nofusion", "moe.fusion=null", "++study_version=3",
                                 "task=glue/cola,glue/stsb", "seed=0,1,2"]
    assert [len(mr.jobs) for mr in reproduce.group(reproduce.domainbed_plan())] == [30, 30, 30, 9]


def test_grouping_covers_exactly_the_pending_jobs():
    plan = reproduce.glue_plan()
    done = {"cola_dense_s0", "stsb_dense_s0", "stsb_rmoe_s1", "cola_rmoe_nofusion_s1"}
    todo = [j for j in plan if j.name not in done and j.expected["seed"] != 4]
    runs = reproduce.group(todo)
    got = [j.name for mr in runs for j in mr.jobs]
    assert sorted(got) == sorted(j.name for j in todo)  # each pending job once, nothing else
    order = [j.piece for j in plan].index
    assert [order(mr.piece) for mr in runs] == sorted(order(mr.piece) for mr in runs)  # pieces in plan order
    # seed 0 without CoLA/STS-B dense: the 8 others in one grid
    seed0 = [mr for mr in runs if mr.piece == "seed 0"]
    assert [len(mr.jobs) for mr in seed0] == [8]
    assert "moe=moe_cosine,dynmoe,rmoe,lossfree" in seed0[0].overrides
    assert "task=glue/cola,glue/stsb" in seed0[0].overrides
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
    for j in plan[:10]:
        finish(results / "glue" / j.name, "glue", j)
    finish(results / "glue" / plan[10].name, "glue", plan[10], version=2)  # the superseded study's record
    (results / "glue" / plan[11].name).mkdir(parents=True)  # summary without done
    (results / "glue" / plan[11].name / "summary.json").write_text("{}")
    todo = reproduce.pending("glue", plan, logs, results)
    assert [j.name for j in todo] == [j.name for j in plan[10:]]
    assert not logs.exists()


def test_dry_run_lists_the_pending_multiruns_and_changes_nothing(tmp_path, monkeypatch, caplog):
    results, logs = tmp_path / "results", tmp_path / "logs"
    plan = reproduce.glue_plan()
    for j in plan[:30]:  # seeds 0-2 committed
        finish(results / "glue" / j.name, "glue", j)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    monkeypatch.setattr(reproduce, "launch", lambda *a: pytest.fail("a dry run launched a multirun"))
    with caplog.at_level(logging.INFO, logger="tasks.study.driver"):
        assert reproduce.main(["glue", "--dry-run", "--log_dir", str(logs), "--results_dir", str(results)]) == 0
    would = [r.getMessage() for r in caplog.records if r.getMessage().startswith("would run")]
    assert len(would) == 5
    assert would[0].startswith("would run (seed 3, 10 jobs): rmoe-train -m -cd sweeps -cn reproduce_glue")
    assert "glue: 67 planned jobs, 30 done, 37 to run in 5 multirun(s)" in caplog.text
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


# --- running: export after each multirun, the budget, the second invocation -----------------------
def test_budget_stops_between_multiruns_and_each_multirun_is_exported_at_once(tmp_path, monkeypatch):
    results, logs = tmp_path / "results", tmp_path / "logs"

    def check(fake, mr):  # when a multirun starts, the previous one's records are already exported
        for prev in fake.calls:
            for j in prev.jobs:
                assert reproduce.finished(results / "glue" / j.name, 3), j.name
        meta = results / "glue" / "meta.json"
        if fake.calls:
            inv = json.loads(meta.read_text())["invocations"]
            assert len(inv) == 1 and inv[0]["jobs_run"] == 10 * len(fake.calls)

    fake = FakeLaunch(monkeypatch, minutes_per_run=10, check=check)
    rc = reproduce.main(["small", "--budget-min", "15", "--log_dir", str(logs), "--results_dir", str(results),
                         "--output", str(tmp_path / "RESULTS.md")])
    assert rc == 0
    # t = 0 and t = 10 min start a multirun; at t = 20 min the budget is spent (DomainBed too)
    assert [mr.piece for mr in fake.calls] == ["seed 0", "seed 1"]
    meta = json.loads((results / "glue" / "meta.json").read_text())
    assert meta["study_version"] == 3 and len(meta["expected"]) == 67
    (inv,) = meta["invocations"]
    assert inv["jobs_run"] == 20 and inv["stopped_by_budget"] is True and inv["jobs_not_started"] == 47
    assert inv["wall_time_s"] == 1200.0 and inv["commit"] == "abc1234"
    assert len(list((results / "glue").glob("*/done"))) == 20
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
    finish(old, "glue", plan[0], version=2)  # skip_if_done would skip it
    for j in plan[1:]:
        finish(results / "glue" / j.name, "glue", j)
    fake = FakeLaunch(monkeypatch)
    reproduce.main(["glue", "--log_dir", str(logs), "--results_dir", str(results),
                    "--output", str(tmp_path / "RESULTS.md")])
    assert [[j.name for j in mr.jobs] for mr in fake.calls] == [[plan[0].name]]
    assert (logs / "superseded" / "glue" / plan[0].name / "done").is_file()
    assert reproduce.finished(results / "glue" / plan[0].name, 3)


def test_export_replaces_a_superseded_record_and_meta_keeps_the_old_study_as_previous(tmp_path):
    results, logs = tmp_path / "results", tmp_path / "logs"
    plan = reproduce.glue_plan()
    j = plan[0]
    dst = results / "glue" / j.name
    finish(dst, "glue", j, version=2)
    (dst / "stale.txt").write_text("from the old study")
    finish(logs / "glue" / j.name, "glue", j, checkpoint=True)
    (results / "glue" / "meta.json").write_text(json.dumps({
        "benchmark": "glue", "command": "make reproduce-glue", "shortened": ["old"], "superseded": "why",
        "invocations": [{"wall_time_s": 10.0, "commit": "old", "jobs_run": 48}], "expected": []}))
    assert reproduce.export("glue", plan, logs, results) == 1
    assert sorted(p.name for p in dst.iterdir()) == [".hydra", "done", "summary.json"]  # no checkpoint, no stale
    assert reproduce.finished(dst, 3)
    assert reproduce.export("glue", plan, logs, results) == 0  # a current record stays as it is
    meta = json.loads(reproduce.write_meta("glue", plan, results, {"jobs_run": 1}).read_text())
    assert meta["study_version"] == 3 and [i["jobs_run"] for i in meta["invocations"]] == [1]
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
    # the 11 pending jobs: two grids; the finished one is not launched again
    assert [mr.command() for mr in fake.calls] == [
        "rmoe-train -m -cd sweeps -cn glue_ceiling task=glue/cola,glue/mrpc,glue/rte,glue/stsb module.lr=0.0001,0.0002",
        "rmoe-train -m -cd sweeps -cn glue_ceiling task=glue/mrpc,glue/rte,glue/stsb module.lr=5e-05"]
    assert sorted(p.parent.name for p in (results / "ceiling").glob("*/done")) == sorted(j.name for j in plan)
    assert (results / "ceiling" / "cola_lr5e-05" / "summary.json").is_file()
    meta = json.loads((results / "ceiling" / "meta.json").read_text())
    assert meta["benchmark"] == "ceiling" and meta["command"] == "make reproduce-ceiling"
    assert meta["study_version"] == 1 and meta["expected"][1] == {"task": "cola", "lr": 1e-04}
    assert "GLUE full fine-tune (the ceilings)" in (tmp_path / "RESULTS.md").read_text()
    assert not (results / "glue").exists()  # `ceiling` is not part of `small`, nor `small` of it


def _stopping_launch(monkeypatch, stop_at_call, signame="SIGTERM"):
    """A FakeLaunch whose call number ``stop_at_call`` (0-based) finishes half its jobs, then is signalled."""
    fake = FakeLaunch(monkeypatch, minutes_per_run=10)
    inner = fake.__call__

    def call(mr, log_dir, n_jobs, extra):
        if len(fake.calls) < stop_at_call:
            return inner(mr, log_dir, n_jobs, extra)
        fake.calls.append(mr)
        for j in mr.jobs[: len(mr.jobs) // 2]:
            finish(Path(log_dir) / "glue" / j.name, "glue", j)
        fake.now += 60.0 * 4
        raise reproduce.Stopped(signame)

    monkeypatch.setattr(reproduce, "launch", call)
    return fake


@pytest.mark.parametrize("stop_at_call", [0, 1])
def test_a_signal_stops_the_command_and_exports_what_finished(tmp_path, monkeypatch, stop_at_call):
    """SIGTERM while a multirun runs: the driver stops it, exports its finished jobs, records the invocation
    (appended when it is the command's first multirun, replaced otherwise) and exits 143; the next command
    goes on with the jobs not done."""
    results, logs = tmp_path / "results", tmp_path / "logs"
    (results / "glue").mkdir(parents=True)
    earlier = {"started_utc": "before", "wall_time_s": 5.0, "jobs_run": 0}
    (results / "glue" / "meta.json").write_text(json.dumps({"study_version": 3, "invocations": [earlier]}))
    fake = _stopping_launch(monkeypatch, stop_at_call)
    rc = reproduce.main(["small", "--log_dir", str(logs), "--results_dir", str(results),
                         "--output", str(tmp_path / "RESULTS.md")])
    assert rc == 143
    assert [mr.piece for mr in fake.calls] == [f"seed {s}" for s in range(stop_at_call + 1)]  # DomainBed not begun
    done = 10 * stop_at_call + 5
    assert len(list((results / "glue").glob("*/done"))) == done
    meta = json.loads((results / "glue" / "meta.json").read_text())
    assert meta["invocations"][0] == earlier and len(meta["invocations"]) == 2
    inv = meta["invocations"][1]
    assert inv["stopped_by_signal"] == "SIGTERM" and inv["jobs_run"] == done
    assert inv["jobs_failed_or_unfinished"] == 5 and inv["wall_time_s"] == 60.0 * (10 * stop_at_call + 4)
    assert not (results / "domainbed" / "meta.json").exists()
    assert (tmp_path / "RESULTS.md").is_file()
    # the next command starts with the unfinished half of the stopped multirun
    fake2 = FakeLaunch(monkeypatch)
    reproduce.main(["glue", "--budget-min", "0.001", "--log_dir", str(logs), "--results_dir", str(results),
                    "--output", str(tmp_path / "RESULTS.md")])
    assert len(fake2.calls[0].jobs) == 5 and fake2.calls[0].piece == f"seed {stop_at_call}"


def test_meta_says_why_the_version_2_records_were_superseded(tmp_path):
    results = tmp_path / "results"
    (results / "domainbed").mkdir(parents=True)
    (results / "domainbed" / "meta.json").write_text(json.dumps({
        "study_version": 2, "command": "make reproduce-domainbed", "shortened": ["v2"], "invocations": [{"a": 1}],
        "previous": {"study_version": 1, "superseded": "v1 why"}}))
    meta = json.loads(reproduce.write_meta("domainbed", reproduce.domainbed_plan(), results, None).read_text())
    assert meta["previous"]["study_version"] == 2 and meta["previous"]["invocations"] == [{"a": 1}]
    assert meta["previous"]["superseded"].startswith("its models did not learn: dense RotatedMNIST 54.2 %")
    assert meta["invocations"] == []
    # written by a driver that did not know the reason yet: filled in on the next write, nothing else changes
    m = dict(meta, previous={k: v for k, v in meta["previous"].items() if k != "superseded"})
    (results / "domainbed" / "meta.json").write_text(json.dumps(m))
    again = json.loads(reproduce.write_meta("domainbed", reproduce.domainbed_plan(), results, None).read_text())
    assert again == meta


def test_a_gate_only_cell_is_costed_as_a_full_cell_at_the_donors_ratios(tmp_path):
    """MRPC and ColoredMNIST run only their dense model; what closing their gate costs is a full cell: the
    methods and runs planned on CoLA / RotatedMNIST, each at its job-time (per-step) ratio to dense there."""
    import shutil

    results = tmp_path / "results"
    wall = {"dense": 100.0, "moe_cosine": 150.0, "gmoe": 150.0, "dynmoe": 200.0, "rmoe": 210.0, "lossfree": 160.0,
            "rmoe_nofusion": 190.0, "rmoe_nocurriculum": 200.0}
    for bench in ("glue", "domainbed"):
        plan = reproduce.PLANS[bench]()
        for j in plan:
            folder = results / bench / j.name
            finish(folder, bench, j)
            s = json.loads((folder / "summary.json").read_text())
            s["wall_time_s"] = wall[j.expected["variant"]] * (0.7 if j.expected["task"] == "ColoredMNIST" else 1)
            s["global_step"] = 1500
            (folder / "summary.json").write_text(json.dumps(s))
        reproduce.write_meta(bench, plan, results, None)
    root = Path(reproduce.__file__).resolve().parents[2] / "docs" / "results"
    shutil.copy(root / "glue_dev_labels.json", results / "glue_dev_labels.json")
    shutil.copytree(root / "ceiling", results / "ceiling")
    reproduce.report(results, tmp_path / "RESULTS.md")
    text = (tmp_path / "RESULTS.md").read_text()
    mrpc = next(x for x in text.splitlines() if x.startswith("- **MRPC**"))
    cmnist = next(x for x in text.splitlines() if x.startswith("- **ColoredMNIST**"))
    assert "only its dense model is in the study (a gate check)" in mrpc and "planned on CoLA" in mrpc
    # the ceiling's MRPC jobs (their mean) x the CoLA plan's jobs x each method's ratio to dense on CoLA
    ceil = [json.loads((root / "ceiling" / f"mrpc_lr{lr}" / "summary.json").read_text())["wall_time_s"]
            for lr in ("5e-05", "0.0001", "0.0002")]
    jobs = 5 * (1 + 1.5 + 2.0 + 1.6 + 2.1) + 3 * (1.9 + 2.0)
    assert f"= {fmt(sum(ceil) / 3 * jobs)} of job time" in mrpc
    assert "MoE (cosine) 5 ×" in mrpc and "RMoE w/o fusion 3 ×" in mrpc and "(× 2.10)" in mrpc
    # ColoredMNIST: 9 runs per method at its dense rate (70 s / 1500 steps) x the RotatedMNIST ratios, 5,001 steps
    assert "planned on RotatedMNIST" in cmnist
    assert f"= {fmt(9 * 5001 * 70 / 1500 * (1 + 1.5 + 2.0 + 1.6 + 2.1))} of job time" in cmnist


def fmt(seconds):
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h} h {m:02d} min {sec:02d} s" if h else f"{m} min {sec:02d} s"


def test_the_plan_reads_its_grids_from_the_sweep_files():
    """One home for the study's grids: the driver's plan is the sweeps' hydra.sweeper.params (plus the
    ablations and the gate-only checks, which no sweep grid states), not a copy of them."""
    import yaml

    def grid(name):
        params = yaml.safe_load((SWEEPS / f"{name}.yaml").read_text())["hydra"]["sweeper"]["params"]
        return {k: str(v) for k, v in params.items()}

    g = grid("reproduce_glue")
    main = {(j.expected["task"], j.expected["variant"], j.expected["seed"]) for j in reproduce.glue_plan()
            if not j.piece.startswith(("ablation", "gate"))}
    assert main == {(t.split("/")[1], m, int(s)) for t in g["task"].split(",") for m in g["moe"].split(",")
                    for s in g["seed"].split(",")}
    d = grid("reproduce_domainbed")
    envs = [int(e.strip("[]")) for e in d["data.test_envs"].split(",")]
    db = {(j.expected["variant"], j.expected["test_env"], j.expected["trial_seed"]) for j in reproduce.domainbed_plan()
          if j.piece != "gate only"}
    assert db == {(e.rsplit("_", 1)[1], env, int(t)) for e in d["experiment"].split(",") for env in envs
                  for t in d["data.trial_seed"].split(",")}
    c = grid("glue_ceiling")
    assert {(j.expected["task"], j.expected["lr"]) for j in reproduce.ceiling_plan()} == {
        (t.split("/")[1], float(lr)) for t in c["task"].split(",") for lr in c["module.lr"].split(",")}
