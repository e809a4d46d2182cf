"""Every accepted config trains something real: tasks/run/checks.py rejects, before anything is built,
configs that would train nothing or fail deep inside a step -- naming the key, the value and what is
allowed. Real Hydra compose of conf/train.yaml, then train(cfg)."""

import os
import re

import pytest

from tasks.job import train
from tasks.run.checks import ConfigError, check_config

GLUE = ["task=glue/cola", "backbone=tiny_bert", "debug=fast"]
DOMAINBED = ["task=domainbed/rotated_digits"]


@pytest.fixture(scope="session")
def make_cfg(compose_cfg):
    return lambda out_dir, *overrides: compose_cfg(overrides, output_dir=out_dir)


@pytest.fixture
def rejected(make_cfg):
    def check(tmp_path, key, value, allowed, *overrides):
        """train() fails with ConfigError naming ``key=value`` and ``allowed``, and writes nothing."""
        out = tmp_path / "run"
        with pytest.raises(ConfigError) as info:
            train(make_cfg(out, *overrides))
        msg = str(info.value)
        assert msg.startswith(f"invalid config: {key}={value}"), msg
        assert re.search(r"; allowed: " + allowed, msg), msg
        assert not out.exists() or os.listdir(out) == []  # nothing trained, nothing recorded
        return msg
    return check


@pytest.mark.parametrize("override,value,allowed", [
    ("trainer.max_steps=0", "0", r"-1 \(no step limit; trainer.max_epochs decides\) or an integer >= 1"),
    ("trainer.max_steps=-7", "-7", r"-1 \(no step limit.* or an integer >= 1"),
])
def test_a_run_of_no_steps_is_rejected(rejected, tmp_path, override, value, allowed):
    msg = rejected(tmp_path, "trainer.max_steps", value, allowed, *DOMAINBED, override)
    assert "trains nothing" in msg or value != "0"


@pytest.mark.parametrize("key,value,allowed", [
    ("trainer.accumulate_grad_batches", "0", r"an integer >= 1 \(1: no accumulation\)"),
    ("trainer.val_check_interval", "0", r"null \(once per epoch\), a fraction of an epoch in \(0.0, 1.0\]"),
    ("trainer.val_check_interval", "1.5", r"null \(once per epoch\), a fraction"),
])
def test_zero_accumulation_or_validation_interval_is_rejected_before_training(rejected, tmp_path, key, value, allowed):
    rejected(tmp_path, key, value, allowed, *DOMAINBED, f"{key}={value}")


def test_no_epoch_limit_and_no_step_limit_is_rejected(rejected, tmp_path):
    rejected(tmp_path, "trainer.max_epochs", "-1", r"an integer >= 1 when trainer.max_steps=-1", *GLUE,
             "trainer.max_epochs=-1", "trainer.max_steps=-1")
    rejected(tmp_path, "trainer.limit_train_batches", "0", r"a fraction in \(0, 1\] or an integer >= 1", *GLUE,
             "trainer.limit_train_batches=0")


@pytest.mark.parametrize("moe", ["rmoe", "moe_topk", "dynmoe", "gmoe"])
def test_an_moe_method_without_moe_layers_is_rejected(rejected, tmp_path, moe):
    msg = rejected(tmp_path, "moe.layers", "[]", r"a non-empty list of distinct integer layer indices in \[0, 1\]",
                   *GLUE, f"moe={moe}", "moe.layers=[]")
    assert f"moe={moe} with no MoE layer would train the dense model" in msg


def test_repeated_or_out_of_range_moe_layers_are_rejected(rejected, tmp_path):
    msg = rejected(tmp_path, "moe.layers", "[1, 1]", r"a non-empty list of distinct integer layer indices in \[0, 1\]",
                   *GLUE, "moe=rmoe", "moe.layers=[1,1]")
    assert "layer(s) [1] repeated" in msg
    msg = rejected(tmp_path, "moe.layers", "[0, 2]", r"a non-empty list of distinct .* in \[0, 1\]", *GLUE,
                   "moe=rmoe", "moe.layers=[0,2]")
    assert "[2] outside the backbone's 2 layers" in msg
    # the ViT's 4 blocks (vit_tiny depth 4)
    rejected(tmp_path, "moe.layers", "[4]", r"a non-empty list of distinct integer layer indices in \[0, 3\]",
             *DOMAINBED, "moe.layers=[4]")


