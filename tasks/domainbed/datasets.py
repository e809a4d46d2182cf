"""DomainBed's multi-environment datasets, behind one interface.

``ds = build_dataset(name, root, test_envs, ...)`` returns a :class:`MultipleDomainDataset`:
``ds.environments`` (domain names, index = environment id), ``ds.input_shape``, ``ds.num_classes``,
``len(ds)`` environments and ``ds[i]`` the i-th environment (a torch ``Dataset`` of ``(x, y)``).

* Image folders (PACS, VLCS, OfficeHome, DomainNet, TerraIncognita):
  ``<root>/<Dataset>/<domain>/<class>/<image>`` (DomainBed's download layout; the dataset folder may
  also carry DomainBed's name, e.g. ``office_home``). Domains are the sorted domain folders, checked
  against the expected names; every image is fully decoded once before training (a truncated file
  fails naming its path; results cached per file size and mtime in ``$RMOE_IMAGE_CHECK_CACHE`` or
  ``~/.cache/rmoe/image_check``, so a large dataset pays once); a class folder without images fails
  naming it (torchvision's ImageFolder, which DomainBed uses, rejects it too).
  DomainBed's transforms: resize to 224 + ImageNet normalisation; training domains use
  RandomResizedCrop(224, 0.7-1) + flip + ColorJitter(0.3 x4) + RandomGrayscale.
* RotatedMNIST / ColoredMNIST: the 70,000 MNIST images (train then test), shuffled by
  ``torch.randperm`` under ``torch.Generator().manual_seed(seed)`` and dealt to the environments
  as ``images[i::n_envs]`` -- exactly DomainBed's construction (identical tensors for ``seed`` =
  DomainBed's ``--seed``). RotatedMNIST: bilinear rotation by 0, 15, 30, 45, 60, 75 degrees.
  ColoredMNIST: binary label ``digit < 5`` flipped with probability 0.25, colour = label flipped
  with probability 0.1 / 0.2 / 0.9 (colour-label agreement 0.9 / 0.8 / 0.1), 2 channels.
* RotatedDigits: the same rotation protocol over scikit-learn's 1,797 bundled 8x8 digits.
"""

from __future__ import annotations

import gzip
import hashlib
import inspect
import json
import os
import zlib
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from sklearn.datasets import load_digits
from torch import Tensor
from torch.utils.data import Dataset
from torchvision import transforms as T
from torchvision.datasets import MNIST

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class DomainBedDataError(ValueError):
    """The data on disk does not match what the dataset needs; the message names what is wrong."""


# ------------------------------------------------------------------------------------------------
# Environment datasets
# ------------------------------------------------------------------------------------------------
class TensorEnvironment(Dataset):
    """An environment held in memory: ``x`` uint8 ``[N, C, H, W]`` (scaled to [0, 1] on access, as
    torchvision's ToTensor) and integer labels ``y [N]``. ``get_batch(idx)`` gathers vectorised."""

    def __init__(self, x: Tensor, y: Tensor):
        if x.dtype != torch.uint8:
            raise TypeError(f"TensorEnvironment expects uint8 images, got {x.dtype}")
        self.x, self.y = x, y.long()

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        return self.x[i].float().div_(255.0), self.y[i]

    def get_batch(self, idx: Tensor) -> tuple[Tensor, Tensor]:
        return self.x[idx].float().div_(255.0), self.y[idx]


class ImageFolderEnvironment(Dataset):
    """One domain folder ``<domain>/<class>/<image>``; classes are the sorted class folders."""

    def __init__(self, samples: list[tuple[str, int]], classes: list[str], transform: Callable):
        self.samples, self.classes, self.transform = samples, classes, transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        path, y = self.samples[i]
        try:
            with open(path, "rb") as f:
                img = Image.open(f).convert("RGB")
        except Exception as e:  # noqa: BLE001 - name the file whatever the decoder raised
            raise DomainBedDataError(f"image {path} cannot be read: {type(e).__name__}: {e}") from e
        return self.transform(img), y


