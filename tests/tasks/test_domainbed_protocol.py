"""DomainBed's protocol as its released code computes it (facebookresearch/DomainBed ``datasets.py``,
``lib/misc.py``, ``scripts/sweep.py``, ``scripts/train.py``): RotatedMNIST's bilinear rotation, the
training seed ``seed_hash(dataset, algorithm, test_envs, hparams_seed, trial_seed)`` and the evaluation
schedule (after the first update, every ``checkpoint_freq`` updates, after the last)."""

import gzip
import os

import numpy as np
import pytest
import torch
from PIL import Image

from tasks.domainbed.datasets import rotate_uint8


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
