"""DomainBed's in/out split of every environment, and its seeded hash.

``out, in_ = split_dataset(env, int(len(env) * holdout_fraction), seed_hash(trial_seed, env_i))``:
the keys ``0..len-1`` are shuffled by ``numpy.random.RandomState(seed)``; the first ``n`` keys are
the "out" (validation) split, the rest the "in" split -- bit-identical to DomainBed's ``misc``.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from .seeds import seed_hash


class SplitDataset(Dataset):
    """The items ``keys`` of ``underlying``; keeps a vectorised ``get_batch`` when it has one."""

    def __init__(self, underlying: Dataset, keys: list[int]):
        self.underlying = underlying
        self.keys = keys
        self._keys_t = torch.as_tensor(keys, dtype=torch.long)

    def __getitem__(self, i: int):
        return self.underlying[self.keys[i]]

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def has_batch(self) -> bool:
        return hasattr(self.underlying, "get_batch")

    def get_batch(self, idx: Tensor) -> tuple[Tensor, Tensor]:
        keys = self._keys_t[idx]
        if self.has_batch:
            return self.underlying.get_batch(keys)
        items = [self.underlying[int(k)] for k in keys]
        return torch.stack([x for x, _ in items]), torch.as_tensor([int(y) for _, y in items])


def split_dataset(dataset: Dataset, n: int, seed: int = 0) -> tuple[SplitDataset, SplitDataset]:
    """Random split: ``n`` items in the first dataset, the rest in the second."""
    if not 0 <= n <= len(dataset):
        raise ValueError(f"cannot split {n} items out of a dataset of {len(dataset)}")
    keys = list(range(len(dataset)))
    np.random.RandomState(seed).shuffle(keys)
    return SplitDataset(dataset, keys[:n]), SplitDataset(dataset, keys[n:])


def in_out_splits(datasets: list[Dataset], holdout_fraction: float, trial_seed: int
                  ) -> tuple[list[SplitDataset], list[SplitDataset]]:
    """Per environment ``i``: ``(in_i, out_i)`` with ``int(len * holdout_fraction)`` items out,
    keyed by ``seed_hash(trial_seed, i)``."""
    if not 0.0 < holdout_fraction < 1.0:
        raise ValueError(f"invalid holdout_fraction={holdout_fraction!r}; allowed: a number in (0, 1)")
    ins, outs = [], []
    for i, env in enumerate(datasets):
        out, in_ = split_dataset(env, int(len(env) * holdout_fraction), seed_hash(trial_seed, i))
        ins.append(in_)
        outs.append(out)
    return ins, outs