class MultipleDomainDataset:
    """A list of environments. Subclasses set ``ENVIRONMENTS`` and fill ``self.datasets``.

    ``self.train_datasets[i]`` is environment ``i`` as seen by the training sampler (with
    augmentation for image datasets); ``self.datasets[i]`` as seen by evaluation.
    """

    ENVIRONMENTS: Sequence[str] = ()
    INPUT_SHAPE: tuple[int, ...] = ()

    def __init__(self) -> None:
        self.datasets: list[Dataset] = []
        self.train_datasets: list[Dataset] = []
        self.input_shape: tuple[int, ...] = tuple(self.INPUT_SHAPE)
        self.num_classes: int = 0

    @property
    def environments(self) -> list[str]:
        return list(self.ENVIRONMENTS)

    def __getitem__(self, index: int) -> Dataset:
        return self.datasets[index]

    def __len__(self) -> int:
        return len(self.datasets)


def check_test_envs(name: str, environments: Sequence[str], test_envs: Sequence[int]) -> list[int]:
    """``test_envs`` must be distinct integers naming environments of the dataset."""
    n = len(environments)
    allowed = ", ".join(f"{i}={e}" for i, e in enumerate(environments))
    if isinstance(test_envs, (int, str)) or test_envs is None:
        raise DomainBedDataError(f"test_envs={test_envs!r} for {name}: expected a list of environment indices "
                                 f"({allowed})")
    out = []
    for t in test_envs:
        if isinstance(t, bool) or not isinstance(t, (int, np.integer)) or not 0 <= int(t) < n:
            raise DomainBedDataError(f"test_envs={list(test_envs)!r}: {t!r} is not an environment of {name}; "
                                     f"allowed: integers in [0, {n - 1}] ({allowed})")
        out.append(int(t))
    if len(set(out)) != len(out):
        raise DomainBedDataError(f"test_envs={list(test_envs)!r} repeats an environment of {name}")
    if len(out) >= n:
        raise DomainBedDataError(f"test_envs={list(test_envs)!r} leaves no training environment of {name} "
                                 f"({n} environments)")
    return out


