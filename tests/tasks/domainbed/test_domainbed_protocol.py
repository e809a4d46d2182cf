"""DomainBed's protocol as its released code computes it (facebookresearch/DomainBed ``datasets.py``,
``lib/misc.py``, ``scripts/sweep.py``, ``scripts/train.py``): RotatedMNIST's bilinear rotation, the
training seed ``seed_hash(dataset, algorithm, test_envs, hparams_seed, trial_seed)`` and the evaluation
schedule (after the first update, every ``checkpoint_freq`` updates, after the last)."""

import csv
import gzip
import hashlib
import json
import os

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf, open_dict
from PIL import Image

from callbacks.domainbed_schedule import domainbed_should_evaluate
from tasks.domainbed.datasets import rotate_uint8
from tasks.job import train


def _first_mnist_images(data_dir, n):
    """The first ``n`` training images, read from the idx file here (16-byte header, uint8 28x28)."""
    path = os.path.join(data_dir, "mnist", "MNIST", "raw", "train-images-idx3-ubyte.gz")
    if not os.path.exists(path):
        pytest.skip(f"{path} not found")
    with gzip.open(path, "rb") as f:
        raw = f.read(16 + n * 28 * 28)
    return np.frombuffer(raw[16:], dtype=np.uint8).reshape(n, 28, 28).copy()


@pytest.mark.parametrize("angle", [15, 30, 45, 60, 75])
def test_rotation_is_torchvision_bilinear_with_zero_fill(data_dir, angle):
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.functional import rotate

    imgs = _first_mnist_images(data_dir, 6)
    ours = rotate_uint8(torch.from_numpy(imgs), angle).numpy()
    expected = np.stack([np.asarray(rotate(Image.fromarray(x), angle, interpolation=InterpolationMode.BILINEAR,
                                           fill=(0,))) for x in imgs])
    assert ours.dtype == np.uint8 and ours.shape == imgs.shape
    assert np.array_equal(ours, expected)
    # bicubic (the previous choice) gives other pixels, so this test tells the two apart
    bicubic = np.stack([np.asarray(rotate(Image.fromarray(x), angle, interpolation=InterpolationMode.BICUBIC,
                                          fill=(0,))) for x in imgs])
    assert not np.array_equal(ours, bicubic)


# --- training seed ---------------------------------------------------------------------------------

def _reference_seed_hash(*args):
    """DomainBed ``misc.seed_hash``: md5 of ``str(args)``, as an integer mod 2**31."""
    return int(hashlib.md5(str(args).encode("utf-8")).hexdigest(), 16) % (2**31)


def _resolve_seed(*args):
    cfg = OmegaConf.create({"seed": "${rmoe_seed_hash:" + ",".join(args) + "}"})
    return cfg.seed


def test_seed_hash_resolver_is_domainbeds_seed_hash():
    # by hand: md5("('RotatedMNIST', 'RMoE', [0], 0, 0)") = 5f198b21...fffd0d93; its low 31 bits = 0x7ffd0d93
    assert _reference_seed_hash("RotatedMNIST", "RMoE", [0], 0, 0) == 2147290515
    assert _resolve_seed("RotatedMNIST", "RMoE", "[0]", "0", "0") == 2147290515
    assert _resolve_seed("PACS", "GMoE", "[1, 3]", "2", "1") == _reference_seed_hash("PACS", "GMoE", [1, 3], 2, 1)
    assert _resolve_seed("VLCS", "rmoe", "[2]", "0", "2") == _reference_seed_hash("VLCS", "rmoe", [2], 0, 2)


@pytest.fixture(scope="session")
def _compose(compose_cfg):
    def _compose_(overrides):
        return compose_cfg(overrides)
    return _compose_


def test_domainbed_run_seed_is_the_sweep_seed_hash_unless_given(_compose):
    exp = ["experiment=domainbed/rotated_mnist_rmoe"]
    cfg = _compose(exp)
    # the algorithm name is the run's method identity, `variant` (= moe.name unless an ablation names itself)
    assert (cfg.data.dataset, cfg.variant, cfg.module.algorithm, list(cfg.data.test_envs), cfg.data.hparams_seed,
            cfg.data.trial_seed) == ("RotatedMNIST", "rmoe", "rmoe", [0], 0, 0)
    # md5(str(('RotatedMNIST', 'rmoe', [0], 0, 0))) mod 2**31, computed with hashlib outside the code under test
    assert cfg.seed == 830889366
    # the results records carry the same algorithm, hparams_seed and seed; the datamodule trains with it
    args = cfg.callbacks.domainbed_results.args
    assert (args.algorithm, args.hparams_seed, args.seed, cfg.data.seed) == ("rmoe", 0, 830889366, 830889366)

    t1 = _compose(exp + ["data.trial_seed=1"])
    assert t1.seed == _reference_seed_hash("RotatedMNIST", "rmoe", [0], 0, 1) != cfg.seed
    ablation = _compose(exp + ["variant=rmoe_nofusion", "moe.fusion=null"])
    assert ablation.seed == _reference_seed_hash("RotatedMNIST", "rmoe_nofusion", [0], 0, 0)
    other = _compose(["task=domainbed/pacs", "data.test_envs=[2]", "data.hparams_seed=3"])
    alg = other.module.algorithm
    assert isinstance(alg, str) and other.seed == _reference_seed_hash("PACS", alg, [2], 3, 0)
    assert other.callbacks.domainbed_results.args.hparams_seed == 3

    fixed = _compose(exp + ["data.trial_seed=1", "seed=5"])
    assert fixed.seed == 5 and fixed.callbacks.domainbed_results.args.seed == 5 and fixed.data.seed == 5


