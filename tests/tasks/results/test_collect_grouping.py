"""``tasks.collect`` keys rows by method identity plus every swept override, on real run
folders written in tmp_path (``summary.json`` / ``results.jsonl``, ``done``, ``.hydra/*.yaml``).

GLUE grid (``sweeps/glue_paper.yaml``-like, one lr): RTE RMoE × β {0.9, 0.99} × λ_min {1e-3, 1e-4} ×
seeds {0, 1, 2}; one dev score per run (its best dev epoch). By hand (SE = sample std / √n):

    β 0.9,  λ_min 1e-3: .60 .62 .67 -> mean .63; deviations -.03 -.01 .04, Σd² = .0026, s² = .0013,
                        s = .036056, SE = s / √3 = .020817          -> "63.0 ± 2.1 (n=3)"
    β 0.9,  λ_min 1e-4: .50 .50 .53 -> .51; Σd² = .0006, s = .017321, SE = .010000 -> "51.0 ± 1.0 (n=3)"
    β 0.99, λ_min 1e-3: .70 .74 (seed 2 not run) -> .72; s = .028284, SE = .020000 -> "72.0 ± 2.0 (n=2)"
    β 0.99, λ_min 1e-4: .40 .41 .45 -> .42; Σd² = .0014, s = .026458, SE = .015275 -> "42.0 ± 1.5 (n=3)"

Keyed by (task, variant, lr, seed) as before, the four configurations would have been one row holding
the last folder per seed.
"""

import json
import logging
import math
import os
import subprocess
import sys

import yaml

from tasks.collect import collect

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

GRID = {("0.9", "1e-3"): [.60, .62, .67], ("0.9", "1e-4"): [.50, .50, .53],
        ("0.99", "1e-3"): [.70, .74], ("0.99", "1e-4"): [.40, .41, .45]}