# ------------------------------------------------------------------------------------------------
# MNIST idx files
# ------------------------------------------------------------------------------------------------
_MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Parse an idx file (optionally gzip-compressed): magic ``0x0000 <dtype> <ndim>``, big-endian
    int32 dims, then the data. Only unsigned byte data (MNIST) is supported."""
    path = str(path)
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:  # a cut download, a corrupt or non-gzip file
        raise DomainBedDataError(f"{path} is a corrupt gzip file ({type(e).__name__}: {e}); allowed: an MNIST idx "
                                 "file, gzip-compressed (.gz) or not -- download it again") from e
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise DomainBedDataError(f"{path} is not an idx file (bad magic number)")
    if data[2] != 0x08:
        raise DomainBedDataError(f"{path}: idx data type 0x{data[2]:02x} is not supported (uint8 only)")
    ndim = data[3]
    dims = np.frombuffer(data, dtype=">i4", count=ndim, offset=4).astype(np.int64)
    offset = 4 + 4 * ndim
    expected = int(np.prod(dims))
    if len(data) - offset != expected:
        raise DomainBedDataError(f"{path}: idx header says {tuple(dims)} ({expected} bytes), "
                                 f"file holds {len(data) - offset}")
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(tuple(dims))


def find_mnist_raw(root: str | os.PathLike) -> Path | None:
    """The folder holding the four MNIST idx files (gz or not): ``root/MNIST/raw``, ``root/raw`` or
    ``root`` itself; None if none has them all."""
    root = Path(root)
    for cand in (root / "MNIST" / "raw", root / "raw", root):
        if all((cand / f).exists() or (cand / (f + ".gz")).exists() for f in _MNIST_FILES.values()):
            return cand
    return None


def load_mnist(root: str | os.PathLike | None, download: bool = False) -> tuple[Tensor, Tensor]:
    """All 70,000 MNIST images ``uint8 [70000, 28, 28]`` and labels, train set then test set."""
    if root is None:
        raise DomainBedDataError("MNIST needs data.root: a folder holding MNIST/raw/*-idx?-ubyte[.gz]")
    raw = find_mnist_raw(root)
    if raw is None and download:
        MNIST(str(root), train=True, download=True)
        MNIST(str(root), train=False, download=True)
        raw = find_mnist_raw(root)
    if raw is None:
        names = ", ".join(_MNIST_FILES.values())
        raise DomainBedDataError(f"MNIST idx files not found under data.root={str(root)!r}: looked in "
                                 f"{Path(root) / 'MNIST' / 'raw'}, {Path(root) / 'raw'} and {root} for {names} "
                                 "(optionally .gz); set data.root to the folder holding MNIST/raw, or "
                                 "data.download=true when online")
    arrays = {}
    for key, fname in _MNIST_FILES.items():
        path = raw / fname
        arrays[key] = read_idx(path if path.exists() else raw / (fname + ".gz"))
    images = np.concatenate([arrays["train_images"], arrays["test_images"]])
    labels = np.concatenate([arrays["train_labels"], arrays["test_labels"]])
    if images.shape[1:] != (28, 28) or len(images) != len(labels):
        raise DomainBedDataError(f"MNIST files in {raw} have images {images.shape} and labels {labels.shape}")
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))


def rotate_uint8(images: Tensor, angle: float) -> Tensor:
    """Rotate every ``uint8 [N, H, W]`` image counter-clockwise by ``angle`` degrees about its centre
    with PIL bilinear resampling and zero fill (DomainBed's ``torchvision.transforms.functional.rotate(
    x, angle, fill=(0,), interpolation=BILINEAR)`` on a PIL image, bit-identical)."""
    if angle == 0:
        return images.clone()
    arr = images.numpy()
    out = np.empty_like(arr)
    for i in range(len(arr)):
        out[i] = np.asarray(Image.fromarray(arr[i]).rotate(angle, resample=Image.BILINEAR, fillcolor=0))
    return torch.from_numpy(out)


def _check_max_images(max_images: Any, available: int) -> int | None:
    if max_images is None:
        return None
    if not isinstance(max_images, int) or isinstance(max_images, bool) or not 1 <= max_images:
        raise DomainBedDataError(f"invalid data.max_images={max_images!r}; allowed: an integer >= 1 "
                                 f"(at most {available}) or null for all images")
    return min(max_images, available)


def _shuffle_and_deal(images: Tensor, labels: Tensor, n_envs: int, generator: torch.Generator,
                      max_images: int | None = None):
    """DomainBed's shuffle of all images, then image ``j`` goes to environment ``j % n_envs``;
    ``max_images`` keeps the first ``max_images`` of the shuffled images (a seeded subsample)."""
    perm = torch.randperm(len(images), generator=generator)
    limit = _check_max_images(max_images, len(images))
    if limit is not None:
        perm = perm[:limit]
    images, labels = images[perm], labels[perm]
    return [(images[i::n_envs], labels[i::n_envs]) for i in range(n_envs)]


class _RotatedEnvironments(MultipleDomainDataset):
    ANGLES: Sequence[int] = (0, 15, 30, 45, 60, 75)
    ENVIRONMENTS = ("0", "15", "30", "45", "60", "75")

    def _build(self, images: Tensor, labels: Tensor, seed: int, num_classes: int, max_images: int | None = None
               ) -> None:
        gen = torch.Generator().manual_seed(int(seed))
        deal = _shuffle_and_deal(images, labels, len(self.ANGLES), gen, max_images)
        for (imgs, labs), angle in zip(deal, self.ANGLES):
            env = TensorEnvironment(rotate_uint8(imgs, angle).unsqueeze(1), labs)
            self.datasets.append(env)
        self.train_datasets = list(self.datasets)
        self.input_shape = (1, images.shape[1], images.shape[2])
        self.num_classes = num_classes


class RotatedMNIST(_RotatedEnvironments):
    """DomainBed's RotatedMNIST: 6 domains of ~11,667 MNIST digits rotated 0..75 degrees."""

    INPUT_SHAPE = (1, 28, 28)

    def __init__(self, root: str | None, seed: int = 0, download: bool = False, max_images: int | None = None):
        super().__init__()
        images, labels = load_mnist(root, download)
        self._build(images, labels, seed, 10, max_images)


