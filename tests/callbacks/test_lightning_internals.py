"""callbacks/lightning_internals.py: the one home of Lightning's private API, pinned to the series it supports."""

from __future__ import annotations

import re
from pathlib import Path

import lightning
import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from callbacks import lightning_internals as LI

ROOT = Path(__file__).resolve().parents[2]
# every private Lightning member the project touches; each may appear in the adapter only
PRIVATE = ("_data_fetcher", "_combined_loader", "_combined_loader_states_to_load", "_load_state_dicts",
           "_should_check_val_fx", "_should_check_val_epoch", "_should_accumulate", "_can_stop_early",
           "_skip_next_val", "_save_topk_checkpoint", "_monitor_candidates", "_should_skip_saving_checkpoint",
           "_should_save_on_train_epoch_end", "_last_global_step_saved", "_on_before_batch_transfer",
           "_PrefetchDataFetcher")


def test_the_installed_and_pinned_lightning_are_the_supported_series():
    assert LI.SUPPORTED_LIGHTNING == "2.6"
    assert lightning.__version__.startswith("2.6."), lightning.__version__
    pin = re.search(r'"lightning==([\d.]+)"', (ROOT / "pyproject.toml").read_text()).group(1)
    assert pin.startswith("2.6."), pin
    LI.check_lightning_version()
    LI.check_lightning_version("2.6.0")


def test_another_lightning_series_is_refused_naming_both_versions():
    with pytest.raises(RuntimeError, match=r"lightning==2\.7\.0 is installed; .* Lightning 2\.6\.x .*allowed: "
                                           r"lightning 2\.6\.x"):
        LI.check_lightning_version("2.7.0")
    with pytest.raises(RuntimeError, match=r"lightning==3\.0\.1 is installed"):
        LI.check_lightning_version("3.0.1")


def test_no_private_lightning_member_is_used_outside_the_adapter():
    pattern = re.compile(r"\b(" + "|".join(map(re.escape, PRIVATE)) + r")\b")
    users = {}
    for folder in ("callbacks", "tasks", "rmoe"):
        for path in (ROOT / folder).rglob("*.py"):
            if path.name == "lightning_internals.py":
                continue
            hits = sorted(set(pattern.findall(path.read_text())))
            if hits:
                users[str(path.relative_to(ROOT))] = hits
    assert users == {}


class _Tiny(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(2, 1)
        self.seen = {}

    def training_step(self, batch, batch_idx):
        if batch_idx == 0:  # what the adapter reads, inside a running fit loop
            fetcher = LI.prefetch_fetcher(self.trainer)
            self.seen = {"prefetched": isinstance(LI.prefetched_batches(fetcher), list),
                         "iterator": LI.fetcher_iterator(fetcher) is not None,
                         "loaders": len(LI.train_dataloaders(self.trainer)),
                         "follows": LI.validation_follows(self.trainer),
                         "moved": LI.as_training_step_sees_it(self.trainer, self, [torch.ones(1, 2)])[0].shape}
        return self.lin(batch[0]).pow(2).mean()

    def validation_step(self, batch, batch_idx):
        pass

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_the_private_members_the_adapter_uses_exist_in_a_running_fit(tmp_path):
    """Each member the adapter touches, read on a real Trainer (a renamed member fails here, not in a run)."""
    ckpt = ModelCheckpoint(dirpath=tmp_path, monitor=None)
    trainer = L.Trainer(max_steps=2, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        accelerator="cpu", callbacks=[ckpt], num_sanity_val_steps=0, val_check_interval=1)
    loop = trainer.fit_loop
    for obj, name in ((loop, "_data_fetcher"), (loop, "_combined_loader"), (loop, "_combined_loader_states_to_load"),
                      (loop, "_can_stop_early"), (loop.epoch_loop, "_should_check_val_fx"),
                      (loop.epoch_loop, "_should_check_val_epoch"), (loop.epoch_loop, "_should_accumulate"),
                      (loop.epoch_loop, "_skip_next_val"), (ckpt, "_save_topk_checkpoint"),
                      (ckpt, "_monitor_candidates"), (ckpt, "_should_skip_saving_checkpoint"),
                      (ckpt, "_should_save_on_train_epoch_end"), (ckpt, "_last_global_step_saved")):
        assert hasattr(obj, name), f"{type(obj).__name__}.{name}"
    module = _Tiny()
    assert callable(module._on_before_batch_transfer)
    data = DataLoader(TensorDataset(torch.randn(4, 2)), batch_size=1)
    trainer.fit(module, data, DataLoader(TensorDataset(torch.randn(2, 2)), batch_size=1))
    # val_check_interval=1: a validation follows every batch
    assert module.seen == {"prefetched": True, "iterator": True, "loaders": 1, "follows": True,
                           "moved": torch.Size([1, 2])}
    LI.allow_checkpoint_resave(ckpt)
    assert ckpt._last_global_step_saved == -1
