"""The GLUE module's frozen prefix (module.freeze_layers) and its per-example cache (module.cache_frozen)."""

import lightning as L
import pytest
import torch
from lightning.pytorch.trainer.states import TrainerFn

BACKBONE = {"pretrained": None, "config": {"model_type": "bert", "vocab_size": 100, "hidden_size": 16,
            "num_hidden_layers": 3, "num_attention_heads": 2, "intermediate_size": 32,
            "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1}}
MOE = {"name": "moe_topk", "router": "topk", "initial_experts": 4, "top_k": 2, "layers": [2], "init": "upcycle",
       "expert_dropout": 0.1}


def batch(rows, lengths, width=None):
    """Right-padded batch: row r has tokens 3 + (r * 7 + j) % 90 for j < its length."""
    width = width or max(lengths)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, (r, n) in enumerate(zip(rows, lengths)):
        ids[i, :n] = torch.tensor([3 + (r * 7 + j) % 90 for j in range(n)])
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids),
            "row": torch.tensor(rows), "labels": torch.zeros(len(rows), dtype=torch.long)}


def fitting(module):
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.state.fn = TrainerFn.FITTING
    module.trainer = trainer
    return module


@pytest.fixture
def glue_module(build_module):
    """The GLUE module as rmoe-train builds it (task=glue/rte), on the tiny backbone and MoE above."""
    return lambda **args: build_module(["task=glue/rte"], backbone=BACKBONE, moe=MOE, **args)


@pytest.fixture
def pair(glue_module):
    torch.manual_seed(0)
    frozen = glue_module(freeze_layers=2, cache_frozen=True)
    plain = glue_module(freeze_layers=0)
    plain.load_state_dict(frozen.state_dict())
    return frozen, plain


def test_frozen_forward_equals_the_hugging_face_forward_in_eval(pair):
    frozen, plain = pair
    frozen.eval(), plain.eval()
    b = batch([0, 1, 2], [5, 9, 3])
    with torch.no_grad():
        assert torch.equal(frozen(b), plain(b))


def test_the_frozen_prefix_stays_in_eval_mode(pair):
    frozen, plain = pair
    frozen.train()
    assert not frozen.encoder.embeddings.training
    assert [blk.training for blk in frozen.encoder.encoder.layer] == [False, False, True]
    assert frozen.head.training
    # in train mode the frozen prefix draws no dropout: two forwards under one seed give the prefix the
    # same output, and with the trainable layers in eval mode the logits agree with the plain model's eval
    frozen.encoder.encoder.layer[2].eval(), frozen.head.eval()
    plain.eval()
    b = batch([0, 1], [6, 4])
    with torch.no_grad():
        assert torch.allclose(frozen(b), plain(b), atol=1e-6)


def test_cached_prefix_gives_the_logits_of_the_recomputed_one_and_pays_once(pair, monkeypatch):
    frozen, _ = pair
    fitting(frozen).train()
    calls = []
    emb = frozen.encoder.embeddings
    monkeypatch.setattr(emb, "forward", lambda *a, f=emb.forward, **k: calls.append(1) or f(*a, **k))
    first = batch([0, 1, 2, 3], [5, 9, 3, 7])
    torch.manual_seed(1)
    a = frozen(first)
    assert len(calls) == 1 and sorted(frozen._frozen_cache) == [0, 1, 2, 3]
    # the same rows in another order, padded wider: read from the cache, the same logits (dropout in
    # the trainable layers draws the same numbers under the same seed)
    again = batch([3, 1, 0, 2], [7, 9, 5, 3], width=12)
    torch.manual_seed(1)
    b = frozen(again)
    assert len(calls) == 1  # no recomputation
    # the reference: the prefix recomputed (cache off), same seed, same batch
    frozen.cache_frozen = False
    torch.manual_seed(1)
    c = frozen(again)
    assert len(calls) == 2
    assert torch.allclose(b, c, atol=1e-5), (b - c).abs().max()
    assert a.shape == b.shape


def test_a_batch_with_an_unseen_row_recomputes_and_adds_it(pair):
    frozen, _ = pair
    fitting(frozen).eval()
    with torch.no_grad():
        frozen(batch([0, 1], [4, 5]))
        frozen(batch([1, 2], [5, 6]))
    assert sorted(frozen._frozen_cache) == [0, 1, 2]
    assert frozen._frozen_cache[2].shape == (6, 16)


def test_cache_is_used_only_while_fitting(pair):
    frozen, _ = pair
    frozen.eval()
    with torch.no_grad():
        frozen(batch([0, 1], [4, 5]))  # no trainer: predict / plain calls never touch the cache
    assert frozen._frozen_cache == {}


def test_a_row_id_reused_for_another_example_is_an_error(pair):
    frozen, _ = pair
    fitting(frozen).eval()
    with torch.no_grad():
        frozen(batch([0, 1], [4, 5]))
        with pytest.raises(RuntimeError, match="row 1 has 5 tokens cached and 7 in this batch"):
            frozen(batch([0, 1], [4, 7]))


def test_cache_frozen_needs_a_frozen_prefix(glue_module):
    with pytest.raises(ValueError, match=r"module.cache_frozen=True with module.freeze_layers=0; allowed: false, or "
                                         r"true with freeze_layers >= 1"):
        glue_module(freeze_layers=0, cache_frozen=True)
