"""Registries of rmoe.registry: config validation reads them; a registration makes a name valid."""

import pytest
import torch
import torch.nn.functional as F

from rmoe import ConfigError, MoEConfig, build_moe_layer
from rmoe.experts import Activation, Experts, TorchDroplessBackend
from rmoe.losses import AuxInputs, register_aux_loss
from rmoe.registry import ACTIVATIONS, AUX_LOSSES, BACKENDS, ROUTERS, Registry
from rmoe.routing import TopKRouter


@pytest.fixture
def cleanup():
    """Names registered by a test, removed afterwards: ``cleanup.append((registry, name))``."""
    added = []
    yield added
    for reg, name in added:
        reg.unregister(name)


def fail_message(**cfg):
    with pytest.raises(ConfigError) as err:
        MoEConfig(**cfg)
    return str(err.value)


def test_builtin_names_in_registration_order():
    assert ROUTERS.names() == ("topk", "cosine", "topany", "lossfree", "expert_choice")
    assert BACKENDS.names() == ("torch", "megablocks")
    assert ACTIVATIONS.names() == ("gelu", "gelu_tanh", "relu", "silu")
    assert AUX_LOSSES.names() == ("switch", "load_importance", "load_importance_tutel", "dynmoe",
                                  "gshard_binary", "global_batch", "seq_balance", "none")


@pytest.mark.parametrize("cfg, message", [
    ({"router": "hash"}, "router='hash'; allowed: topk|cosine|topany|lossfree|expert_choice"),
    ({"backend": "cuda"}, "backend='cuda'; allowed: torch|megablocks"),
    ({"activation": "tanh"}, "activation='tanh'; allowed: gelu|gelu_tanh|relu|silu"),
    ({"aux_loss": "seq_level"}, "aux_loss='seq_level'; allowed: switch|load_importance|load_importance_tutel|"
                                "dynmoe|gshard_binary|global_batch|seq_balance|none or null (router default)"),
    # the aux losses allowed per router family
    ({"router": "topk", "aux_loss": "dynmoe"},
     "aux_loss='dynmoe'; allowed: switch|load_importance|load_importance_tutel|global_batch|seq_balance|none "
     "for router 'topk'"),
    ({"router": "topany", "aux_loss": "switch"}, "aux_loss='switch'; allowed: dynmoe|gshard_binary|none for router "
                                                 "'topany'"),
    ({"router": "topk", "aux_loss": "load_importance_tutel", "gate_noise": 0.0},
     "gate_noise=0.0; allowed: > 0 when aux_loss='load_importance_tutel' (it needs noise)"),
    # router traits: adaptive pool, dropless
    ({"router": "cosine", "top_k": 1, "initial_experts": 2, "max_experts": 4},
     "max_experts=4; allowed: equal to initial_experts (2) for router 'cosine'; only topany has an adaptive pool"),
    ({"router": "topany", "capacity_factor": 1.5},
     "capacity_factor=1.5; allowed: 0 for router 'topany' (it is dropless)"),
    ({"router": "topany", "batch_prioritized_routing": True},
     "batch_prioritized_routing=True; allowed: false for router 'topany' (it is dropless)"),
    # unhashable: no name
    ({"router": ["topk"]}, "router=['topk']; allowed: topk|cosine|topany|lossfree|expert_choice"),
])
def test_validation_names_key_value_and_the_registered_names(cfg, message):
    assert fail_message(**cfg) == f"invalid MoE config: {message}"


def test_registering_a_router_makes_it_valid(cleanup):
    assert "toy" not in ROUTERS

    class ToyRouter(TopKRouter):
        """topk with an adaptive pool and a different default aux loss: traits read by validation."""

        default_aux_loss = "none"
        adaptive_pool = True

    ROUTERS.register("toy", ToyRouter)
    cleanup.append((ROUTERS, "toy"))
    cfg = MoEConfig(router="toy", initial_experts=2, max_experts=3, top_k=1)
    assert cfg.aux_loss == "none" and cfg.max_experts == 3
    # now two routers have an adaptive pool, and the allowed lists name the new router
    assert "only topany|toy has an adaptive pool" in fail_message(router="topk", initial_experts=2, max_experts=3)
    assert "allowed: topk|cosine|topany|lossfree|expert_choice|toy" in fail_message(router="nope")
    layer = build_moe_layer(4, 8, router="toy", initial_experts=2, max_experts=3, top_k=1)
    assert type(layer.router) is ToyRouter
    y, rec = layer(torch.randn(5, 4))
    assert y.shape == (5, 4) and rec.aux_loss.item() == 0.0


