"""What a run prints (tasks.run.console): progress bar, log lines, header, resolved config, summaries, tables.

Real runs: ``rmoe-train`` in a pseudo-terminal 80 columns wide (what a researcher sees), GLUE through
``train(cfg)``, the progress bars on Lightning's BoringModel."""

from __future__ import annotations

import csv
import fcntl
import os
import pty
import re
import select
import shutil
import struct
import subprocess
import sys
import termios
import time
import warnings

import lightning as L
import pytest
import yaml
from lightning.pytorch.demos.boring_classes import BoringModel

from tasks.job import train
from tasks.run.console import StepTQDMProgressBar, progress_bar

EXE = shutil.which("rmoe-train", path=os.path.dirname(sys.executable)) or shutil.which("rmoe-train")
ANSI = re.compile(r"\x1b(\[[0-?]*[ -/]*[@-~]|\][^\x07]*\x07|[@-Z\\-_])")


def run_in_terminal(args: list[str], cwd, columns: int = 80, timeout: float = 600) -> list[str]:
    """Run ``rmoe-train`` with stdout and stderr on a pseudo-terminal ``columns`` wide; the screen's
    lines (ANSI codes removed, each carriage-return redraw reduced to what it leaves)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, columns, 0, 0))
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="offline", COLUMNS=str(columns), TERM="xterm-256color")
    proc = subprocess.Popen([EXE, *args], cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave,
                            close_fds=True)
    os.close(slave)
    chunks, deadline = [], time.monotonic() + timeout
    try:
        while True:
            if time.monotonic() > deadline:
                proc.kill()
                raise TimeoutError(f"rmoe-train did not finish within {timeout} s")
            ready, _, _ = select.select([master], [], [], 1.0)
            if not ready:
                continue
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
    finally:
        os.close(master)
        proc.wait(timeout=60)
    text = ANSI.sub("", b"".join(chunks).decode("utf-8", "replace"))
    lines = [line.split("\r")[-1] for line in text.replace("\r\n", "\n").split("\n")]
    assert proc.returncode == 0, "\n".join(lines[-60:])
    return lines


@pytest.mark.skipif(EXE is None, reason="the rmoe-train console script is not installed")
def test_domainbed_run_console(tmp_path, data_dir):
    """A fresh step-based DomainBed run in an 80-column terminal: the bar counts optimizer steps out of
    max_steps (4 steps of 2 accumulated batches each) with train/loss and val/score; every log line once;
    no "will be deleted" warning; the run header; the resolved config printed and saved; the per-domain
    table intact and within 80 columns (the Rich live console used to hard-wrap it)."""
    run = tmp_path / "run"
    lines = run_in_terminal(["trainer.max_steps=4", "trainer.accumulate_grad_batches=2",
                             "trainer.val_check_interval=2", f"hydra.run.dir={run}"], tmp_path)
    text = "\n".join(lines)
    # progress bar: "Step <bar> k/4 ..." (batches would count to 8), never Lightning's "Epoch 0/-2"
    bar = [ln for ln in lines if ln.startswith("Step ")]
    assert bar, text[-3000:]
    counts = [re.search(r"(\d+)/(\d+)", ln).groups() for ln in bar]
    assert {total for _, total in counts} == {"4"} and counts[-1] == ("4", "4"), counts
    assert all(int(done) <= 4 for done, _ in counts)
    assert "Epoch 0/-2" not in text
    assert "train/loss:" in text and "val/score:" in text and "v_num" not in text
    # each log line once: Lightning's own "INFO: ..." handler is gone, Hydra's format prints it
    assert not [ln for ln in lines if ln.startswith("INFO: ")]
    for msg in ("Seed set to", "`Trainer.fit` stopped: `max_steps=4` reached", "GPU available:"):
        assert sum(msg in ln for ln in lines) == 1, msg
    assert "will be deleted" not in text and "exists and is not empty" not in text
    # header: method, variant, seed, folder
    resolved = yaml.safe_load((run / "config_resolved.yaml").read_text())
    assert f"method  rmoe   variant rmoe   seed {resolved['seed']}" in lines
    assert f"folder  {run}" in lines
    # the resolved config: printed as a tree, saved once with every interpolation resolved
    assert "config (resolved)" in lines and "${" in (run / ".hydra" / "config.yaml").read_text()
    assert "${" not in (run / "config_resolved.yaml").read_text()
    assert resolved["trainer"]["default_root_dir"] == str(run) and resolved["trainer"]["max_steps"] == 4
    assert resolved["callbacks"]["domainbed_results"]["args"]["steps"] == 4
    # the table: 6 domain rows, every line of it (and its notes) within 80 columns, rows not wrapped
    start = next(i for i, ln in enumerate(lines) if ln.startswith("#### RotatedDigits / rmoe"))
    end = next(i for i, ln in enumerate(lines) if i > start and ln.startswith("records: "))
    table = [ln.rstrip() for ln in lines[start:end] if ln.strip()]
    assert max(len(ln) for ln in table) <= 80, table
    rows = [ln for ln in table if ln.startswith("| env")]
    assert len(rows) == 6 and all(ln.endswith("|") and ln.count("|") == 7 for ln in rows), table
    assert any("chosen by training-domain validation" in ln for ln in table)


@pytest.fixture(scope="session")
def glue_cfg(compose_cfg):
    def glue_cfg_(out_dir, *overrides):
        cfg = compose_cfg(["backbone=tiny_bert", "debug=fast", "task=glue/cola", *overrides], output_dir=out_dir)
        return cfg
    return glue_cfg_


def test_glue_progress_bar_metrics_and_summary(glue_cfg, tmp_path, data_dir, capsys):
    """GLUE, 2 epochs of 4 steps: the bar carries train/loss and val/score only; rank 0 prints the best
    dev score with its epoch and step, the last score and the run folder once (checked against metrics.csv)."""
    metrics, obj = train(glue_cfg(tmp_path, "trainer.enable_progress_bar=true", "trainer.max_epochs=2"))
    trainer = obj["trainer"]
    assert type(trainer.progress_bar_callback).__name__ in ("StepRichProgressBar", "StepTQDMProgressBar")
    assert set(trainer.progress_bar_metrics) == {"train/loss", "val/score"}
    out = capsys.readouterr().out
    with open(tmp_path / "metrics.csv", newline="") as f:
        dev = [(int(r["epoch"]), float(r["val/score"])) for r in csv.DictReader(f) if r.get("val/score")]
    assert [e for e, _ in dev] == [0, 1]
    best = max(dev, key=lambda d: d[1])  # the first of equal scores
    lines = out.splitlines()
    assert sum(ln.startswith("#### GLUE CoLA / rmoe / lr ") for ln in lines) == 1
    assert f"dev mcc: best {best[1]:.4f} at epoch {best[0]} (step {4 * (best[0] + 1)})" in lines
    assert f"dev mcc: last {dev[-1][1]:.4f} at epoch 1 (step 8)" in lines
    assert f"run folder: {tmp_path}" in lines
    assert metrics["val/score_best"] == pytest.approx(best[1])


@pytest.mark.parametrize("make_bar", [lambda: progress_bar(), lambda: StepTQDMProgressBar()], ids=["auto", "tqdm"])
def test_step_based_bar_counts_optimizer_steps(tmp_path, make_bar):
    """max_steps=3 with 2 accumulated batches per step: the bar reads 3/3 steps (6 batches ran), described
    as steps; an epoch-based run reads "Epoch e (of E)" over the batches (e: the records' epoch index)."""
    bar = make_bar()
    trainer = L.Trainer(max_steps=3, max_epochs=-1, accumulate_grad_batches=2, callbacks=[bar], logger=False,
                        enable_checkpointing=False, enable_model_summary=False, limit_val_batches=0,
                        default_root_dir=tmp_path)
    trainer.fit(BoringModel())
    assert trainer.global_step == 3 and trainer.fit_loop.epoch_loop.batch_progress.total.completed == 6
    if isinstance(bar, StepTQDMProgressBar):
        assert (bar.train_progress_bar.n, bar.train_progress_bar.total) == (3, 3)
        assert bar.train_progress_bar.desc.startswith("Step")
    else:
        task = bar.progress.tasks[bar.train_progress_bar_id]
        assert (task.completed, task.total) == (3, 3) and task.description.strip().endswith("Step")
    bar = make_bar()
    trainer = L.Trainer(max_epochs=2, limit_train_batches=5, callbacks=[bar], logger=False, limit_val_batches=0,
                        enable_checkpointing=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(BoringModel())
    if isinstance(bar, StepTQDMProgressBar):
        assert (bar.train_progress_bar.n, bar.train_progress_bar.total) == (5, 5)
        assert bar.train_progress_bar.desc.startswith("Epoch 1 (of 2)")
    else:
        task = bar.progress.tasks[bar.train_progress_bar_id]
        assert (task.completed, task.total) == (5, 5) and "Epoch 1 (of 2)" in task.description
        assert "Epoch 1/1" not in task.description  # Lightning's index / last index read as "the last of 1"


def test_fresh_csv_logger_warns_only_when_it_replaces_metrics(tmp_path, caplog):
    """A run folder that holds files (.hydra/, the lock) but no metrics.csv: no warning; one that holds a
    metrics.csv: a warning naming it, and it is replaced."""
    from lightning.pytorch.loggers import CSVLogger

    from tasks.run.metrics_csv import start_csv_history

    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "config.yaml").write_text("a: 1\n")
    lg = CSVLogger(save_dir=str(tmp_path), name="", version="")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        start_csv_history([lg])
        lg.log_metrics({"x": 1.0}, step=0)
        lg.save()
    assert not [w for w in caught if "not empty" in str(w.message)] and not caplog.records
    with open(tmp_path / "metrics.csv", newline="") as f:
        assert [float(r["x"]) for r in csv.DictReader(f)] == [1.0]
    lg2 = CSVLogger(save_dir=str(tmp_path), name="", version="")
    start_csv_history([lg2])
    assert not (tmp_path / "metrics.csv").exists()
    assert any("metrics.csv exists" in r.getMessage() for r in caplog.records)