class RotatedDigits(_RotatedEnvironments):
    """RotatedMNIST's protocol over scikit-learn's bundled 8x8 digits (1,797 images, values 0..16
    scaled to 0..255 and rounded), no download: 6 domains of ~300 digits rotated 0..75 degrees."""

    INPUT_SHAPE = (1, 8, 8)

    def __init__(self, root: str | None = None, seed: int = 0, max_images: int | None = None):
        super().__init__()
        digits = load_digits()
        images = torch.from_numpy(np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8))
        labels = torch.from_numpy(digits.target.astype(np.int64))
        self._build(images, labels, seed, 10, max_images)


class ColoredMNIST(MultipleDomainDataset):
    """DomainBed's ColoredMNIST: label ``digit < 5`` flipped w.p. 0.25; colour = label flipped w.p.
    0.1 / 0.2 / 0.9; the image goes into channel ``colour`` of 2 (the other channel is zero)."""

    ENVIRONMENTS = ("+90%", "+80%", "-90%")
    COLOR_FLIP = (0.1, 0.2, 0.9)
    LABEL_NOISE = 0.25
    INPUT_SHAPE = (2, 28, 28)

    def __init__(self, root: str | None, seed: int = 0, download: bool = False, max_images: int | None = None):
        super().__init__()
        images, labels = load_mnist(root, download)
        gen = torch.Generator().manual_seed(int(seed))
        for (imgs, labs), e in zip(_shuffle_and_deal(images, labels, 3, gen, max_images), self.COLOR_FLIP):
            n = len(labs)
            y = (labs < 5).float()
            y = (y - (torch.rand(n, generator=gen) < self.LABEL_NOISE).float()).abs()
            colors = (y - (torch.rand(n, generator=gen) < e).float()).abs()
            x = torch.stack([imgs, imgs], dim=1)
            x[torch.arange(n), (1 - colors).long()] = 0
            self.datasets.append(TensorEnvironment(x, y.long()))
        self.train_datasets = list(self.datasets)
        self.input_shape = (2, 28, 28)
        self.num_classes = 2


