"""Run folders (tasks/run/run_folder.py, rmoe-train's main): one process owns a folder, a continuation
happens in place and keeps the history, and nothing a collector counts is left by a run that did not
finish. Real ``python -m tasks.train`` processes on tiny BERT + CoLA; real lock files and CSV files."""

import csv
import json
import logging
import os
import socket
import subprocess
import sys
import time

import pytest
import yaml

from tasks.run import jobs
from tasks.run.metrics_csv import keep_csv_history
from tasks.run.run_folder import (
    LOCK,
    RunFolderBusyError,
    acquire_lock,
    lock_holder,
    plan_from_argv,
    release_lock,
)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
HELPERS = os.path.dirname(os.path.abspath(__file__))  # _run_helpers.py
FAST = ["task=glue/cola", "backbone=tiny_bert", "debug=fast", "moe=moe_topk", "callbacks.routing_stability.plots=false"]


@pytest.fixture(autouse=True)
def _needs_data(data_dir):
    return data_dir


def start(args, run_dir=None):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", WANDB_MODE="offline",
               PYTHONPATH=os.pathsep.join([HELPERS, ROOT, os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "tasks.train", *args, *([f"hydra.run.dir={run_dir}"] if run_dir else [])]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def run(args, run_dir=None, timeout=300):
    proc = start(args, run_dir)
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out + err


def rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished run (one epoch of 4 steps, done); tests copy it before changing it."""
    if not os.path.isdir(os.environ.get("RMOE_DATA_DIR", "")):
        pytest.skip("RMOE_DATA_DIR is not set to the offline data folder")
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    code, out = run(FAST, run_dir)
    assert code == 0, out[-3000:]
    return run_dir


def copy_run(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def counted(folder):
    """Run folders the collectors count below ``folder``: those with a done file (tasks.run.jobs.DONE)."""
    return sorted(str(p.parent) for p in folder.rglob(jobs.DONE) if jobs.is_done(p.parent))


def test_a_second_run_into_a_busy_folder_fails_at_once_naming_the_holder(tmp_path):
    run_dir, ready, go = tmp_path / "run", tmp_path / "ready", tmp_path / "go"
    first = start([*FAST, "seed=0", "+callbacks.wait._target_=_run_helpers.WaitForFile",
                   f"+callbacks.wait.ready={ready}", f"+callbacks.wait.go={go}"], run_dir)
    try:
        t0 = time.monotonic()
        while not ready.exists():  # the first run is training (paused at its first batch)
            assert first.poll() is None, first.communicate()[1][-3000:]
            assert time.monotonic() - t0 < 240
            time.sleep(0.1)
        overrides = (run_dir / ".hydra" / "overrides.yaml").read_text()
        code, out = run([*FAST, "seed=1"], run_dir)  # same folder, another config
        assert code != 0
        holder = lock_holder(run_dir)
        assert holder["pid"] == first.pid and holder["host"] == socket.gethostname()
        host = socket.gethostname()
        assert f"run folder '{run_dir}' is in use by another run: pid {first.pid} on host {host!r}" in out
        assert "allowed: a folder no other run is using" in out
        # the second run changed nothing in the folder: not even Hydra's record of the overrides
        assert (run_dir / ".hydra" / "overrides.yaml").read_text() == overrides
        assert "seed=0" in overrides
    finally:
        go.touch()
        out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-3000:]
    # one run's records: each step logged once, one last checkpoint, the lock gone
    steps = [int(r["step"]) for r in rows(run_dir / "metrics.csv") if r.get("train/loss")]
    assert steps == [1, 2, 3, 4]
    assert sorted(os.listdir(run_dir / "checkpoints")) == ["best_epoch000.ckpt", "last.ckpt"]
    assert jobs.is_done(run_dir) and not (run_dir / LOCK).exists()
    assert "seed=0" in yaml.safe_load((run_dir / ".hydra" / "overrides.yaml").read_text())


def test_stale_lock_of_a_dead_process_is_taken_over_with_a_warning(tmp_path, caplog):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)  # that process has exited
    (tmp_path / LOCK).write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "start": None,
                                             "since": "2026-01-01T00:00:00Z"}))
    with caplog.at_level(logging.WARNING, logger="tasks.run.run_folder"):
        acquire_lock(tmp_path)
    assert f"taking over the stale lock of pid {pid}" in caplog.text
    assert lock_holder(tmp_path)["pid"] == os.getpid()
    acquire_lock(tmp_path)  # re-entrant in the owning process
    release_lock(tmp_path)
    assert (tmp_path / LOCK).exists()
    release_lock(tmp_path)
    assert not (tmp_path / LOCK).exists()
    # a live holder (pid 1, this host) is not taken over; another host's lock cannot be judged
    for holder in ({"pid": 1, "host": socket.gethostname()}, {"pid": pid, "host": "elsewhere.example"}):
        (tmp_path / LOCK).write_text(json.dumps({**holder, "since": "x"}))
        with pytest.raises(RunFolderBusyError, match=f"pid {holder['pid']} on host '{holder['host']}'"):
            acquire_lock(tmp_path)
        assert lock_holder(tmp_path)["pid"] == holder["pid"]


def test_a_checkpoint_path_inside_a_run_folder_continues_that_run_in_place(tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / ".hydra").mkdir(parents=True)
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    argv, where = plan_from_argv(["moe=rmoe", f"ckpt_path={ckpt}"])
    assert where == str(run_dir) and argv[-1] == f"hydra.run.dir={run_dir}"
    # an explicit folder, a multirun, or a checkpoint outside any run folder: left alone
    explicit = [f"ckpt_path={ckpt}", "hydra.run.dir=/x"]
    assert plan_from_argv(explicit) == (explicit, "/x")
    assert plan_from_argv(["-m", f"ckpt_path={ckpt}"])[1] is None
    assert plan_from_argv([f"ckpt_path={tmp_path / 'w.ckpt'}"])[1] is None


def test_continuing_a_finished_run_removes_done_until_it_succeeds_and_keeps_the_history(tmp_path, finished_run):
    run_dir = copy_run(finished_run, tmp_path / "run")  # one epoch of 4 steps
    assert jobs.is_done(run_dir) and len(counted(tmp_path)) == 1
    first = [r for r in rows(run_dir / "metrics.csv")]
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    orphan = run_dir / "checkpoints" / ".tmp-killedsave.ckpt"  # a save killed mid-way leaves this
    orphan.write_bytes(b"partial")

    # a continuation (in place: no hydra.run.dir) that fails in its 2nd epoch: no done, nothing counted
    code, out = run([*FAST, "trainer.max_epochs=2", f"ckpt_path={ckpt}",
                     "+callbacks.fail._target_=_run_helpers.FailAtStep", "+callbacks.fail.step=5",
                     "resume.allow_changes=[trainer.max_epochs,callbacks.fail]"])
    assert code != 0 and "injected failure at step 5" in out
    assert not jobs.is_done(run_dir) and counted(tmp_path) == []
    assert not orphan.exists()
    attempts = [json.loads(line) for line in (run_dir / "attempts.jsonl").read_text().splitlines()]
    assert [a["event"] for a in attempts] == ["start", "done", "start", "failed"]
    assert "injected failure at step 5" in attempts[-1]["error"]
    assert "trainer.max_epochs=2" in attempts[-1]["overrides"]
    # the allowed changes are recorded with the step they apply from (the checkpoint's)
    assert attempts[-2]["resumed_from_step"] == 4
    assert attempts[-2]["changes"] == [
        {"key": "callbacks.fail._target_", "run": "<absent>", "now": "_run_helpers.FailAtStep", "from_step": 4},
        {"key": "callbacks.fail.step", "run": "<absent>", "now": 5, "from_step": 4},
        {"key": "trainer.max_epochs", "run": 1, "now": 2, "from_step": 4}]

    # the next continuation succeeds: done again, and metrics.csv holds the first attempt's rows
    # unchanged followed by the second epoch's (the failed attempt's row past the checkpoint is dropped)
    code, out = run([f"ckpt_path={ckpt}", "~callbacks.fail", "resume.allow_changes=[callbacks.fail]"])
    assert code == 0, out[-3000:]
    assert jobs.is_done(run_dir) and len(counted(tmp_path)) == 1
    final = rows(run_dir / "metrics.csv")
    assert [{k: v for k, v in r.items() if v} for r in final[:len(first)]] == \
        [{k: v for k, v in r.items() if v} for r in first]
    steps = [int(r["step"]) for r in final if r.get("train/loss")]
    assert steps == list(range(1, 9))
    assert len([r for r in final if r.get("val/score")]) == 2
    assert json.loads((run_dir / "summary.json").read_text())["global_step"] == 8


def test_runs_that_would_mix_records_are_refused_before_training(tmp_path, finished_run):
    done_run = copy_run(finished_run, tmp_path / "done_run")
    before = sorted(os.listdir(done_run))
    mtime = (done_run / "metrics.csv").stat().st_mtime_ns
    # a fresh run into a folder holding another run's records
    code, out = run([*FAST, "seed=3"], done_run)
    assert code != 0
    assert f"run folder '{done_run}' already holds the records of another run (done, metrics.csv" in out
    assert "allowed: a new folder" in out
    assert (done_run / "metrics.csv").stat().st_mtime_ns == mtime and sorted(os.listdir(done_run)) == before
    # resuming a run folder's checkpoint into another folder would split its records over two folders
    other = tmp_path / "other"
    ckpt = done_run / "checkpoints" / "last.ckpt"
    code, out = run([*FAST, "trainer.max_epochs=2", f"ckpt_path={ckpt}"], other)
    assert code != 0
    assert f"ckpt_path='{ckpt}' belongs to the run folder '{done_run}', but this run writes to '{other}'" in out
    assert not (other / "metrics.csv").exists() and not jobs.is_done(other)


def test_keep_csv_history_keeps_rows_up_to_the_checkpoint_and_appends(tmp_path):
    """Rows at the checkpoint's step 6: the training row of update 6 is kept, the learning-rate monitor's row
    (no epoch: written before update 7, which the resumed run logs again) is dropped, as is everything later."""
    from lightning.pytorch.loggers import CSVLogger

    path = tmp_path / "metrics.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["a", "lr-Adam", "epoch", "step"])
        for s in range(10):
            w.writerow(["", 0.1, "", s])  # the LR monitor's row before update s + 1
            w.writerow([s * 0.5, "", 0, s])  # the training row of update s
        f.write("9.5,,0")  # a half-written last row (killed mid-write)
    logger = CSVLogger(save_dir=str(tmp_path), name="", version="")
    assert keep_csv_history([logger], resume_step=6) == 13
    logger.log_metrics({"a": 3.0, "b": 7.0}, step=7)  # a new column too: the header grows
    logger.save()
    got = rows(path)
    assert [r["step"] for r in got] == [str(s) for s in range(6) for _ in (0, 1)] + ["6", "7"]
    assert [r["a"] for r in got[1:13:2]] == [str(s * 0.5) for s in range(6)]
    assert got[-2]["a"] == "3.0" and got[-2]["epoch"] == "0"
    assert got[-1]["b"] == "7.0" and got[0]["b"] == ""


def test_half_written_last_line_of_results_jsonl_is_dropped_with_a_warning(tmp_path):
    """A kill while appending an evaluation leaves a cut last line: the resumed run drops it (it is
    evaluated again) naming the file; a malformed line elsewhere is an error naming file and line."""
    from callbacks.domainbed_results import DomainBedResultsCallback

    path = tmp_path / "results.jsonl"
    good = [{"step": 0, "env0_in_acc": 0.5}, {"step": 10, "env0_in_acc": 0.6}]
    path.write_text("".join(json.dumps(r) + "\n" for r in good) + '{"step": 20, "env0_in_a')
    with pytest.warns(UserWarning, match=rf"{path}:3: dropped a half-written last line \(23 characters"):
        assert DomainBedResultsCallback.read(str(path)) == good
    path.write_text(json.dumps(good[0]) + "\n" + "{oops\n" + json.dumps(good[1]) + "\n")
    with pytest.raises(ValueError, match=rf"{path}:2: malformed record .*; allowed: one JSON object per line"):
        DomainBedResultsCallback.read(str(path))


def snapshot(folder):
    """Every file below ``folder`` (hidden ones too) with its bytes and mtime: a record changed shows here."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            out[str(p.relative_to(folder))] = (p.read_bytes(), p.stat().st_mtime_ns)
        else:
            out[str(p.relative_to(folder))] = "dir"
    return out


def test_refused_attempts_leave_a_finished_run_untouched(tmp_path, finished_run):
    """A continuation or fresh run refused by any check (checkpoint file, config, checkpoint fit, run
    folder) changes nothing in a finished run's folder: done, .hydra/, train.log, attempts.jsonl, ..."""
    run_dir = copy_run(finished_run, tmp_path / "run")
    last = (run_dir / "checkpoints" / "last.ckpt").read_bytes()
    (run_dir / "checkpoints" / "truncated.ckpt").write_bytes(last[:3000])
    before = snapshot(run_dir)
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    cases = [
        # a truncated checkpoint of the run (refused when the checkpoint is read)
        ([f"ckpt_path={run_dir / 'checkpoints' / 'truncated.ckpt'}"], "is not a readable checkpoint (truncated"),
        # the run's config changed (another method): refused naming the key and both values
        ([f"ckpt_path={ckpt}", "moe=rmoe"], "moe.name: the run has 'moe_topk', this attempt 'rmoe'"),
        # a change allowed for the config but the checkpoint does not fit (another pool size)
        ([f"ckpt_path={ckpt}", "moe.initial_experts=4", "resume.allow_changes=[moe.initial_experts]"],
         "tensor(s) of another shape"),
        # a fresh run into the finished run's folder
        ([*FAST, "seed=3", f"hydra.run.dir={run_dir}"], "already holds the records of another run"),
    ]
    for args, message in cases:
        code, out = run(args)
        assert code != 0 and message in out, (args, out[-3000:])
        assert snapshot(run_dir) == before, args
    assert counted(tmp_path) == [str(run_dir)]


def test_a_continuation_composes_the_runs_config_and_refuses_changes_naming_both_values(tmp_path, finished_run):
    run_dir = copy_run(finished_run, tmp_path / "run")
    before = snapshot(run_dir)
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    code, out = run([f"ckpt_path={ckpt}", "seed=3", "data.batch_size=16", "module.lr=0.01"])
    assert code != 0
    for line in ("data.batch_size: the run has 8, this attempt 16", "module.lr: the run has 2e-05, this attempt 0.01",
                 "seed: the run has 0, this attempt 3",
                 "resume.allow_changes=[data.batch_size,module.lr,seed]"):
        assert line in out, out[-3000:]
    assert snapshot(run_dir) == before
    # the README's command, nothing else: the run's own config (tiny BERT, moe_topk, CoLA, one epoch),
    # not the defaults (RotatedDigits, RMoE): nothing left to train, done again, its overrides kept
    saved_config = yaml.safe_load((run_dir / ".hydra" / "config.yaml").read_text())
    code, out = run([f"ckpt_path={ckpt}"])
    assert code == 0, out[-3000:]
    assert yaml.safe_load((run_dir / ".hydra" / "config.yaml").read_text()) == {**saved_config, "ckpt_path": str(ckpt)}
    overrides = yaml.safe_load((run_dir / ".hydra" / "overrides.yaml").read_text())
    assert overrides == [*FAST, f"ckpt_path={ckpt}"]
    assert json.loads((run_dir / "summary.json").read_text())["global_step"] == 4
    attempts = [json.loads(line) for line in (run_dir / "attempts.jsonl").read_text().splitlines()]
    assert [a["event"] for a in attempts] == ["start", "done", "start", "done"] and "changes" not in attempts[2]


def test_a_rejected_config_leaves_no_folder_and_no_record(tmp_path):
    run_dir = tmp_path / "logs" / "new"
    code, out = run([*FAST, "trainer.max_steps=0"], run_dir)
    assert code != 0 and "invalid config: trainer.max_steps=0" in out
    assert not run_dir.exists()
    # a refusal after the model and data were built (a checkpoint that does not exist): the same
    code, out = run([*FAST, f"ckpt_path={tmp_path / 'nope.ckpt'}"], run_dir)
    assert code != 0 and "no such file" in out
    assert not run_dir.exists()


@pytest.mark.slow
def test_more_refused_attempts_leave_a_finished_run_untouched(tmp_path, finished_run):
    """The other cases: an empty and a random-bytes checkpoint, a DomainBed config over the GLUE run's
    checkpoint, and a fresh run into the folder while it is busy, reached through an interpolated
    ``hydra.run.dir`` (the lock is taken inside the job, after Hydra started it)."""
    run_dir = copy_run(finished_run, tmp_path / "logs" / "run")
    (run_dir / "checkpoints" / "empty.ckpt").write_bytes(b"")
    (run_dir / "checkpoints" / "noise.ckpt").write_bytes(os.urandom(4096))
    before = snapshot(run_dir)
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    cases = [
        ([f"ckpt_path={run_dir / 'checkpoints' / 'empty.ckpt'}"], "is an empty file (0 bytes)"),
        ([f"ckpt_path={run_dir / 'checkpoints' / 'noise.ckpt'}"], "is not a readable checkpoint"),
        ([f"ckpt_path={ckpt}", "task=domainbed/rotated_digits"],
         "data._target_: the run has 'tasks.glue.datamodule.GLUEDataModule'"),
    ]
    for args, message in cases:
        code, out = run(args)
        assert code != 0 and message in out, (args, out[-3000:])
        assert snapshot(run_dir) == before, args
    # busy: a live holder of the lock (this test process is alive), the folder named through an interpolation
    (run_dir / LOCK).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                            "start": None, "since": "now"}))
    before = snapshot(run_dir)
    code, out = run([*FAST, "seed=5", f"paths.log_dir={tmp_path / 'logs'}", "hydra.run.dir=${paths.log_dir}/run"])
    assert code != 0 and "is in use by another run" in out, out[-3000:]
    assert snapshot(run_dir) == before


def test_continuation_argv_puts_the_runs_overrides_first_and_is_idempotent(tmp_path):
    """A DDP rank Lightning starts gets rank 0's command line and computes it again after rank 0 has
    saved the continuation's overrides: nothing may be added twice (a repeated ``~key`` would fail)."""
    from tasks.run.continuation import continuation_argv

    (tmp_path / ".hydra").mkdir()
    saved = ["moe=moe_topk", "seed=2", "+callbacks.fail.step=6", "ckpt_path=/old.ckpt", "resume.allow_changes=[x]"]
    (tmp_path / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(saved))
    user = ["ckpt_path=/run/last.ckpt", "seed=3", "~callbacks.fail", "resume.allow_changes=[seed,callbacks.fail]"]
    argv = continuation_argv(user, tmp_path)
    assert argv == ["moe=moe_topk", "+callbacks.fail.step=6", *user]
    # rank 0 saved its overrides (Hydra writes the composed command line): computing it again adds nothing
    (tmp_path / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(argv))
    assert continuation_argv([*argv, "hydra.run.dir=/run"], tmp_path) == [*argv, "hydra.run.dir=/run"]
