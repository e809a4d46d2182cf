"""The task modules' optimizers use torch's fused Adam/AdamW on CPU, and it computes the textbook update."""

from types import SimpleNamespace

import torch
from torch import nn

from tasks.run.moe_module import fused_if_supported


def test_fused_adamw_step_is_the_textbook_update():
    torch.manual_seed(0)
    p = nn.Parameter(torch.randn(5, 3))
    g1, g2 = torch.randn(5, 3), torch.randn(5, 3)
    opt = torch.optim.AdamW([p], lr=0.1, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, **fused_if_supported([p]))
    assert opt.defaults["fused"] is True
    w = p.detach().clone()
    m = torch.zeros_like(w)
    v = torch.zeros_like(w)
    for t, g in enumerate((g1, g2), start=1):
        p.grad = g.clone()
        opt.step()
        # Loshchilov & Hutter: decoupled decay, then the bias-corrected Adam step
        w = w * (1 - 0.1 * 0.01)
        m = 0.9 * m + 0.1 * g
        v = 0.999 * v + 0.001 * g * g
        m_hat, v_hat = m / (1 - 0.9 ** t), v / (1 - 0.999 ** t)
        w = w - 0.1 * m_hat / (v_hat.sqrt() + 1e-8)
        assert torch.allclose(p.detach(), w, atol=1e-6), t


def test_fused_is_asked_only_for_floating_cpu_or_cuda_parameters():
    assert fused_if_supported([nn.Parameter(torch.zeros(2))]) == {"fused": True}
    assert fused_if_supported([]) == {}
    assert fused_if_supported([nn.Parameter(torch.zeros(2, device="meta"))]) == {}


def test_glue_and_domainbed_modules_build_fused_optimizers(build_module):
    bert = {"pretrained": None, "config": {"model_type": "bert", "vocab_size": 100, "hidden_size": 16,
            "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 32}}
    glue = build_module(["task=glue/rte"], backbone=bert, moe=None, freeze_layers=1)
    glue._trainer = SimpleNamespace(estimated_stepping_batches=10)  # what configure_optimizers reads
    opt = glue.configure_optimizers()["optimizer"]
    assert opt.defaults["fused"] is True
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == sum(
        p.numel() for p in glue.parameters() if p.requires_grad)
    vit = {"arch": None, "patch_size": 4, "embed_dim": 16, "depth": 2, "num_heads": 2, "mlp_ratio": 2.0}
    db = build_module(["task=domainbed/rotated_digits"], backbone=vit, input_shape=[2, 8, 8], num_classes=3, moe=None,
                      algorithm="ERM", lr=1e-3)
    assert db.configure_optimizers().defaults["fused"] is True
