"""FFN -> MoE surgery on a tiny Hugging Face BERT and a tiny timm ViT keeps the model's outputs."""

import pytest
import timm
import torch
from transformers import BertConfig, BertModel

from rmoe import find_moe_layers, moe_losses, moefy_bert, moefy_vit

ROUTERS = [
    {"router": "topk", "initial_experts": 4, "top_k": 2},
    {"router": "cosine", "initial_experts": 6, "top_k": 2},
    {"router": "topany", "initial_experts": 4, "max_experts": 8, "top_k": 1},
    {"router": "topany", "initial_experts": 4, "max_experts": 8, "top_k": 1, "fusion": {"ema_decay": 0.99}},
]


def tiny_bert():
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=32)
    return BertModel(cfg).eval()


@pytest.mark.parametrize("moe_cfg", ROUTERS)
def test_moefied_tiny_bert_gives_original_outputs(moe_cfg):
    model = tiny_bert()
    ids = torch.randint(0, 100, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 6:] = 0
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).last_hidden_state
    layers = moefy_bert(model, [0, 2], moe_cfg)
    assert len(layers) == 2 and len(find_moe_layers(model)) == 2
    model.eval()
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask).last_hidden_state
    real = mask.bool()
    assert torch.allclose(out[real], ref[real], atol=1e-5)
    # padding tokens were not routed: 9 + 6 real tokens
    assert layers[0].last_routing.num_tokens == 15
    aux, z = moe_losses(model)
    assert aux.dim() == 0 and torch.isfinite(aux) and torch.isfinite(z)


def test_moefied_bert_trains_and_positional_mask_is_seen():
    model = tiny_bert().train()
    moefy_bert(model, [1], {"router": "topk", "initial_experts": 4, "top_k": 2})
    ids = torch.randint(0, 100, (2, 5))
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    out = model(ids, mask).last_hidden_state  # attention mask given positionally
    (out.sum() + moe_losses(model)[0]).backward()
    moe = find_moe_layers(model)[0][1]
    assert moe.last_routing.num_tokens == 7
    assert moe.experts.w1.grad is not None and moe.router.weight.grad is not None


def test_bad_layer_index_is_named():
    with pytest.raises(ValueError, match="moe.layers entry 7"):
        moefy_bert(tiny_bert(), [7], {"router": "topk", "initial_experts": 2, "top_k": 1})


@pytest.mark.parametrize("moe_cfg", ROUTERS)
def test_moefied_tiny_vit_gives_original_outputs(moe_cfg):
    torch.manual_seed(0)
    vit = timm.models.vision_transformer.VisionTransformer(
        img_size=8, patch_size=2, in_chans=1, num_classes=10, embed_dim=32, depth=4, num_heads=4).eval()
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        ref = vit(x)
    moefy_vit(vit, [1, 3], moe_cfg)
    vit.eval()
    with torch.no_grad():
        out = vit(x)
    assert len(find_moe_layers(vit)) == 2
    assert torch.allclose(out, ref, atol=1e-5)
