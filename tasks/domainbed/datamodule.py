"""DomainBed DataModule: the environments, their in/out splits, one batch per training domain.

* Data: the MNIST shuffle and ColoredMNIST's colour and label-noise coins are drawn from ``data_seed``, which is
  the training ``seed`` unless given (DomainBed's ``scripts/train.py`` seeds torch with ``--seed`` before
  ``datasets.py`` draws them).
* Splits: ``out, in = split_dataset(env_i, int(len * holdout_fraction), seed_hash(trial_seed, i))``.
* Training: an endless stream; step ``s`` yields ``[(x_e, y_e) for each training env e]`` with
  ``batch_size`` indices drawn uniformly with replacement from ``in_e`` (DomainBed's
  InfiniteDataLoader) by a generator seeded with ``seed_hash(seed, s)`` (``seed_hash(seed, s, rank)``
  on data-parallel ranks > 0) -- so a resumed run draws exactly the batches the uninterrupted run
  would have drawn.
* Evaluation: ``val_dataloader()`` is the list ``[env0_in, env1_in, ..., env0_out, env1_out, ...]``
  (names in ``eval_names``), DomainBed's evaluation order.
"""

from __future__ import annotations

import inspect
import math
import os
from collections.abc import Iterator, Sequence
from typing import Any

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from tasks.run.checks import _fail, _get, _has  # the config readers every check uses

from .datasets import DomainBedDataError, MultipleDomainDataset, build_dataset, check_test_envs, get_dataset_class
from .splits import SplitDataset, in_out_splits, seed_hash


class DomainBatchStream(IterableDataset):
    """Endless ``[(x, y) per training env]`` from step ``start_step`` on (see module docstring)."""

    def __init__(self, envs: Sequence[SplitDataset], batch_size: int, seed: int, start_step: int = 0, rank: int = 0):
        self.envs, self.batch_size, self.seed, self.start_step = list(envs), int(batch_size), int(seed), int(start_step)
        self.rank = int(rank)

    def batch(self, step: int) -> list[tuple[Tensor, Tensor]]:
        key = seed_hash(self.seed, step) if self.rank == 0 else seed_hash(self.seed, step, self.rank)
        gen = torch.Generator().manual_seed(key)
        out = []
        for env in self.envs:
            idx = torch.randint(len(env), (self.batch_size,), generator=gen)
            out.append(env.get_batch(idx))
        return out

    def __iter__(self) -> Iterator[list[tuple[Tensor, Tensor]]]:
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        step = self.start_step + wid
        while True:
            yield self.batch(step)
            step += nw


class _Batches(Dataset):
    """Consecutive batches of a split (vectorised gather for in-memory environments)."""

    def __init__(self, split: SplitDataset, batch_size: int):
        self.split, self.batch_size = split, batch_size

    def __len__(self) -> int:
        return math.ceil(len(self.split) / self.batch_size)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        idx = torch.arange(i * self.batch_size, min((i + 1) * self.batch_size, len(self.split)))
        return self.split.get_batch(idx)