def write_run(folder, summary=None, records=None, overrides=(), choices=None, done=True):
    os.makedirs(os.path.join(folder, ".hydra"), exist_ok=True)
    if summary is not None:
        with open(os.path.join(folder, "summary.json"), "w") as f:
            json.dump(summary, f)
    if records is not None:
        with open(os.path.join(folder, "results.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
    with open(os.path.join(folder, ".hydra", "overrides.yaml"), "w") as f:
        yaml.safe_dump(list(overrides), f)
    if choices is not None:
        with open(os.path.join(folder, ".hydra", "hydra.yaml"), "w") as f:
            yaml.safe_dump({"hydra": {"runtime": {"choices": choices}}}, f)
    if done:
        with open(os.path.join(folder, "done"), "w") as f:
            json.dump({"finished_utc": "2026-01-01T00:00:00Z", "commit": None, "metrics": {}}, f)


def glue_summary(task, variant, seed, dev, method=None, lr=2e-5, task_name=None):
    return {"schema": 1, "done": True, "benchmark": "glue", "task_name": task_name or f"glue/{task}", "task": task,
            "method": method or variant, "variant": variant, "seed": seed, "lr": lr, "headline": "accuracy",
            "epochs": [{"epoch": 0, "step": 10, "dev": {"score": dev}, "heldout": None}],
            "stability": {}, "series": {}, "overrides": [], "commit": None}


def write_grid(root):
    n = 0
    for (beta, lmin), scores in GRID.items():
        for seed, score in enumerate(scores):
            write_run(os.path.join(root, "multiruns", "2026-01-01_00-00-00", str(n)),
                      glue_summary("rte", "rmoe", seed, score),
                      overrides=["task=glue/rte", "moe=rmoe", "module.lr=2e-5", f"seed={seed}",
                                 f"moe.fusion.ema_decay={beta}", f"curriculum.lambda_min={lmin}",
                                 "paths.log_dir=/somewhere/logs"])
            n += 1


def se(xs):
    m = sum(xs) / len(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) / math.sqrt(len(xs))


def test_a_beta_lambda_min_seed_grid_gives_one_row_per_configuration(tmp_path):
    write_grid(str(tmp_path))
    out = collect(str(tmp_path), fmt="markdown", save=False)
    # the hand-computed SEs of the docstring, from the formula
    assert round(100 * se([.60, .62, .67]), 1) == 2.1 and round(100 * se([.40, .41, .45]), 1) == 1.5
    rows = [line for line in out.splitlines() if line.startswith("| RMoE")]
    # one row per configuration, ordered by the override values as numbers (1e-4 < 1e-3, 0.9 < 0.99)
    assert rows == [
        "| RMoE [curriculum.lambda_min=1e-4, moe.fusion.ema_decay=0.9] | 51.0 ± 1.0 (n=3) |",
        "| RMoE [curriculum.lambda_min=1e-4, moe.fusion.ema_decay=0.99] | 42.0 ± 1.5 (n=3) |",
        "| RMoE [curriculum.lambda_min=1e-3, moe.fusion.ema_decay=0.9] | 63.0 ± 2.1 (n=3) |",
        "| RMoE [curriculum.lambda_min=1e-3, moe.fusion.ema_decay=0.99] | 72.0 ± 2.0 (n=2) |",
    ]
    assert "Total records (glue): 11" in out


def test_the_collect_cli_prints_the_grid_rows(tmp_path):
    write_grid(str(tmp_path))
    p = subprocess.run([sys.executable, "-m", "tasks.collect", "--input_dir", str(tmp_path), "--format", "latex"],
                       cwd=ROOT, capture_output=True, text=True, check=True)
    assert "RMoE [curriculum.lambda\\_min=1e-4, moe.fusion.ema\\_decay=0.99] & 42.0 $\\pm$ 1.5 (n=3) \\\\" in p.stdout


def test_an_ablation_variant_gets_its_own_glue_row(tmp_path):
    # RMoE .80 .82; RMoE w/o fusion (variant=rmoe_nofusion, same moe) .70 .74; a README one-liner
    # ablation without variant= (moe.fusion=null) .60 .64 -> three rows, nothing merged
    root = str(tmp_path)
    for seed, (full, abl, oneliner) in enumerate([(.80, .70, .60), (.82, .74, .64)]):
        write_run(os.path.join(root, f"full{seed}"), glue_summary("mrpc", "rmoe", seed, full),
                  overrides=["task=glue/mrpc", "moe=rmoe", f"seed={seed}"])
        write_run(os.path.join(root, f"abl{seed}"), glue_summary("mrpc", "rmoe_nofusion", seed, abl, method="rmoe"),
                  overrides=["task=glue/mrpc", "moe=rmoe", "variant=rmoe_nofusion", "moe.fusion=null", f"seed={seed}"])
        write_run(os.path.join(root, f"oneliner{seed}"), glue_summary("mrpc", "rmoe", seed, oneliner),
                  overrides=["task=glue/mrpc", "moe=rmoe", "moe.fusion=null", f"seed={seed}"])
    out = collect(root, fmt="markdown", save=False)
    # .80 .82 -> 81.0, SE = .014142 / √2 = .01; .70 .74 -> 72.0 ± 2.0; .60 .64 -> 62.0 ± 2.0
    assert "| RMoE | 81.0 ± 1.0 (n=2) |" in out
    assert "| RMoE [moe.fusion=null] | 62.0 ± 2.0 (n=2) |" in out
    assert "| RMoE w/o fusion | 72.0 ± 2.0 (n=2) |" in out


def db_record(test_env, acc, algorithm="rmoe", trial_seed=0, hparams_seed=0, task_name="domainbed/colored_mnist"):
    r = {"step": 10, "epoch": 1.0, "hparams": {"lr": 1e-3},
         "args": {"dataset": "ColoredMNIST", "algorithm": algorithm, "test_envs": [test_env],
                  "trial_seed": trial_seed, "hparams_seed": hparams_seed, "task_name": task_name}}
    for i in range(3):
        r[f"env{i}_in_acc"] = acc if i == test_env else 0.5
        r[f"env{i}_out_acc"] = 0.5
    return r


def db_summary(variant, trial_seed, method="rmoe"):
    return {"schema": 1, "done": True, "benchmark": "domainbed", "task_name": "domainbed/colored_mnist",
            "task": "ColoredMNIST", "method": method, "variant": variant, "seed": 1, "lr": 1e-3,
            "test_envs": [0], "trial_seed": trial_seed, "epochs": [], "stability": {}, "series": {}}


def test_an_ablation_variant_gets_its_own_domainbed_row(tmp_path):
    # both write algorithm "rmoe" (moe.name) in results.jsonl; the variant tells them apart.
    # DomainBed's ± (population std / √n): RMoE test domain 0: .80 .84 -> 82.0, SE = .02/√2 = 1.4 (n=2);
    # w/o fusion: .60 .70 -> 65.0, SE = .05/√2 = 3.5
    root = str(tmp_path)
    for t, (full, abl) in enumerate([(.80, .60), (.84, .70)]):
        write_run(os.path.join(root, f"full{t}"), db_summary("rmoe", t), [db_record(0, full, trial_seed=t)],
                  overrides=["experiment=domainbed/colored_mnist_rmoe", "data.test_envs=[0]", f"data.trial_seed={t}"])
        write_run(os.path.join(root, f"abl{t}"), db_summary("rmoe_nofusion", t), [db_record(0, abl, trial_seed=t)],
                  overrides=["experiment=domainbed/colored_mnist_rmoe", "variant=rmoe_nofusion", "moe.fusion=null",
                             "data.test_envs=[0]", f"data.trial_seed={t}"])
    out = collect(root, fmt="markdown", save=False)
    train_val = out.split("### Model selection: leave-one-domain-out")[0]
    assert "| RMoE | 82.0 ± 1.4 (n=2) | X | X | X |" in train_val
    assert "| RMoE w/o fusion | 65.0 ± 3.5 (n=2) | X | X | X |" in train_val
    assert "Total records (domainbed): 4" in out


def test_debug_runs_are_not_collected(tmp_path, capsys):
    root = str(tmp_path)
    write_run(os.path.join(root, "a"), glue_summary("cola", "rmoe", 0, .50), overrides=["seed=0"])
    write_run(os.path.join(root, "b"), glue_summary("cola", "rmoe", 1, .54), overrides=["seed=1"])
    # debug=fdr on the command line; debug=fast chosen by a config (only in hydra.yaml's runtime
    # choices); a task_name starting with "debug"; a DomainBed debug run (results.jsonl only)
    write_run(os.path.join(root, "dbg_override"), glue_summary("cola", "rmoe", 2, .99),
              overrides=["seed=2", "debug=fdr"])
    write_run(os.path.join(root, "dbg_choice"), glue_summary("cola", "rmoe", 3, .99), overrides=["seed=3"],
              choices={"debug": "fast", "moe": "rmoe"})
    write_run(os.path.join(root, "dbg_name"), glue_summary("cola", "rmoe", 4, .99, task_name="debug/cola"),
              overrides=["seed=4"])
    write_run(os.path.join(root, "dbg_db"), None, [db_record(0, .99)], overrides=["debug=limit"])
    # an ordinary run whose hydra.yaml says debug: null is collected
    write_run(os.path.join(root, "c"), glue_summary("cola", "rmoe", 5, .58), overrides=["seed=5"],
              choices={"debug": None})
    out = collect(root, fmt="markdown", save=False)
    # .50 .54 .58 -> 54.0, s = .04, SE = .04 / √3 = .023094
    assert "| RMoE | 54.0 ± 2.3 (n=3) |" in out
    assert "Skipped debug runs: 4" in out
    assert "domainbed" not in out.split("Total records (glue)")[1]
    err = capsys.readouterr().err
    for name in ("dbg_override", "dbg_choice", "dbg_name", "dbg_db"):
        assert f"skipped (debug run): {os.path.join(root, name)}" in err


def test_duplicate_keys_warn_naming_the_folders(tmp_path, caplog):
    root = str(tmp_path)
    write_run(os.path.join(root, "x", "first"), glue_summary("cola", "rmoe", 0, .50), overrides=["seed=0"])
    write_run(os.path.join(root, "y", "second"), glue_summary("cola", "rmoe", 0, .90), overrides=["seed=0"])
    write_run(os.path.join(root, "z"), glue_summary("cola", "rmoe", 1, .60), overrides=["seed=1"])
    with caplog.at_level(logging.WARNING, logger="tasks.results"):
        out = collect(root, fmt="markdown", save=False)
    warned = [r.getMessage() for r in caplog.records if "same key" in r.getMessage()]
    assert len(warned) == 1
    assert os.path.join(root, "x", "first") in warned[0] and os.path.join(root, "y", "second") in warned[0]
    # the first folder (.50) is kept, the duplicate is not a second seed: .50 .60 -> 55.0 ± 5.0 (n=2)
    assert "| RMoE | 55.0 ± 5.0 (n=2) |" in out

    # DomainBed: two folders with the same dataset, variant, test env, trial seed and hparams seed
    caplog.clear()
    db = tmp_path / "db"
    write_run(str(db / "one"), db_summary("rmoe", 0), [db_record(0, .80)])
    write_run(str(db / "two"), db_summary("rmoe", 0), [db_record(0, .20)])
    with caplog.at_level(logging.WARNING, logger="tasks.results"):
        out = collect(str(db), fmt="markdown", save=False)
    warned = [r.getMessage() for r in caplog.records if "same key" in r.getMessage()]
    assert len(warned) == 1 and str(db / "one") in warned[0] and str(db / "two") in warned[0]
    assert "| RMoE | 80.0 (n=1) | X | X | X |" in out


def test_a_seed_sweep_at_one_trial_seed_averages_over_the_seeds(tmp_path, caplog):
    """``rmoe-train -m moe=moe_topk,rmoe seed=0,1`` (one trial seed): each training seed is a replicate.
    DomainBed's ± (population std / √n): RMoE .80 .84 -> 82.0, SE = .02 / √2 = 1.4 (n=2); top-k .60 .70 -> 65.0,
    SE = .05 / √2 = 3.5 (n=2)."""
    root = str(tmp_path)
    for moe, accs in (("rmoe", (.80, .84)), ("moe_topk", (.60, .70))):
        for seed, acc in enumerate(accs):
            write_run(os.path.join(root, f"{moe}{seed}"), db_summary(moe, 0, method=moe),
                      [db_record(0, acc, algorithm=moe)], overrides=[f"moe={moe}", f"seed={seed}"])
    with caplog.at_level(logging.WARNING, logger="tasks.results"):
        out = collect(root, fmt="markdown", save=False)
    assert not [r for r in caplog.records if "same key" in r.getMessage()]
    train_val = out.split("### Model selection: leave-one-domain-out")[0]
    assert "| RMoE | 82.0 ± 1.4 (n=2) | X | X | X |" in train_val
    assert "65.0 ± 3.5 (n=2) | X | X | X |" in train_val
    assert "n counts replicates (trial_seed × seed)" in out


def test_an_lr_sweep_without_hparams_seed_selects_among_the_learning_rates(tmp_path, caplog):
    """Two learning rates, one hparams seed: both runs are candidates of model selection. Training-domain
    validation picks lr 1e-3 (validation .9 > .6): its test accuracy .70 -> 70.0 (n=1) -- not the first
    folder's .80 (the old 'kept the first' of two 'duplicates')."""
    root = str(tmp_path)
    for name, lr, val, test in (("a_lr1e-4", "1e-4", .6, .80), ("b_lr1e-3", "1e-3", .9, .70)):
        rec = db_record(0, test)
        rec["env1_out_acc"] = rec["env2_out_acc"] = val
        write_run(os.path.join(root, name), db_summary("rmoe", 0), [rec], overrides=["moe=rmoe", f"module.lr={lr}"])
    with caplog.at_level(logging.WARNING, logger="tasks.results"):
        out = collect(root, fmt="markdown", save=False)
    assert not [r for r in caplog.records if "same key" in r.getMessage()]
    train_val = out.split("### Model selection: leave-one-domain-out")[0]
    assert "| RMoE | 70.0 (n=1) | X | X | X |" in train_val
    assert "Model selection chooses among the candidates hparams_seed × module.lr" in out


def test_empty_done_of_an_rmoe_run_and_runs_with_skipped_batches_are_not_collected(tmp_path, capsys):
    root = str(tmp_path)
    write_run(os.path.join(root, "a"), glue_summary("cola", "rmoe", 0, .50), overrides=["seed=0"])
    # a folder rmoe-train ran (attempts.jsonl) whose done is empty (a failed attempt's leftover)
    write_run(os.path.join(root, "b"), glue_summary("cola", "rmoe", 1, .60), overrides=["seed=1"])
    with open(os.path.join(root, "b", "attempts.jsonl"), "w") as f:
        f.write(json.dumps({"event": "failed"}) + "\n")
    open(os.path.join(root, "b", "done"), "w").close()
    # a run whose numerics callback skipped 9 batches (callbacks.numerics.on_fault=skip)
    write_run(os.path.join(root, "c"), glue_summary("cola", "rmoe", 2, .70), overrides=["seed=2"])
    with open(os.path.join(root, "c", "done"), "w") as f:
        json.dump({"finished_utc": "x", "commit": None, "metrics": {}, "skipped_batches": 9}, f)
    out = collect(root, fmt="markdown", save=False)
    assert "| RMoE | 50.0 (n=1) |" in out and "Left out runs with skipped batches: 1" in out
    err = capsys.readouterr().err
    assert f"ignored (no done file, or an empty one): {os.path.join(root, 'b')}" in err
    assert f"left out (batches skipped by callbacks.numerics.on_fault=skip; --include-skipped counts it): " \
           f"{os.path.join(root, 'c')}" in err
    # asked for: .50 .70 -> 60.0, SE = .141421 / √2 = 10.0 (n=2)
    assert "| RMoE | 60.0 ± 10.0 (n=2) |" in collect(root, fmt="markdown", save=False, include_skipped=True)
