"""A seeded, rank-sharded training loader that resumes mid-epoch exactly where it stopped.

* :class:`ResumableSampler` is a :class:`torch.utils.data.DistributedSampler` (so Lightning never
  swaps it for its own under DDP): the order of epoch ``e`` is ``randperm(n)`` under
  ``torch.Generator().manual_seed(seed + e)`` (Lightning calls ``set_epoch`` before each epoch),
  dealt to ``num_replicas`` ranks; with one process it is simply a seeded permutation per epoch.
  After :meth:`ResumableSampler.skip` the next iteration of that epoch leaves out the samples the
  interrupted run had already consumed.
* :class:`ResumableDataLoader` is a ``DataLoader`` with ``state_dict()`` / ``load_state_dict()``:
  Lightning 2.x saves the state of such train loaders in every checkpoint
  (``loops.fit_loop.state_dict.combined_loader``) and loads it back before the resumed epoch starts.
  The state is the epoch and the number of samples of that epoch the loader has handed out (counted
  where the batches leave the loader, so worker prefetching is not counted).

So a run resumed from a mid-epoch checkpoint sees the rest of the interrupted epoch in the same
order, then the following epochs exactly as the uninterrupted run would.

Length grouping (``lengths`` + ``batch_size`` + ``group_size``): this rank's permutation is cut into
consecutive mega-batches of ``group_size * batch_size`` samples; each is sorted by length (longest
first, stable), cut into batches, and the batches of the whole epoch are shuffled under the epoch's
seed. Every batch then holds samples of similar length, so dynamic padding adds few pad tokens, while
the epoch still covers each sample once in a seeded random order of batches (Hugging Face's
``LengthGroupedSampler`` does the same with mega-batches of 50 batches).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler


class ResumableSampler(DistributedSampler):
    """``DistributedSampler`` (same order: seed + epoch) that can skip the first samples of an epoch."""

    def __init__(self, dataset: Dataset, num_replicas: int = 1, rank: int = 0, shuffle: bool = True,
                 seed: int = 0, drop_last: bool = False, lengths: Sequence[int] | None = None,
                 batch_size: int = 1, group_size: int = 50):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed,
                         drop_last=drop_last)
        self._skip: tuple[int, int] | None = None  # (epoch, samples of this rank to leave out)
        if lengths is not None and len(lengths) != len(dataset):
            raise ValueError(f"lengths: {len(lengths)} values for a dataset of {len(dataset)} samples")
        if int(batch_size) < 1 or int(group_size) < 1:
            raise ValueError(f"invalid batch_size={batch_size!r} or group_size={group_size!r}; allowed: integers >= 1")
        self.lengths = None if lengths is None else [int(n) for n in lengths]
        self.batch_size, self.group_size = int(batch_size), int(group_size)

    def _grouped(self, indices: list[int]) -> list[int]:
        """``indices`` regrouped by length (module docstring); the same multiset, batch-aligned."""
        bs, mega = self.batch_size, self.group_size * self.batch_size
        batches: list[list[int]] = []
        for start in range(0, len(indices), mega):
            chunk = sorted(indices[start:start + mega], key=lambda i: -self.lengths[i])
            batches += [chunk[j:j + bs] for j in range(0, len(chunk), bs)]
        # a short batch (only the last mega-batch can leave one) goes last: the loader cuts exactly these batches
        full = [b for b in batches if len(b) == bs]
        short = [b for b in batches if len(b) < bs]
        g = torch.Generator().manual_seed(self.seed + self.epoch + 7919)
        order = torch.randperm(len(full), generator=g).tolist() if self.shuffle else range(len(full))
        return [i for k in order for i in full[k]] + [i for b in short for i in b]

    def skip(self, epoch: int, samples: int) -> None:
        """The next iteration, if it is for ``epoch``, leaves out its first ``samples`` indices."""
        self._skip = (int(epoch), int(samples))

    def __iter__(self) -> Iterator[int]:
        # a generator: the order is computed at the first draw, after Lightning's set_epoch()
        indices = list(super().__iter__())
        if self.lengths is not None:
            indices = self._grouped(indices)
        skip = 0
        if self._skip is not None:
            epoch, n = self._skip
            self._skip = None
            if epoch == self.epoch:
                skip = n
        yield from indices[skip:]


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` over a :class:`ResumableSampler` whose position in the epoch is checkpointed."""

    def __iter__(self) -> Iterator[Any]:
        sampler = self._resumable_sampler()
        pending = sampler._skip
        bs = int(self.batch_size) if self.batch_size is not None else 1
        pos = None
        for batch in super().__iter__():
            if pos is None:  # the sampler's epoch (Lightning's set_epoch) is fixed once a batch is drawn
                start = pending[1] if pending is not None and pending[0] == sampler.epoch else 0
                pos = self._position = {"epoch": int(sampler.epoch), "samples": start}
            pos["samples"] = min(pos["samples"] + bs, len(sampler))
            yield batch

    def _resumable_sampler(self) -> ResumableSampler:
        sampler = self.sampler
        if not isinstance(sampler, ResumableSampler):
            raise TypeError(f"ResumableDataLoader needs a ResumableSampler, got {type(sampler).__name__}")
        return sampler

    def state_dict(self) -> dict[str, Any]:
        sampler = self._resumable_sampler()
        pos = getattr(self, "_position", None) or {"epoch": int(sampler.epoch), "samples": 0}
        return {"epoch": int(pos["epoch"]), "samples": int(pos["samples"]),
                "dataset_len": len(sampler.dataset), "num_replicas": int(sampler.num_replicas),
                "seed": int(sampler.seed), "shuffle": bool(sampler.shuffle)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        sampler = self._resumable_sampler()
        now = {"dataset_len": len(sampler.dataset), "num_replicas": int(sampler.num_replicas),
               "seed": int(sampler.seed), "shuffle": bool(sampler.shuffle)}
        changed = {k: (state.get(k), v) for k, v in now.items() if state.get(k) != v}
        if changed:
            what = ", ".join(f"{k}: checkpoint {a!r}, now {b!r}" for k, (a, b) in changed.items())
            warnings.warn(f"training data differ from the checkpoint's ({what}): the interrupted epoch is not "
                          "resumed in its order; it restarts from its first batch", stacklevel=2)
            return
        sampler.skip(int(state["epoch"]), int(state["samples"]))


def resumable_train_loader(dataset: Dataset, batch_size: int, seed: int, trainer: Any = None,
                           shuffle: bool = True, drop_last: bool = False, lengths: Sequence[int] | None = None,
                           **loader_kwargs: Any) -> ResumableDataLoader:
    """The training loader: seeded order per epoch, sharded over the trainer's ranks, resumable;
    batches grouped by length when ``lengths`` (one per sample) is given."""
    world = int(getattr(trainer, "world_size", 1) or 1) if trainer is not None else 1
    rank = int(getattr(trainer, "global_rank", 0) or 0) if trainer is not None else 0
    sampler = ResumableSampler(dataset, num_replicas=world, rank=rank, shuffle=shuffle, seed=int(seed),
                               drop_last=drop_last, lengths=lengths, batch_size=batch_size)
    # the loader's own generator: creating its iterator does not draw from the global torch RNG
    loader_kwargs.setdefault("generator", torch.Generator().manual_seed(int(seed)))
    return ResumableDataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=drop_last,
                               **loader_kwargs)
