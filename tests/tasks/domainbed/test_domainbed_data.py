"""DomainBed datasets and splits, measured on the built data against hand-derived expectations."""

import gzip
import hashlib
import json
import os
import struct
import time

import numpy as np
import pytest
import torch
from PIL import Image

from tasks.domainbed.datamodule import DomainBatchStream, DomainBedDataModule
from tasks.domainbed.datasets import (
    PACS,
    DomainBedDataError,
    build_dataset,
    find_mnist_raw,
    read_idx,
)
from tasks.domainbed.splits import in_out_splits, seed_hash, split_dataset

# --------------------------------------------------------------------------------------------
# seed hash and splits
# --------------------------------------------------------------------------------------------


def test_seed_hash_is_md5_of_the_args_tuple():
    # str((0, 1)) == "(0, 1)"; its md5 as an integer, mod 2**31
    expected = int(hashlib.md5(b"(0, 1)").hexdigest(), 16) % 2**31
    assert seed_hash(0, 1) == expected
    assert seed_hash(0, 1) != seed_hash(1, 0)


def test_split_is_numpy_shuffle_first_n_out_disjoint_and_complete():
    data = list(range(50))
    out, in_ = split_dataset(data, 10, seed=123)
    keys = list(range(50))
    np.random.RandomState(123).shuffle(keys)
    assert out.keys == keys[:10] and in_.keys == keys[10:]
    assert set(out.keys).isdisjoint(in_.keys) and set(out.keys) | set(in_.keys) == set(range(50))
    assert [out[i] for i in range(len(out))] == keys[:10]


def test_in_out_splits_deterministic_per_trial_seed_and_domain():
    envs = [list(range(100)), list(range(100)), list(range(37))]
    ins_a, outs_a = in_out_splits(envs, 0.2, trial_seed=0)
    ins_b, outs_b = in_out_splits(envs, 0.2, trial_seed=0)
    ins_c, outs_c = in_out_splits(envs, 0.2, trial_seed=1)
    assert [len(o) for o in outs_a] == [20, 20, 7]  # int(len * 0.2)
    assert [len(i) for i in ins_a] == [80, 80, 30]
    for a, b in zip(outs_a, outs_b):
        assert a.keys == b.keys
    assert outs_a[0].keys != outs_c[0].keys  # another trial seed, another split
    assert outs_a[0].keys != outs_a[1].keys  # the domain index enters the hash
    for i, o in zip(ins_a, outs_a):
        assert set(i.keys).isdisjoint(o.keys)


def test_train_stream_draws_one_batch_per_training_domain_reproducibly():
    dm = DomainBedDataModule("RotatedDigits", None, test_envs=[0, 3], batch_size=5, seed=7)
    dm.setup()
    assert dm.train_envs == [1, 2, 4, 5]
    stream = DomainBatchStream(dm.train_splits, 5, seed=7)
    it = iter(stream)
    b0, b1, b2 = next(it), next(it), next(it)
    assert len(b0) == 4 and all(x.shape == (5, 1, 8, 8) and y.shape == (5,) for x, y in b0)
    # a stream restarted at step 2 (resume) yields exactly step 2's batch
    again = next(iter(DomainBatchStream(dm.train_splits, 5, seed=7, start_step=2)))
    for (x, y), (x2, y2) in zip(b2, again):
        assert torch.equal(x, x2) and torch.equal(y, y2)
    assert not torch.equal(b0[0][0], b1[0][0])


# --------------------------------------------------------------------------------------------
# MNIST idx files
# --------------------------------------------------------------------------------------------


def _write_idx(path, arr: np.ndarray, gz: bool):
    header = struct.pack(">BBBB", 0, 0, 0x08, arr.ndim) + struct.pack(">" + "i" * arr.ndim, *arr.shape)
    data = header + arr.astype(np.uint8).tobytes()
    with (gzip.open if gz else open)(path, "wb") as f:
        f.write(data)


@pytest.mark.parametrize("gz", [True, False])
def test_read_idx_plain_and_gzip(tmp_path, gz):
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    p = tmp_path / ("a.idx.gz" if gz else "a.idx")
    _write_idx(p, arr, gz)
    got = read_idx(p)
    assert got.shape == (2, 3, 4) and (got == arr).all()