# --- evaluation schedule ---------------------------------------------------------------------------

def _domainbed_eval_steps(n_steps, checkpoint_freq):
    """The ``step`` values DomainBed's train.py records (its loop, written out here)."""
    return [step for step in range(n_steps) if step % checkpoint_freq == 0 or step == n_steps - 1]


@pytest.mark.parametrize("n_steps,freq", [(7, 3), (9, 3), (5001, 300), (1, 5), (10, 1)])
def test_schedule_rule_matches_domainbeds_loop(n_steps, freq):
    ours = [u - 1 for u in range(0, n_steps + 1) if domainbed_should_evaluate(u, freq, n_steps)]  # u: updates
    assert ours == _domainbed_eval_steps(n_steps, freq)


TINY = ["data.batch_size=4", "data.eval_batch_size=256", "logger=csv", "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false", "backbone.embed_dim=16", "backbone.num_heads=2", "backbone.depth=2",
        "backbone.moe_layers=[1]", "callbacks.routing_stability.plots=false"]


def test_short_run_evaluates_on_domainbeds_schedule(_compose, tmp_path):
    cfg = _compose(["task=domainbed/rotated_digits", "trainer.max_steps=7", "trainer.val_check_interval=3", *TINY])
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path)
    train(cfg)
    with open(tmp_path / "results.jsonl") as f:
        recs = [json.loads(line) for line in f]
    assert [r["step"] for r in recs] == _domainbed_eval_steps(7, 3) == [0, 3, 6]
    assert all(r["args"]["checkpoint_freq"] == 3 and r["args"]["steps"] == 7 for r in recs)
    # Lightning validated exactly three times, after updates 1, 4 and 7 (metrics.csv's step: the updates
    # completed; results.jsonl keeps DomainBed's numbering, one less)
    with open(tmp_path / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted({int(r["step"]) for r in rows if r.get("val/score")}) == [1, 4, 7]


# --- the data follow the training seed -------------------------------------------------------------

def _domainbed_colored_mnist_port(images, labels, seed):
    """DomainBed's scripts/train.py + datasets.py (MultipleEnvironmentMNIST, ColoredMNIST.color_dataset),
    written out: ``torch.manual_seed(args.seed)``, then the shuffle and the coins from torch's global generator.
    Returns per environment ``(label, colour)``."""
    torch.manual_seed(seed)
    shuffle = torch.randperm(len(images))
    labels = labels[shuffle]
    out = []
    for i, e in enumerate([0.1, 0.2, 0.9]):
        lab = (labels[i::3] < 5).float()
        lab = (lab - (torch.rand(len(lab)) < 0.25).float()).abs()
        colors = (lab - (torch.rand(len(lab)) < e).float()).abs()
        out.append((lab.long(), colors.long()))
    return out


def _all_mnist_labels(data_dir):
    raw = os.path.join(data_dir, "mnist", "MNIST", "raw")
    if not os.path.isdir(raw):
        pytest.skip("no MNIST idx files")

    def load(name, offset):
        with gzip.open(os.path.join(raw, name + ".gz")) as f:
            return np.frombuffer(f.read(), dtype=np.uint8, offset=offset)

    return torch.from_numpy(np.concatenate([load("train-labels-idx1-ubyte", 8),
                                            load("t10k-labels-idx1-ubyte", 8)]).astype(np.int64))


def test_colored_mnist_digits_and_coins_follow_the_training_seed_as_in_domainbed(_compose, data_dir):
    from hydra.utils import instantiate

    labels = _all_mnist_labels(data_dir)
    seen = []
    for trial in (0, 1):
        cfg = _compose(["task=domainbed/colored_mnist", "moe=gmoe", f"data.trial_seed={trial}",
                        f"data.root={os.path.join(data_dir, 'mnist')}"])
        seed = _reference_seed_hash("ColoredMNIST", "gmoe", [0], 0, trial)
        assert cfg.seed == seed and cfg.data.data_seed == seed
        assert cfg.callbacks.domainbed_results.args.data_seed == seed
        dm = instantiate(cfg.data)
        dm.setup()
        port = _domainbed_colored_mnist_port(torch.zeros(len(labels)), labels, seed)
        for env, (y, colour) in zip(dm.data.datasets, port):
            assert torch.equal(env.y, y)
            # DomainBed zeroes channel 1 - colour: the digit sits in channel `colour`
            in_ch1 = env.x[:, 1].flatten(1).sum(1) > 0
            in_ch0 = env.x[:, 0].flatten(1).sum(1) > 0
            assert torch.equal(in_ch1[in_ch0 | in_ch1], colour.bool()[in_ch0 | in_ch1])
        seen.append(dm.data.datasets[0].y)
    assert not torch.equal(seen[0], seen[1])  # each trial sees its own digits and coins
    # an explicit data_seed still fixes them across trials
    fixed = _compose(["task=domainbed/colored_mnist", "data.trial_seed=1", "data.data_seed=0"])
    assert fixed.data.data_seed == 0
