"""``python -m tasks.collect`` on a small synthetic sweep (nested like Hydra multirun folders).

ColoredMNIST (3 domains), one record per run. Selected test accuracies (env{t}_in_acc), ± as DomainBed's
``domainbed/scripts/collect_results.py`` ``format_mean``: ``np.std(data / sqrt(n))`` = population std (ddof 0) /
sqrt(n) (:func:`domainbed_err` below; the platform's sample std would give 1.2, 5.8, 2.0, 2.3):

    RMoE  t=0: .80 .82 .84 -> 82.0, SE = .016330 / 1.732 = 0.9 (n=3)
          t=1: .70 .70 .70 -> 70.0 ± 0.0 (n=3)
          t=2: .10 .20 .30 -> 20.0, SE = .081650 / 1.732 = 4.7 (n=3)    Avg (82 + 70 + 20) / 3 = 57.3
    GMoE  t=0: .60 .64     -> 62.0, SE = .02 / 1.414 = 1.4 (n=2); t=1, t=2: X  Avg X
Averages (per trial seed, mean over the test domains it has):
    RMoE  .5333 .5733 .6133 -> 57.3, SE = .032660 / 1.732 = 1.9 (n=3);   GMoE .60 .64 -> 62.0 ± 1.4 (n=2)
"""

import json
import os
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def domainbed_err(data):
    """DomainBed's collect_results.format_mean, its error line: 100 * np.std(list(data) / np.sqrt(len(data)))."""
    return 100 * np.std(list(data) / np.sqrt(len(data)))


def test_the_errors_below_are_domainbeds():
    assert [f"{domainbed_err(v):.1f}" for v in ([.80, .82, .84], [.70, .70, .70], [.10, .20, .30], [.60, .64],
                                                 [1.6 / 3, 1.72 / 3, 1.84 / 3])] == ["0.9", "0.0", "4.7", "1.4", "1.9"]


def write_run(folder, algorithm, trial_seed, test_env, test_acc, done=True):
    os.makedirs(folder, exist_ok=True)
    r = {"step": 10, "epoch": 1.0, "hparams": {"lr": 1e-3},
         "args": {"dataset": "ColoredMNIST", "algorithm": algorithm, "test_envs": [test_env],
                  "trial_seed": trial_seed, "hparams_seed": 0}}
    for i in range(3):
        r[f"env{i}_in_acc"] = test_acc if i == test_env else 0.5
        r[f"env{i}_out_acc"] = 0.5
    with open(os.path.join(folder, "results.jsonl"), "w") as f:
        f.write(json.dumps(r) + "\n")
    if done:
        open(os.path.join(folder, "done"), "w").close()  # complete run (DomainBed's convention)


def make_sweep(root):
    accs = {0: [.80, .82, .84], 1: [.70, .70, .70], 2: [.10, .20, .30]}
    n = 0
    for t, vals in accs.items():
        for seed, a in enumerate(vals):
            write_run(os.path.join(root, "2026-01-01_00-00-00", str(n)), "RMoE", seed, t, a)
            n += 1
    for seed, a in enumerate([.60, .64]):
        write_run(os.path.join(root, "2026-01-02_00-00-00", str(seed)), "GMoE", seed, 0, a)


def test_collect_prints_markdown_and_latex(tmp_path):
    make_sweep(str(tmp_path))
    out = subprocess.run([sys.executable, "-m", "tasks.collect", "--input_dir", str(tmp_path)], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    assert "Total records (domainbed): 11" in out
    assert "Ignored incomplete runs (no `done` file): 0" in out
    assert "| Algorithm | +90% | +80% | -90% | Avg |" in out
    # GMoE sorts before RMoE (paper order)
    assert "| GMoE | 62.0 ± 1.4 (n=2) | X | X | X |" in out
    assert "| RMoE | 82.0 ± 0.9 (n=3) | 70.0 ± 0.0 (n=3) | 20.0 ± 4.7 (n=3) | 57.3 |" in out
    assert "| Algorithm | ColoredMNIST | Avg |" in out
    assert "| RMoE | 57.3 ± 1.9 (n=3) | 57.3 |" in out
    assert "| GMoE | 62.0 ± 1.4 (n=2) | 62.0 |" in out
    for method in ("training-domain validation set", "leave-one-domain-out cross-validation",
                   "test-domain validation set (oracle)"):
        assert f"Model selection: {method}" in out
    # LaTeX
    assert "\\textbf{Algorithm} & \\textbf{+90\\%} & \\textbf{+80\\%} & \\textbf{-90\\%} & \\textbf{Avg} \\\\" in out
    assert "RMoE & 82.0 $\\pm$ 0.9 (n=3) & 70.0 $\\pm$ 0.0 (n=3) & 20.0 $\\pm$ 4.7 (n=3) & 57.3 \\\\" in out
    assert (tmp_path / "results.md").exists() and (tmp_path / "results.tex").exists()


def test_collect_on_a_folder_without_records_says_so(tmp_path):
    p = subprocess.run([sys.executable, "-m", "tasks.collect", "--input_dir", str(tmp_path)], cwd=ROOT,
                       capture_output=True, text=True)
    assert p.returncode != 0 and "no results.jsonl records" in p.stderr


def test_collect_ignores_runs_without_a_done_file(tmp_path, capsys):
    make_sweep(str(tmp_path))
    # an unfinished RMoE run on test domain 1 (its records must not change the 70.0 ± 0.0 cell)
    write_run(os.path.join(str(tmp_path), "2026-01-03_00-00-00", "0"), "RMoE", 3, 1, 0.10, done=False)
    from tasks.collect import collect

    out = collect(str(tmp_path), fmt="markdown", save=False)
    assert "Ignored incomplete runs (no `done` file): 1" in out
    assert "Total records (domainbed): 11" in out
    assert "| RMoE | 82.0 ± 0.9 (n=3) | 70.0 ± 0.0 (n=3) | 20.0 ± 4.7 (n=3) | 57.3 |" in out
    assert "2026-01-03_00-00-00" in capsys.readouterr().err