@pytest.mark.parametrize("damage", ["truncated", "random_bytes", "empty"])
def test_a_corrupt_gz_file_fails_naming_the_file(tmp_path, damage):
    arr = np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28)
    p = tmp_path / "train-images-idx3-ubyte.gz"
    _write_idx(p, arr, True)
    data = p.read_bytes()
    p.write_bytes({"truncated": data[:len(data) // 2], "random_bytes": bytes(range(256)) * 4, "empty": b""}[damage])
    with pytest.raises(DomainBedDataError, match=rf"{p} is (a corrupt gzip file|not an idx file)"):
        read_idx(p)


def test_mnist_folder_without_files_names_what_it_looked_for(tmp_path):
    assert find_mnist_raw(tmp_path) is None
    with pytest.raises(DomainBedDataError, match="train-images-idx3-ubyte"):
        build_dataset("RotatedMNIST", str(tmp_path), [0])


def _raw_mnist(data_dir):
    raw = os.path.join(data_dir, "mnist", "MNIST", "raw")
    if not os.path.isdir(raw):
        pytest.skip("no MNIST idx files under $RMOE_DATA_DIR/mnist/MNIST/raw")

    def load(name, offset):
        with gzip.open(os.path.join(raw, name + ".gz")) as f:
            return np.frombuffer(f.read(), dtype=np.uint8, offset=offset)

    images = np.concatenate([load("train-images-idx3-ubyte", 16), load("t10k-images-idx3-ubyte", 16)]).reshape(-1, 784)
    labels = np.concatenate([load("train-labels-idx1-ubyte", 8), load("t10k-labels-idx1-ubyte", 8)])
    return images, labels


@pytest.fixture(scope="module")
def mnist_root():
    root = os.environ.get("RMOE_DATA_DIR")
    if not root or not os.path.isdir(os.path.join(root, "mnist")):
        pytest.skip("RMOE_DATA_DIR/mnist is not available")
    return root


@pytest.fixture(scope="module")
def rotated_mnist(mnist_root):
    t = time.time()
    ds = build_dataset("RotatedMNIST", os.path.join(mnist_root, "mnist"), [0])
    return ds, time.time() - t


def _axis_angle_deg(images: np.ndarray) -> float:
    """Mean principal-axis orientation (degrees, counter-clockwise, y up) of ``[N, H, W]`` images:
    ``0.5 * arg(mean(exp(2i * theta)))`` with ``theta = 0.5 * atan2(2 mu11, mu20 - mu02)``."""
    n, h, w = images.shape
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
    ys = -ys  # y up
    m = images.reshape(n, -1).astype(np.float64)
    tot = m.sum(1)
    cx = (m * xs.ravel()).sum(1) / tot
    cy = (m * ys.ravel()).sum(1) / tot
    dx = xs.ravel()[None] - cx[:, None]
    dy = ys.ravel()[None] - cy[:, None]
    mu20, mu02, mu11 = (m * dx * dx).sum(1), (m * dy * dy).sum(1), (m * dx * dy).sum(1)
    theta2 = np.arctan2(2 * mu11, mu20 - mu02)
    return float(np.degrees(0.5 * np.angle(np.exp(1j * theta2).mean())))


def test_rotated_mnist_environments(rotated_mnist, data_dir):
    ds, seconds = rotated_mnist
    assert ds.environments == ["0", "15", "30", "45", "60", "75"]
    assert ds.input_shape == (1, 28, 28) and ds.num_classes == 10
    # 70,000 images dealt round-robin into 6 environments: 4 x 11,667 + 2 x 11,666
    assert [len(e) for e in ds] == [11667, 11667, 11667, 11667, 11666, 11666]
    assert seconds < 30, f"building RotatedMNIST took {seconds:.1f}s"
    images, labels = _raw_mnist(data_dir)
    # environment 0 is unrotated: every image is an MNIST image with its own label
    originals = {img.tobytes(): int(lab) for img, lab in zip(images, labels)}
    env0 = ds[0]
    x0 = (env0.x[:, 0].numpy()).reshape(len(env0), -1)
    found = [originals.get(row.tobytes()) for row in x0]
    assert all(f is not None for f in found)
    assert found == env0.y.tolist()
    # measured rotation of each environment relative to environment 0
    base = _axis_angle_deg(ds[0].x[:, 0].numpy())
    for env, angle in zip(ds, [0, 15, 30, 45, 60, 75]):
        got = (_axis_angle_deg(env.x[:, 0].numpy()) - base + 90) % 180 - 90  # axes are defined mod 180
        assert abs(got - angle) < 3.0, (angle, got)
    # pixel values as ToTensor: uint8 / 255
    x, _ = ds[1][0]
    assert x.dtype == torch.float32 and float(x.max()) <= 1.0


def test_colored_mnist_agreement_and_label_noise(mnist_root, data_dir):
    ds = build_dataset("ColoredMNIST", os.path.join(mnist_root, "mnist"), [2])
    assert ds.environments == ["+90%", "+80%", "-90%"]
    assert ds.input_shape == (2, 28, 28) and ds.num_classes == 2
    assert [len(e) for e in ds] == [23334, 23333, 23333]
    images, labels = _raw_mnist(data_dir)
    digit_of = {img.tobytes(): int(lab) for img, lab in zip(images, labels)}
    for env, agreement in zip(ds, [0.9, 0.8, 0.1]):
        x, y = env.x.numpy(), env.y.numpy()
        red, green = x[:, 0].reshape(len(y), -1), x[:, 1].reshape(len(y), -1)
        # the digit sits in exactly one channel (all-black images aside)
        assert ((red.sum(1) == 0) | (green.sum(1) == 0)).all()
        colour = np.where(red.sum(1) > 0, 0, 1)  # DomainBed zeroes channel 1 - colour
        measured = float((colour == y).mean())
        assert abs(measured - agreement) < 0.01, (agreement, measured)
        gray = (red + green).astype(np.uint8)
        digits = np.array([digit_of[g.tobytes()] for g in gray])
        noise = float(((digits < 5).astype(int) != y).mean())
        assert abs(noise - 0.25) < 0.01, noise


def test_rotated_digits_environments():
    ds = build_dataset("RotatedDigits", None, [0])
    assert [len(e) for e in ds] == [300, 300, 300, 299, 299, 299]  # 1,797 dealt into 6
    assert ds.input_shape == (1, 8, 8) and ds.num_classes == 10
    assert int(ds[0].x.max()) == 255  # 16 -> 255
    first, again = ds[0].x, build_dataset("RotatedDigits", None, [0])[0].x
    assert torch.equal(first, again)  # fixed shuffle seed


# --------------------------------------------------------------------------------------------
# image folders and clear failures
# --------------------------------------------------------------------------------------------


def _make_pacs(root, domains=("art_painting", "cartoon", "photo", "sketch"), classes=("dog", "horse"), n=3):
    rng = np.random.RandomState(0)
    for d in domains:
        for c in classes:
            os.makedirs(root / "PACS" / d / c, exist_ok=True)
            for k in range(n):
                arr = rng.randint(0, 255, (12, 10, 3), dtype=np.uint8)
                Image.fromarray(arr).save(root / "PACS" / d / c / f"{k}.png")


def test_image_folder_dataset(tmp_path):
    _make_pacs(tmp_path)
    ds = PACS(str(tmp_path), test_envs=[0])
    assert ds.environments == ["A", "C", "P", "S"] and ds.num_classes == 2
    assert [len(e) for e in ds] == [6, 6, 6, 6]
    x, y = ds[2][0]
    assert x.shape == (3, 224, 224) and y == 0
    # test domain: plain transform (deterministic); training domain drawn with augmentation
    assert torch.equal(ds[0][1][0], ds[0][1][0])
    assert ds.train_datasets[1].transform is not ds.datasets[0].transform


def test_missing_domain_is_named(tmp_path):
    _make_pacs(tmp_path, domains=("art_painting", "cartoon", "photo"))
    with pytest.raises(DomainBedDataError, match=r"lacks the domain folder\(s\) \['sketch'\]"):
        DomainBedDataModule("PACS", str(tmp_path), [0]).setup()
    with pytest.raises(DomainBedDataError, match="no folder 'PACS'"):
        DomainBedDataModule("PACS", str(tmp_path / "nowhere"), [0]).setup()


def test_unreadable_image_is_named(tmp_path):
    _make_pacs(tmp_path)
    bad = tmp_path / "PACS" / "photo" / "horse" / "broken.jpg"
    bad.write_bytes(b"not an image at all")
    with pytest.raises(DomainBedDataError, match="broken.jpg"):
        DomainBedDataModule("PACS", str(tmp_path), [0]).setup()


def test_truncated_jpeg_fails_the_check_naming_the_file_and_is_cached_once_good(tmp_path, monkeypatch):
    """A JPEG cut short passes PIL's verify() (header only) but not a full decode: the check decodes
    every image; images that decoded are remembered by size and mtime, so a second check skips them."""
    from tasks.domainbed.datasets import _check_readable, image_check_cache

    monkeypatch.setenv("RMOE_IMAGE_CHECK_CACHE", str(tmp_path / "cache"))
    _make_pacs(tmp_path)
    good = tmp_path / "PACS" / "photo" / "horse" / "photo.jpg"
    Image.fromarray(np.random.RandomState(1).randint(0, 255, (64, 64, 3), dtype=np.uint8)).save(good, quality=90)
    data = good.read_bytes()
    with Image.open(good) as img:
        img.verify()  # the full file
    DomainBedDataModule("PACS", str(tmp_path), [0]).setup()
    cache = image_check_cache(tmp_path / "PACS")
    assert str(good) in json.loads(cache.read_text()) and len(json.loads(cache.read_text())) == 25
    # the same file cut in half: verify() still passes, the check does not (the cache entry is stale)
    good.write_bytes(data[: len(data) // 2])
    with Image.open(good) as img:
        img.verify()
    with pytest.raises(DomainBedDataError) as e:
        DomainBedDataModule("PACS", str(tmp_path), [0]).setup()
    assert f"PACS: 1 image(s) cannot be read: {good} (OSError: image file is truncated" in str(e.value)
    assert str(good) not in json.loads(cache.read_text())
    # cached images are not decoded again: only the changed file is
    assert _check_readable([str(good)], cache)[0][0] == str(good)


def test_image_that_breaks_after_the_check_names_its_path_when_loaded(tmp_path, monkeypatch):
    monkeypatch.setenv("RMOE_IMAGE_CHECK_CACHE", str(tmp_path / "cache"))
    _make_pacs(tmp_path)
    ds = PACS(str(tmp_path), test_envs=[0])
    path = ds[3].samples[0][0]
    open(path, "wb").close()
    with pytest.raises(DomainBedDataError, match=rf"image {path} cannot be read: UnidentifiedImageError"):
        ds[3][0]


def test_empty_class_folder_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv("RMOE_IMAGE_CHECK_CACHE", str(tmp_path / "cache"))
    _make_pacs(tmp_path)
    for d in ("art_painting", "cartoon", "photo", "sketch"):
        os.makedirs(tmp_path / "PACS" / d / "zebra")
    (tmp_path / "PACS" / "photo" / "zebra" / "notes.txt").write_text("not an image")
    with pytest.raises(DomainBedDataError) as e:
        DomainBedDataModule("PACS", str(tmp_path), [0]).setup()
    msg = str(e.value)
    assert msg.startswith(f"PACS: 1 class folder(s) hold no images: ['{tmp_path / 'PACS' / 'art_painting' / 'zebra'}']")
    assert "allowed: at least one image (.jpg" in msg


@pytest.mark.parametrize("test_envs", [[6], [-1], [0, 0], [0, 1, 2, 3, 4, 5]])
def test_test_envs_outside_the_domains_fail_at_construction(test_envs):
    with pytest.raises(DomainBedDataError, match="RotatedDigits"):
        DomainBedDataModule("RotatedDigits", None, test_envs)


def test_unknown_dataset_is_named():
    with pytest.raises(DomainBedDataError, match="'Nope'.*RotatedMNIST"):
        DomainBedDataModule("Nope", None, [0])


def test_the_stream_resumes_after_every_micro_batch_drawn_before(monkeypatch):
    """A resumed fit restarts the stream at global_step x accumulate_grad_batches: with accumulation
    every optimizer step drew that many batches."""
    from types import SimpleNamespace

    dm = DomainBedDataModule("RotatedDigits", None, test_envs=[0], batch_size=5, seed=7)
    dm.setup()
    for step, acc, start in ((0, 1, 0), (3, 1, 3), (3, 2, 6), (5, 4, 20)):
        dm.trainer = SimpleNamespace(global_step=step, accumulate_grad_batches=acc, global_rank=0)
        assert dm._start_step() == start
        assert dm.train_dataloader().dataset.start_step == start
