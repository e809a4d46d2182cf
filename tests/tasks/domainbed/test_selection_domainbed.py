"""Model selection on synthetic results.jsonl records with winners computed by hand.

Dataset with 3 environments, test environment 0, two hyper-parameter sets (hparams_seed 0, 1).
Single-test-env runs ([0]) give, per step, ``(env0_in, env0_out, env1_out, env2_out)``:

    hp 0: step 100 (.50 .55 .70 .80)  step 200 (.60 .65 .90 .70)  step 300 (.70 .90 .60 .60)
    hp 1: step 100 (.40 .95 .85 .85)  step 300 (.65 .50 .50 .50)

training-domain validation (mean of env1_out, env2_out):
    hp 0: .75 / .80 / .60 -> step 200, test .60;  hp 1: .85 / .50 -> step 100, test .40
    best run: hp 1 (.85 > .80)  => .40
oracle (last step, val = env0_out): hp 0: val .90 test .70; hp 1: val .50 test .65  => .70
leave-one-domain-out: runs [0, 1] and [0, 2] give env1_in / env2_in per step:
    hp 0: step 100 (.6, .7) -> .65, step 200 (.8, .8) -> .80, step 300 (.5, .5) -> .50 => step 200, test .60
    hp 1: step 100 (.7, .7) -> .70, step 300 (.1, .1) -> .10                          => step 100, test .40
    best run: hp 0 (.80 > .70)  => .60
"""

import pytest

from tasks.results.selection import (
    IIDAccuracySelectionMethod,
    LeaveOneOutSelectionMethod,
    OracleSelectionMethod,
    group_records,
)


def rec(step, hp, test_envs, **accs):
    r = {"step": step, "args": {"dataset": "Toy", "algorithm": "RMoE", "trial_seed": 0, "hparams_seed": hp,
                                "test_envs": test_envs}, "hparams": {}}
    for i in range(3):
        for split in ("in", "out"):
            r[f"env{i}_{split}_acc"] = accs.get(f"env{i}_{split}", 0.0)
    return r


def single(step, hp, e0_in, e0_out, e1_out, e2_out):
    return rec(step, hp, [0], env0_in=e0_in, env0_out=e0_out, env1_out=e1_out, env2_out=e2_out,
               env1_in=0.99, env2_in=0.99)


RECORDS = [
    single(100, 0, .50, .55, .70, .80), single(200, 0, .60, .65, .90, .70), single(300, 0, .70, .90, .60, .60),
    single(100, 1, .40, .95, .85, .85), single(300, 1, .65, .50, .50, .50),
    # leave-one-domain-out runs: test envs {0, v}; env v's in accuracy is the validation signal
    rec(100, 0, [0, 1], env1_in=.6), rec(200, 0, [0, 1], env1_in=.8), rec(300, 0, [0, 1], env1_in=.5),
    rec(100, 0, [0, 2], env2_in=.7), rec(200, 0, [0, 2], env2_in=.8), rec(300, 0, [0, 2], env2_in=.5),
    rec(100, 1, [0, 1], env1_in=.7), rec(300, 1, [0, 1], env1_in=.1),
    rec(100, 1, [0, 2], env2_in=.7), rec(300, 1, [0, 2], env2_in=.1),
]


def group0():
    groups = [g for g in group_records(RECORDS) if g["test_env"] == 0]
    assert len(groups) == 1
    return groups[0]["records"]


def test_training_domain_validation():
    recs = group0()
    assert IIDAccuracySelectionMethod.sweep_acc(recs) == pytest.approx(0.40)
    best = IIDAccuracySelectionMethod.hparams_accs(recs)
    assert [round(a["val_acc"], 6) for a, _ in best] == [0.85, 0.80]
    assert best[1][0]["step"] == 200 and best[1][0]["test_acc"] == pytest.approx(0.60)


def test_oracle_takes_the_last_step():
    recs = group0()
    assert OracleSelectionMethod.sweep_acc(recs) == pytest.approx(0.70)
    accs = OracleSelectionMethod.hparams_accs(recs)
    assert [(round(a["val_acc"], 6), round(a["test_acc"], 6)) for a, _ in accs] == [(0.90, 0.70), (0.50, 0.65)]


def test_leave_one_domain_out():
    recs = group0()
    assert LeaveOneOutSelectionMethod.sweep_acc(recs) == pytest.approx(0.60)
    accs = LeaveOneOutSelectionMethod.hparams_accs(recs)
    assert [round(a["val_acc"], 6) for a, _ in accs] == [0.80, 0.70]
    assert accs[0][0]["step"] == 200


def test_leave_one_domain_out_needs_every_other_domain():
    recs = [r for r in group0() if r["args"]["test_envs"] != [0, 2]]
    assert LeaveOneOutSelectionMethod.sweep_acc(recs) is None


def test_groups_put_two_test_env_records_in_both_groups():
    keys = sorted((g["test_env"], len(g["records"])) for g in group_records(RECORDS))
    # test env 0: all 15 records; env 1: the 5 [0, 1] records; env 2: the 5 [0, 2] records
    assert keys == [(0, 15), (1, 5), (2, 5)]
