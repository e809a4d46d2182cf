"""GLUE tables of ``python -m tasks.collect`` and the statistics behind them, by hand.

Sweep (``summary.json`` + ``done`` per run folder), dev score per epoch:

    CoLA rmoe     lr 5e-5  seed 0 (.50 .60 .55)  seed 1 (.62 .58)  seed 2 (.40 .64)
                  -> best dev .60 .62 .64 -> 62.0, SE = std([.60, .62, .64], ddof=1) / √3 = .02 / 1.732 -> 1.2
                  seed 3 (.99): no ``done`` file -> ignored
    CoLA dynmoe   lr 5e-5  seed 0 (.55 .50) -> 55.0 (one seed: no SE; n=1 of up to 3)
    CoLA moe_topk lr 2e-5  seeds .50 .52 (mean .51);  lr 5e-5  seeds .60 .40 (mean .50)
                  -> best lr 2e-5: 51.0, SE = std([.50, .52], ddof=1) / √2 = .01 -> 1.0
    MRPC rmoe     lr 5e-5  seeds .80 .84 .82 -> 82.0 ± 1.2
"""

import json
import math
import os

import numpy as np
import pytest

from tasks.collect import collect, main
from tasks.results.glue import best_lr, cells, heldout_epoch, select_best_dev, select_heldout
from tasks.results.stats import mean_se, noise_verdict, paired_difference


def run(task, variant, seed, lr, devs, heldouts=None):
    heldouts = heldouts or [None] * len(devs)
    return {"schema": 1, "done": True, "benchmark": "glue", "task_name": f"glue/{task}", "task": task,
            "method": variant, "variant": variant, "seed": seed, "lr": lr,
            "headline": {"cola": "mcc", "mrpc": "f1"}[task],
            "epochs": [{"epoch": i, "step": 10 * (i + 1), "dev": {"score": d},
                        "heldout": None if h is None else {"score": h}}
                       for i, (d, h) in enumerate(zip(devs, heldouts))],
            "stability": {}, "series": {}, "wall_time_s": 1.0, "overrides": [], "commit": "abc1234"}


def write(root, name, summary, done=True):
    folder = os.path.join(root, "multiruns", "2026-01-01_00-00-00", name)
    os.makedirs(folder)
    with open(os.path.join(folder, "summary.json"), "w") as f:
        json.dump(summary, f)
    if done:
        open(os.path.join(folder, "done"), "w").close()


SWEEP = [
    run("cola", "rmoe", 0, 5e-5, [.50, .60, .55]), run("cola", "rmoe", 1, 5e-5, [.62, .58]),
    run("cola", "rmoe", 2, 5e-5, [.40, .64]),
    run("cola", "dynmoe", 0, 5e-5, [.55, .50]),
    run("cola", "moe_topk", 0, 2e-5, [.50]), run("cola", "moe_topk", 1, 2e-5, [.52]),
    run("cola", "moe_topk", 0, 5e-5, [.60]), run("cola", "moe_topk", 1, 5e-5, [.40]),
    run("mrpc", "rmoe", 0, 5e-5, [.80]), run("mrpc", "rmoe", 1, 5e-5, [.84]), run("mrpc", "rmoe", 2, 5e-5, [.82]),
]


def make_sweep(root):
    for i, s in enumerate(SWEEP):
        write(root, str(i), s)
    write(root, "99", run("cola", "rmoe", 3, 5e-5, [.99]), done=False)  # still running / crashed


def test_heldout_selection_picks_the_best_heldout_epoch_earliest_on_ties():
    r = run("cola", "rmoe", 0, 5e-5, devs=[.50, .45, .60, .70], heldouts=[.70, .80, .80, None])
    assert heldout_epoch(r) == 1  # .80 at epochs 1 and 2: the earliest; epoch 3 has no held-out score
    assert select_heldout(r) == (.80, .45)
    assert select_best_dev(r) == (.70, .70)
    assert select_heldout(run("cola", "rmoe", 0, 5e-5, devs=[.5, .6])) is None