def test_dense_needs_no_moe_layers(make_cfg, tmp_path):
    check_config(make_cfg(tmp_path, *GLUE, "moe=dense"))  # moe.layers=[] is the dense model itself


@pytest.mark.parametrize("value,why", [("[]", "no test environment"), ("[0,1,2,3,4,5]", "leaves no training")])
def test_test_envs_empty_or_all_domains_is_rejected(rejected, tmp_path, value, why):
    shown = "[]" if value == "[]" else "[0, 1, 2, 3, 4, 5]"
    msg = rejected(tmp_path, "data.test_envs", shown, r"a non-empty list of distinct indices of RotatedDigits's "
                   r"environments \(0=0, 1=15, 2=30, 3=45, 4=60, 5=75\) leaving at least one for training",
                   *DOMAINBED, f"data.test_envs={value}")
    assert why in msg


@pytest.mark.parametrize("value,shown", [("inf", "inf"), ("nan", "nan"), ("0", "0.0"), ("-1e-3", "-0.001"),
                                         ("'fast'", "'fast'")])
def test_learning_rate_must_be_finite_and_positive(rejected, tmp_path, value, shown):
    overrides = [*GLUE, f"module.lr={value}"] if value != "0" else [*GLUE, "module.lr=0.0"]
    rejected(tmp_path, "module.lr", shown, "a finite number > 0", *overrides)


def test_max_length_beyond_the_position_embeddings_is_rejected(make_cfg, rejected, tmp_path):
    rejected(tmp_path, "data.max_length", "513", r"an integer in \[1, 512\] \(backbone tiny_bert has 512 position",
             *GLUE, "data.max_length=513")
    # a pretrained backbone: read from its own config (all-MiniLM-L6-v2: 512 positions)
    rejected(tmp_path, "data.max_length", "600", r"an integer in \[1, 512\] \(backbone minilm_l6", "task=glue/cola",
             "backbone=minilm_l6", "data.max_length=600")
    check_config(make_cfg(tmp_path, *GLUE, "data.max_length=512"))


@pytest.mark.parametrize("key,value", [("seed", "-5"), ("seed", "4294967296"), ("data.trial_seed", "-1"),
                                       ("data.data_seed", "'a'")])
def test_seeds_out_of_range_are_rejected(rejected, tmp_path, key, value):
    shown = "'a'" if value == "'a'" else value
    rejected(tmp_path, key, shown, r"an integer in \[0, 4294967295\]", *DOMAINBED, f"{key}={value}")


def test_unknown_wandb_mode_names_the_key(rejected, tmp_path):
    rejected(tmp_path, "logger.wandb.mode", "'sometimes'", r"null \(auto.*\) \| online \| offline \| disabled",
             *GLUE, "logger=wandb", "logger.wandb.mode=sometimes")


def test_the_default_configs_pass(make_cfg, tmp_path):
    for overrides in (GLUE, DOMAINBED, [*GLUE, "moe=rmoe"], [*DOMAINBED, "moe=dense"], [*GLUE, "logger=csv_wandb"]):
        check_config(make_cfg(tmp_path, *overrides))


def test_one_configuration_error_type_and_rmoe_imports_without_torch():
    """The library's and the command line's configuration errors are one type (rmoe.errors.ConfigError, a
    ValueError); `import rmoe` and the config checks load no torch until a layer is built or a registry read."""
    import subprocess
    import sys

    code = ("import sys; import rmoe, rmoe.config, tasks.run.checks as c; from rmoe.errors import ConfigError; "
            "assert 'torch' not in sys.modules, 'torch imported'; "
            "assert c.ConfigError is ConfigError is rmoe.ConfigError is rmoe.config.ConfigError; "
            "assert issubclass(ConfigError, ValueError)\n"
            "try:\n    rmoe.MoEConfig(initial_experts=0)\nexcept c.ConfigError as e:\n    print('caught', e)\n"
            "assert 'torch' in sys.modules  # the registries loaded the implementations")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("caught invalid MoE config: initial_experts=0")
