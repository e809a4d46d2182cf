"""GLUE LightningDataModule on Hugging Face ``datasets``.

Source: a local folder in the original GLUE TSV layout (``glue_dir``, default ``$RMOE_DATA_DIR/glue``),
parsed strictly by :mod:`tasks.glue.tsv`, or — only when asked with ``glue_dir: hub`` — the hub dataset
``nyu-mll/glue``. A null ``glue_dir`` (``RMOE_DATA_DIR`` unset) is an error naming both.
Examples are tokenised once (truncated to ``max_length``, no padding) and padded per batch
(dynamic padding). The training loader shuffles with a generator seeded from ``seed``; with
``group_by_length`` its batches hold samples of similar length (:mod:`tasks.run.samplers`).
Validation: one loader per validation split (MNLI: matched first, then mismatched), then -- when
``heldout_samples`` is set -- one over a slice held out from train (``val_heldout/*``), so an
epoch can be selected without looking at dev.
"""

from __future__ import annotations

import os
from typing import Any

import datasets
import lightning as L
import torch
from torch.utils.data import DataLoader
from transformers import AutoTokenizer

from tasks.run.common import resolve_model_path
from tasks.run.samplers import resumable_train_loader

from .tasks import GlueDataError, GlueTask, get_task
from .tsv import read_glue_tsv, task_file

HUB_DATASET = "nyu-mll/glue"
# data.glue_dir value that asks for the hub dataset (nothing is downloaded unless asked)
HUB = "hub"