def test_registering_an_aux_loss_makes_it_valid_and_routers_use_it(cleanup):
    register_aux_loss("sq_probs", families=("softmax",))(lambda a: a.probs.pow(2).sum())
    cleanup.append((AUX_LOSSES, "sq_probs"))
    torch.manual_seed(0)
    layer = build_moe_layer(4, 8, router="topk", initial_experts=3, top_k=2, aux_loss="sq_probs").eval()
    x = torch.randn(6, 4)
    _, rec = layer(x)
    # by hand: softmax of the router's logits W x (no noise in eval), squared and summed
    probs = torch.softmax(x @ layer.router.weight.t(), dim=-1)
    assert rec.aux_loss.item() == pytest.approx(probs.pow(2).sum().item(), rel=1e-6)
    # a softmax-family loss is not allowed for top-any, and the allowed list does not name it
    assert fail_message(router="topany", aux_loss="sq_probs") == (
        "invalid MoE config: aux_loss='sq_probs'; allowed: dynmoe|gshard_binary|none for router 'topany'")


def test_an_aux_loss_for_every_family_fits_every_router(cleanup):
    register_aux_loss("zero_any")(lambda a: a.logits.sum() * 0.0)
    cleanup.append((AUX_LOSSES, "zero_any"))
    assert MoEConfig(router="topany", aux_loss="zero_any").aux_loss == "zero_any"
    assert MoEConfig(router="topk", aux_loss="zero_any").aux_loss == "zero_any"
    assert fail_message(router="topk", aux_loss="dynmoe").endswith(
        "allowed: switch|load_importance|load_importance_tutel|global_batch|seq_balance|none|zero_any for router "
        "'topk'")


def test_registering_an_activation_makes_it_valid(cleanup):
    ACTIVATIONS.register("square", Activation(lambda h: h * h))  # no backward kernel: autograd fallback
    cleanup.append((ACTIVATIONS, "square"))
    assert MoEConfig(activation="square").activation == "square"
    experts = Experts(2, 3, 4, activation="square", bias=False)
    x = torch.randn(5, 3, requires_grad=True)
    idx = torch.tensor([[0], [1], [0], [1], [1]])
    w = torch.ones(5, 1)
    y = TorchDroplessBackend()(experts, x, idx, w)

    def by_hand(xs):  # expert e(x) = (x W1[e])^2 W2[e]
        return torch.stack([((xs[i] @ experts.w1[e]) ** 2) @ experts.w2[e] for i, e in enumerate(idx[:, 0].tolist())])

    assert torch.allclose(y, by_hand(x), atol=1e-5)
    y.sum().backward()
    x2 = x.detach().clone().requires_grad_(True)
    by_hand(x2).sum().backward()
    assert torch.allclose(x.grad, x2.grad, atol=1e-5)


def test_registering_a_backend_makes_it_valid_with_its_traits(cleanup):
    class NoCapacity(TorchDroplessBackend):
        supports_capacity = False

    BACKENDS.register("nocap", NoCapacity)
    cleanup.append((BACKENDS, "nocap"))
    assert MoEConfig(backend="nocap").backend == "nocap"
    assert fail_message(backend="nocap", capacity_factor=1.0) == (
        "invalid MoE config: capacity_factor=1.0; allowed: 0 for backend 'nocap' (dropless)")
    assert type(build_moe_layer(4, 8, backend="nocap", initial_experts=2).backend) is NoCapacity


def test_megablocks_backend_runs_capacity_drops():
    """The MegaBlocks adapter runs whatever the router kept (dropped slots are -1, tests/rmoe/test_megablocks.py)."""
    assert MoEConfig(backend="megablocks", capacity_factor=1.0).capacity_factor == 1.0


def test_registry_rejects_a_second_registration_of_a_name():
    reg = Registry("thing")
    reg.register("a", 1)
    with pytest.raises(ValueError, match="thing 'a' is already registered"):
        reg.register("a", 2)
    reg.register("a", 2, replace=True)
    assert reg["a"] == 2 and list(reg) == ["a"]
    with pytest.raises(KeyError, match="unknown thing 'b'; allowed: a"):
        reg["b"]


def test_builtin_aux_losses_by_name_equal_the_pure_functions():
    torch.manual_seed(1)
    logits = torch.randn(5, 4)
    probs = torch.softmax(logits, -1)
    a = AuxInputs(logits=logits, noisy_logits=logits, probs=probs, gates=probs, first_choice=probs.argmax(-1),
                  active=torch.ones(4, dtype=torch.bool), top_k=2, noise_std=0.25)
    # switch by hand: E * Σ_e f_e P_e
    f = F.one_hot(probs.argmax(-1), 4).float().mean(0)
    assert float(AUX_LOSSES["switch"](a)) == pytest.approx(float(4 * (f * probs.mean(0)).sum()), rel=1e-6)
    assert float(AUX_LOSSES["none"](a)) == 0.0