# ------------------------------------------------------------------------------------------------
# Image folders
# ------------------------------------------------------------------------------------------------
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def domainbed_transforms(size: int = 224) -> tuple[Callable, Callable]:
    """DomainBed's (eval, train-augment) transforms."""
    plain = T.Compose([T.Resize((size, size)), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    augment = T.Compose([
        T.RandomResizedCrop(size, scale=(0.7, 1.0)),
        T.RandomHorizontalFlip(),
        T.ColorJitter(0.3, 0.3, 0.3, 0.3),
        T.RandomGrayscale(),
        T.ToTensor(),
        T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])
    return plain, augment


def _decode_error(path: str) -> str | None:
    """None when the image decodes completely, else the error (``verify()`` misses truncated JPEGs)."""
    try:
        with Image.open(path) as img:
            img.load()
            if img.width < 1 or img.height < 1:
                return f"empty image ({img.width}x{img.height})"
    except Exception as exc:  # noqa: BLE001 - any failure to decode is reported by name
        return f"{type(exc).__name__}: {exc}"
    return None


def image_check_cache(base: str | os.PathLike) -> Path:
    """Where the decoded-OK list of the dataset folder ``base`` is kept."""
    root = os.environ.get("RMOE_IMAGE_CHECK_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "rmoe", "image_check")
    return Path(root) / (hashlib.md5(os.path.realpath(base).encode("utf-8")).hexdigest() + ".json")


def _stamp(path: str) -> list[int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [int(st.st_size), int(st.st_mtime_ns)]


def _check_readable(paths: list[str], cache: str | os.PathLike | None = None) -> list[tuple[str, str]]:
    """Fully decode every image not already known to decode (same size and mtime as when it did);
    returns ``[(path, error), ...]``. ``cache``: a JSON file ``{path: [size, mtime_ns]}`` of the
    images that decoded, updated here (best effort)."""
    known: dict[str, list[int]] = {}
    if cache is not None:
        try:
            known = json.loads(Path(cache).read_text())
        except (OSError, ValueError):
            known = {}
    stamps = {p: _stamp(p) for p in paths}
    todo = [p for p in paths if stamps[p] is None or known.get(p) != stamps[p]]
    with ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1))) as pool:
        errors = list(pool.map(_decode_error, todo))
    bad = [(p, err) for p, err in zip(todo, errors) if err is not None]
    if cache is not None and todo:
        known.update({p: stamps[p] for p, err in zip(todo, errors) if err is None and stamps[p] is not None})
        for p, _ in bad:
            known.pop(p, None)
        try:
            Path(cache).parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(f"{cache}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(known))
            os.replace(tmp, cache)
        except OSError:
            pass
    return bad


class MultipleEnvironmentImageFolder(MultipleDomainDataset):
    """``<root>/<DIRS[0] or DIRS[1]>/<domain>/<class>/<image>`` with the domain folders ``DOMAINS``.

    ``augment``: training domains are drawn with DomainBed's augmentation. ``augment_eval``
    (DomainBed's behaviour, default): training domains are also *evaluated* through the augmenting
    transform, as DomainBed's environment datasets carry one transform for both uses.
    """

    DIRS: Sequence[str] = ()
    DOMAINS: Sequence[str] = ()
    INPUT_SHAPE = (3, 224, 224)

    def __init__(self, root: str | None, test_envs: Sequence[int] = (), augment: bool = True,
                 augment_eval: bool = True, check_images: bool = True):
        super().__init__()
        name = type(self).__name__
        if root is None:
            raise DomainBedDataError(f"{name} needs data.root: the folder holding {self.DIRS[0]}/<domain>/<class>/")
        base = next((Path(root) / d for d in self.DIRS if (Path(root) / d).is_dir()), None)
        if base is None:
            raise DomainBedDataError(f"{name}: no folder {' or '.join(repr(d) for d in self.DIRS)} under "
                                     f"data.root={str(root)!r}; expected "
                                     f"<root>/{self.DIRS[0]}/<domain>/<class>/<image>, domains {list(self.DOMAINS)}")
        found = sorted(e.name for e in os.scandir(base) if e.is_dir() and not e.name.startswith("."))
        missing = [d for d in self.DOMAINS if d not in found]
        if missing:
            raise DomainBedDataError(f"{name}: {base} lacks the domain folder(s) {missing} (found {found}); "
                                     f"expected domains {list(self.DOMAINS)}")
        test_envs = check_test_envs(name, self.ENVIRONMENTS, test_envs)
        plain, aug = domainbed_transforms(self.INPUT_SHAPE[-1])
        classes_ref: list[str] | None = None
        all_paths: list[str] = []
        for i, domain in enumerate(sorted(self.DOMAINS)):
            ddir = base / domain
            classes = sorted(e.name for e in os.scandir(ddir) if e.is_dir() and not e.name.startswith("."))
            if classes_ref is None:
                classes_ref = classes
            elif classes != classes_ref:
                raise DomainBedDataError(f"{name}: class folders of {ddir} ({classes}) differ from those of "
                                         f"{base / sorted(self.DOMAINS)[0]} ({classes_ref})")
            samples = []
            empty = []
            for c, cls in enumerate(classes):
                n = len(samples)
                for dirpath, _, files in sorted(os.walk(ddir / cls, followlinks=True)):
                    for fname in sorted(files):
                        if fname.lower().endswith(IMG_EXTENSIONS):
                            samples.append((os.path.join(dirpath, fname), c))
                if len(samples) == n:
                    empty.append(str(ddir / cls))
            if empty:
                raise DomainBedDataError(f"{name}: {len(empty)} class folder(s) hold no images: {empty[:10]}; allowed: "
                                         f"at least one image ({', '.join(IMG_EXTENSIONS)}) per class folder "
                                         "(DomainBed's torchvision ImageFolder rejects empty classes too)")
            if not samples:
                raise DomainBedDataError(f"{name}: domain folder {ddir} holds no images "
                                         f"(expected {ddir}/<class>/<image> with extensions {IMG_EXTENSIONS})")
            all_paths += [p for p, _ in samples]
            train_t = aug if (augment and i not in test_envs) else plain
            eval_t = train_t if augment_eval else plain
            self.datasets.append(ImageFolderEnvironment(samples, classes, eval_t))
            self.train_datasets.append(ImageFolderEnvironment(samples, classes, train_t))
        if check_images:
            bad = _check_readable(all_paths, image_check_cache(base))
            if bad:
                shown = "; ".join(f"{p} ({err})" for p, err in bad[:10])
                more = f" and {len(bad) - 10} more" if len(bad) > 10 else ""
                raise DomainBedDataError(f"{name}: {len(bad)} image(s) cannot be read: {shown}{more}")
        self.num_classes = len(classes_ref or [])
        self.classes = classes_ref


class PACS(MultipleEnvironmentImageFolder):
    ENVIRONMENTS = ("A", "C", "P", "S")
    DIRS = ("PACS",)
    DOMAINS = ("art_painting", "cartoon", "photo", "sketch")


class VLCS(MultipleEnvironmentImageFolder):
    ENVIRONMENTS = ("C", "L", "S", "V")
    DIRS = ("VLCS",)
    DOMAINS = ("Caltech101", "LabelMe", "SUN09", "VOC2007")


class OfficeHome(MultipleEnvironmentImageFolder):
    ENVIRONMENTS = ("A", "C", "P", "R")
    DIRS = ("OfficeHome", "office_home")
    DOMAINS = ("Art", "Clipart", "Product", "Real World")


class TerraIncognita(MultipleEnvironmentImageFolder):
    ENVIRONMENTS = ("L100", "L38", "L43", "L46")
    DIRS = ("TerraIncognita", "terra_incognita")
    DOMAINS = ("location_100", "location_38", "location_43", "location_46")


class DomainNet(MultipleEnvironmentImageFolder):
    ENVIRONMENTS = ("clip", "info", "paint", "quick", "real", "sketch")
    DIRS = ("DomainNet", "domain_net")
    DOMAINS = ("clipart", "infograph", "painting", "quickdraw", "real", "sketch")


DATASETS: dict[str, type[MultipleDomainDataset]] = {
    c.__name__: c for c in (ColoredMNIST, RotatedMNIST, RotatedDigits, VLCS, PACS, OfficeHome, TerraIncognita,
                            DomainNet)
}


def get_dataset_class(name: str) -> type[MultipleDomainDataset]:
    if name not in DATASETS:
        raise DomainBedDataError(f"unknown DomainBed dataset {name!r}; allowed: {'|'.join(DATASETS)}")
    return DATASETS[name]


def build_dataset(name: str, root: str | None, test_envs: Sequence[int], seed: int = 0, **options: Any
                  ) -> MultipleDomainDataset:
    """Build dataset ``name``; ``test_envs`` is validated against its environments first. ``test_envs``
    and ``seed`` go to the datasets that use them (image folders augment their training domains; the
    MNIST-based ones shuffle with ``seed``); ``options`` must all be options of the dataset."""
    cls = get_dataset_class(name)
    test_envs = check_test_envs(name, cls.ENVIRONMENTS, test_envs)
    accepted = inspect.signature(cls.__init__).parameters
    common = {k: v for k, v in (("test_envs", test_envs), ("seed", seed)) if k in accepted}
    return cls(root=root, **common, **options)