def _check_positive(key: str, value: Any, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise GlueDataError(f"invalid data config: {key}={value!r}; allowed: an integer >= 1"
                            + (" or null" if allow_none else ""))


ROW_STRIDE = 1 << 24  # row ids: split k (0 = train, then the validation splits, held-out last) starts at k * ROW_STRIDE


def _with_rows(ds, split: int):
    """``ds`` with a ``row`` column: an id per example, unique across this data module's splits (the
    module's frozen-prefix cache is keyed by it)."""
    return ds.add_column("row", list(range(split * ROW_STRIDE, split * ROW_STRIDE + len(ds))))


class GLUEDataModule(L.LightningDataModule):
    """``setup()`` builds ``self.train_set`` and ``self.val_sets`` (a list, headline split first).

    ``max_train_samples`` / ``max_eval_samples`` keep a seeded random subset (for tests and
    debugging); ``null`` keeps everything.
    """

    def __init__(self, task: str, tokenizer: str, glue_dir: str | None = None, max_length: int = 128,
                 batch_size: int = 32, eval_batch_size: int | None = None, num_workers: int = 0,
                 max_train_samples: int | None = None, max_eval_samples: int | None = None,
                 seed: int = 0, heldout_samples: int | None = None, data_seed: int | None = None,
                 group_by_length: bool = False):
        super().__init__()
        self.task: GlueTask = get_task(task)
        _check_positive("data.max_length", max_length)
        _check_positive("data.batch_size", batch_size)
        _check_positive("data.eval_batch_size", eval_batch_size, allow_none=True)
        _check_positive("data.max_train_samples", max_train_samples, allow_none=True)
        _check_positive("data.max_eval_samples", max_eval_samples, allow_none=True)
        _check_positive("data.heldout_samples", heldout_samples, allow_none=True)
        if glue_dir in (None, "", "null"):
            raise GlueDataError(
                f"data.glue_dir={glue_dir!r}: no GLUE data folder (its default is $RMOE_DATA_DIR/glue, and "
                f"RMOE_DATA_DIR={os.environ.get('RMOE_DATA_DIR')!r}); allowed: set RMOE_DATA_DIR to the folder "
                "holding glue/ (and mnist/), pass data.glue_dir=<folder in the GLUE TSV layout>, or "
                f"data.glue_dir={HUB!r} to download {HUB_DATASET} from the Hugging Face hub")
        self.glue_dir = None if glue_dir == HUB else str(glue_dir)
        if self.glue_dir is not None:
            if not os.path.isdir(self.glue_dir):
                raise GlueDataError(f"data.glue_dir={self.glue_dir!r} is not a folder; allowed: a folder in the "
                                    f"GLUE TSV layout (<glue_dir>/<TaskDir>/train.tsv) or {HUB!r} for the hub dataset")
            for stem in ("train",) + tuple(s for s, _ in self.task.val_splits):
                task_file(self.glue_dir, self.task, stem)  # fail now on a missing file
        self.tokenizer_path = tokenizer
        self.max_length = max_length
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.max_train_samples, self.max_eval_samples = max_train_samples, max_eval_samples
        self.seed = seed
        self.heldout_samples = heldout_samples
        if not isinstance(group_by_length, bool):
            raise GlueDataError(f"invalid data.group_by_length={group_by_length!r}; allowed: true or false")
        self.group_by_length = group_by_length
        # rows (held-out slice, subsets) are chosen by data_seed, the training order by seed
        self.data_seed = int(seed if data_seed is None else data_seed)
        self.tokenizer = None
        self.heldout_set = None
        self.train_set = None
        self.val_sets: list = []
        self.val_names: list[str] = []

    # --- raw splits -------------------------------------------------------------------------
    def _raw_splits(self) -> dict[str, Any]:
        names = ["train"] + [s for s, _ in self.task.val_splits]
        if self.glue_dir is not None:
            return {s: datasets.Dataset.from_dict(read_glue_tsv(task_file(self.glue_dir, self.task, s), self.task))
                    for s in names}
        hub = datasets.load_dataset(HUB_DATASET, self.task.name)  # needs the network or a local HF cache
        a, b = self.task.hub_fields
        out = {}
        for stem, split in (("train", "train"),) + self.task.val_splits:
            ds = hub[split]
            cols = {"text_a": ds[a], "label": ds["label"]}
            if b is not None:
                cols["text_b"] = ds[b]
            out[stem] = datasets.Dataset.from_dict(cols)
        return out

    def _subset(self, ds, n: int | None):
        if n is None or n >= len(ds):
            return ds
        return ds.shuffle(seed=self.data_seed).select(range(n))

    def heldout_split(self, n_rows: int) -> tuple[list[int], list[int]]:
        """``(train_rows, heldout_rows)``: a ``data_seed``-seeded permutation of the ``n_rows`` training
        rows; the first ``heldout_samples`` are held out, the rest (in original order) train."""
        n = self.heldout_samples
        if n is None:
            return list(range(n_rows)), []
        if n >= n_rows:
            raise GlueDataError(f"invalid data config: heldout_samples={n}; allowed: fewer than the "
                                f"{n_rows} training rows of {self.task.name}")
        perm = torch.randperm(n_rows, generator=torch.Generator().manual_seed(self.data_seed)).tolist()
        held = sorted(perm[:n])
        held_set = set(held)
        return [i for i in range(n_rows) if i not in held_set], held

    def _tokenize(self, ds):
        tok, ml = self.tokenizer, self.max_length

        def enc(batch):
            args = (batch["text_a"], batch["text_b"]) if "text_b" in batch else (batch["text_a"],)
            return tok(*args, truncation=True, max_length=ml)

        cols = [c for c in ds.column_names if c != "label"]
        ds = ds.map(enc, batched=True, remove_columns=cols)
        return ds.rename_column("label", "labels")

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        # the fast tokenizer's thread pool does not survive the fork of dataloader workers or of
        # multirun jobs; this is the one place the project sets it (a user's own value wins)
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        self.tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(self.tokenizer_path))
        raw = self._raw_splits()
        train_rows, held_rows = self.heldout_split(len(raw["train"]))
        train = raw["train"].select(train_rows) if held_rows else raw["train"]
        self.train_set = _with_rows(self._tokenize(self._subset(train, self.max_train_samples)), 0)
        self.val_names = [s for s, _ in self.task.val_splits]
        self.val_sets = [_with_rows(self._tokenize(self._subset(raw[s], self.max_eval_samples)), k + 1)
                         for k, s in enumerate(self.val_names)]
        if held_rows:  # evaluated after the dev split(s), logged as val_heldout/*
            self.heldout_set = _with_rows(self._tokenize(raw["train"].select(held_rows)), len(self.val_sets) + 1)
            self.val_names.append("heldout")
            self.val_sets.append(self.heldout_set)

    # --- loaders ----------------------------------------------------------------------------
    def collate(self, features: list[dict]) -> dict[str, torch.Tensor]:
        labels = [f["labels"] for f in features]
        batch = self.tokenizer.pad([{k: v for k, v in f.items() if k not in ("labels", "row")} for f in features],
                                   padding=True, return_tensors="pt")
        dtype = torch.float32 if self.task.is_regression else torch.long
        batch["labels"] = torch.tensor(labels, dtype=dtype)
        if all("row" in f for f in features):
            batch["row"] = torch.tensor([f["row"] for f in features], dtype=torch.long)
        return dict(batch)

    def train_dataloader(self) -> DataLoader:
        # epoch e: randperm under seed + e, dealt to the data-parallel ranks; resumable mid-epoch
        # (the loader's position is checkpointed: tasks/run/samplers.py)
        lengths = [len(ids) for ids in self.train_set["input_ids"]] if self.group_by_length else None
        return resumable_train_loader(self.train_set, self.batch_size, self.seed, trainer=self.trainer,
                                      collate_fn=self.collate, num_workers=self.num_workers, lengths=lengths)

    def val_dataloader(self) -> list[DataLoader]:
        return [DataLoader(ds, batch_size=self.eval_batch_size, shuffle=False, collate_fn=self.collate,
                           num_workers=self.num_workers) for ds in self.val_sets]