class DomainBedDataModule(L.LightningDataModule):
    """``dataset``: a name of :data:`tasks.domainbed.datasets.DATASETS`; ``root``: its data folder;
    ``test_envs``: held-out environment indices (checked here, at construction, and before anything is built by
    :meth:`check_config`)."""

    @staticmethod
    def check_config(cfg: Any) -> None:
        """``data.test_envs``: a non-empty list of distinct indices of ``data.dataset``'s environments leaving at
        least one for training (:func:`tasks.run.checks.check_data` calls this before anything is built)."""
        if not _has(cfg, "data.test_envs") or _get(cfg, "data.dataset") is None:
            return
        envs = _get(cfg, "data.test_envs")
        dataset = _get(cfg, "data.dataset")
        try:
            environments = list(get_dataset_class(dataset).ENVIRONMENTS)
        except ValueError:
            return  # the datamodule names an unknown dataset itself
        allowed = (f"a non-empty list of distinct indices of {dataset}'s environments "
                   f"({', '.join(f'{i}={e}' for i, e in enumerate(environments))}) leaving at least one for training")
        if not isinstance(envs, (list, tuple)) or not envs:
            _fail("data.test_envs", envs, allowed, "no test environment: nothing is held out to test on")
        try:
            check_test_envs(dataset, environments, list(envs))
        except DomainBedDataError as e:
            _fail("data.test_envs", list(envs), allowed, str(e))

    def __init__(self, dataset: str, root: str | None, test_envs: Sequence[int], holdout_fraction: float = 0.2,
                 trial_seed: int = 0, hparams_seed: int = 0, data_seed: int | None = None, seed: int = 0,
                 batch_size: int = 32, eval_batch_size: int = 128, num_workers: int = 0, augment: bool | None = None,
                 augment_eval: bool | None = None, check_images: bool | None = None, download: bool | None = None,
                 max_images: int | None = None):
        super().__init__()
        cls = get_dataset_class(dataset)
        root_param = inspect.signature(cls.__init__).parameters.get("root")
        if root is None and root_param is not None and root_param.default is inspect.Parameter.empty:
            raise ValueError(f"invalid data.root=None: dataset {dataset} needs its data folder (the default is "
                             f"$RMOE_DATA_DIR/..., and RMOE_DATA_DIR={os.environ.get('RMOE_DATA_DIR')!r}); allowed: "
                             "set RMOE_DATA_DIR to the folder holding mnist/ (and your DomainBed datasets), or pass "
                             "data.root=<folder>")
        self.dataset_name = dataset
        self.environments = list(cls.ENVIRONMENTS)
        self.test_envs = check_test_envs(dataset, cls.ENVIRONMENTS, list(test_envs))
        if not 0.0 < holdout_fraction < 1.0:
            raise ValueError(f"invalid data.holdout_fraction={holdout_fraction!r}; allowed: a number in (0, 1)")
        for key, v in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"invalid data.{key}={v!r}; allowed: an integer >= 1")
        self.root, self.holdout_fraction = root, float(holdout_fraction)
        self.trial_seed, self.hparams_seed = int(trial_seed), int(hparams_seed)
        # the MNIST shuffle and ColoredMNIST's coins: the training seed unless data_seed is given (DomainBed)
        self.data_seed, self.seed = int(seed if data_seed is None else data_seed), int(seed)
        self.batch_size, self.eval_batch_size, self.num_workers = batch_size, eval_batch_size, int(num_workers)
        # dataset options: null = the dataset's default; a value the dataset has no option for is an error
        options = dict(augment=augment, augment_eval=augment_eval, check_images=check_images, download=download,
                       max_images=max_images)
        accepted = set(inspect.signature(cls.__init__).parameters)
        unused = sorted(k for k, v in options.items() if v is not None and k not in accepted)
        if unused:
            k = unused[0]
            allowed = sorted(k2 for k2 in options if k2 in accepted)
            raise ValueError(f"invalid data.{k}={options[k]!r}: dataset {dataset} has no such option; allowed: null"
                             f" (the options of {dataset} are {', '.join(allowed) or 'none'})")
        self.dataset_kwargs = {k: v for k, v in options.items() if v is not None}
        self.data: MultipleDomainDataset | None = None
        self.train_envs = [i for i in range(len(self.environments)) if i not in self.test_envs]
        n = len(self.environments)
        self.eval_names = [f"env{i}_in" for i in range(n)] + [f"env{i}_out" for i in range(n)]

    # ----------------------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self.data is not None:
            return
        self.data = build_dataset(self.dataset_name, self.root, self.test_envs, seed=self.data_seed,
                                  **self.dataset_kwargs)
        self.in_splits, self.out_splits = in_out_splits(self.data.datasets, self.holdout_fraction, self.trial_seed)
        train_in, _ = in_out_splits(self.data.train_datasets, self.holdout_fraction, self.trial_seed)
        self.train_splits = [train_in[i] for i in self.train_envs]

    @property
    def input_shape(self) -> tuple[int, ...]:
        return get_dataset_class(self.dataset_name).INPUT_SHAPE if self.data is None else self.data.input_shape

    @property
    def steps_per_epoch(self) -> float:
        """DomainBed's ``min_e len(in_e) / batch_size`` over all environments."""
        self.setup()
        return min(len(s) / self.batch_size for s in self.in_splits)

    def _start_step(self) -> int:
        """The batches drawn before this fit started: one per micro-batch of every optimizer step."""
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 0
        return int(trainer.global_step) * int(getattr(trainer, "accumulate_grad_batches", 1) or 1)

    def train_dataloader(self) -> DataLoader:
        self.setup()
        trainer = getattr(self, "trainer", None)
        rank = int(trainer.global_rank) if trainer is not None else 0
        stream = DomainBatchStream(self.train_splits, self.batch_size, self.seed, self._start_step(), rank)
        return DataLoader(stream, batch_size=None, num_workers=self.num_workers,
                          persistent_workers=False, pin_memory=False)

    def _eval_loader(self, split: SplitDataset) -> DataLoader:
        if split.has_batch:  # in-memory tensors: whole batches, no per-item collation
            return DataLoader(_Batches(split, self.eval_batch_size), batch_size=None, shuffle=False)
        return DataLoader(split, batch_size=self.eval_batch_size, shuffle=False, num_workers=self.num_workers)

    def val_dataloader(self) -> list[DataLoader]:
        self.setup()
        return [self._eval_loader(s) for s in self.in_splits + self.out_splits]

    def describe(self) -> dict[str, Any]:
        self.setup()
        return {"dataset": self.dataset_name, "environments": self.environments, "test_envs": self.test_envs,
                "in_sizes": [len(s) for s in self.in_splits], "out_sizes": [len(s) for s in self.out_splits]}