def test_paired_difference_by_hand():
    a = {0: 1.0, 1: 2.0, 2: 4.0, 3: 100.0}  # seed 3 has no partner: left out
    b = {0: 0.0, 1: 0.0, 2: 0.0}
    p = paired_difference(a, b)
    assert p.n == 3 and p.keys == (0, 1, 2)
    assert p.mean == pytest.approx(7 / 3)
    assert p.se == pytest.approx(np.std([1, 2, 4], ddof=1) / math.sqrt(3))
    assert p.se == pytest.approx(math.sqrt(((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2) / 2 / 3))
    assert noise_verdict(p) == "larger than noise"  # 2.333 > 2 * 0.882
    assert noise_verdict(paired_difference({0: 1.0, 1: -1.0}, {0: 0.0, 1: 0.0})) == "within noise"
    assert noise_verdict(paired_difference({0: 1.0}, {0: 0.0})) == "n < 2"
    assert mean_se([0.5]) == (0.5, None, 1) and mean_se([]) == (None, None, 0)


def test_best_lr_by_mean_ties_to_the_smallest():
    assert best_lr({5e-5: {0: .60, 1: .40}, 2e-5: {0: .50, 1: .52}}) == 2e-5
    assert best_lr({5e-5: {0: .5}, 2e-5: {0: .5}}) == 2e-5
    c = cells(SWEEP)[("cola", "moe_topk")]
    assert c["lr"] == 2e-5 and c["n_lrs"] == 2 and c["scores"] == {0: .50, 1: .52}


def test_collect_glue_table_by_hand(tmp_path, capsys):
    make_sweep(str(tmp_path))
    out = collect(str(tmp_path), fmt="both", save=True)
    assert "Ignored incomplete runs (no `done` file): 1" in out
    assert "Total records (glue): 11" in out
    assert "| Method | CoLA (mcc) | MRPC (f1) |" in out
    assert "| MoE (top-k) | 51.0 ± 1.0 (n=2) (lr 2e-05) |  |" in out
    assert "| DynMoE | 55.0 (n=1) |  |" in out
    # every cell shows its number of seeds; the incomplete seed 3 (.99) is not in the mean
    assert "| RMoE | 62.0 ± 1.2 (n=3) | 82.0 ± 1.2 (n=3) |" in out
    assert "RMoE & 62.0 $\\pm$ 1.2 (n=3) & 82.0 $\\pm$ 1.2 (n=3) \\\\" in out
    assert "GLUE dev, held-out selection" not in out  # no held-out scores: no such table
    assert "ignored (no done file" in capsys.readouterr().err
    assert (tmp_path / "results.md").exists() and (tmp_path / "results.tex").exists()


def test_collect_marks_planned_cells_from_meta_json(tmp_path, capsys):
    make_sweep(str(tmp_path))
    expected = [{"task": t, "variant": v, "seed": s} for t in ("cola", "mrpc")
                for v in ("moe_topk", "dynmoe", "rmoe") for s in (0, 1, 2)]
    with open(tmp_path / "meta.json", "w") as f:
        json.dump({"benchmark": "glue", "command": "make reproduce-glue", "invocations": [],
                   "expected": expected, "shortened": []}, f)
    main(["--input_dir", str(tmp_path), "--format", "markdown", "--no-save"])  # the CLI, in-process
    out = capsys.readouterr().out
    assert "| DynMoE | 55.0 (1/3) | — (0/3) |" in out
    assert "| MoE (top-k) | 51.0 ± 1.0 (2/3) (lr 2e-05) | — (0/3) |" in out
    assert "| RMoE | 62.0 ± 1.2 (3/3) | 82.0 ± 1.2 (3/3) |" in out
    assert "Ignored incomplete runs (no `done` file): 1" in out


def test_heldout_table_when_runs_have_heldout_scores(tmp_path):
    # held-out picks epoch 1 (tie with epoch 2 -> earliest): dev .45 and .55 -> 50.0 ± 5.0
    write(str(tmp_path), "0", run("cola", "rmoe", 0, 5e-5, [.50, .45, .60], [.7, .8, .8]))
    write(str(tmp_path), "1", run("cola", "rmoe", 1, 5e-5, [.50, .55, .60], [.7, .8, .8]))
    out = collect(str(tmp_path), fmt="markdown", save=False)
    best, held = out.split("### GLUE dev, held-out selection")
    assert "| RMoE | 60.0 ± 0.0 (n=2) |" in best
    assert "| RMoE | 50.0 ± 5.0 (n=2) |" in held
