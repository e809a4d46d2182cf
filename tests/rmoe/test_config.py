import dataclasses
import math

import pytest

from rmoe import ConfigError, MoEConfig, build_moe_layer


def test_defaults_and_router_aux_defaults():
    assert MoEConfig(router="topk").aux_loss == "switch"
    assert MoEConfig(router="cosine", top_k=1).aux_loss == "switch"
    c = MoEConfig(router="topany", initial_experts=8, max_experts=16)
    assert c.aux_loss == "dynmoe" and c.max_experts == 16
    assert MoEConfig(initial_experts=4).max_experts == 4


@pytest.mark.parametrize(
    "cfg, key",
    [
        ({"top_k": 5, "initial_experts": 4}, "top_k"),
        ({"router": "topany", "initial_experts": 9, "max_experts": 8}, "initial_experts"),
        ({"router": "topk", "initial_experts": 4, "max_experts": 8}, "max_experts"),
        ({"router": "bogus"}, "router"),
        ({"backend": "cuda"}, "backend"),
        ({"capacity_factor": -1.0}, "capacity_factor"),
        ({"capacity_factor": math.nan}, "capacity_factor"),
        ({"gate_noise": -0.1}, "gate_noise"),
        ({"fusion": {"ema_decay": 1.0}}, "fusion.ema_decay"),
        ({"fusion": {"ema_decay": -0.1}}, "fusion.ema_decay"),
        ({"fusion": {"agg": "max"}}, "fusion.agg"),
        ({"fusion": {"mix_alpha": 1.5}}, "fusion.mix_alpha"),
        ({"fusion": {"betta": 0.9}}, "fusion.betta"),
        ({"aux_loss": "load_importance", "gate_noise": 0.0}, "gate_noise"),
        ({"num_expert": 4}, "num_expert"),
        ({"activation": "tanh"}, "activation"),
    ],
)
def test_bad_config_names_key_value_and_allowed(cfg, key):
    with pytest.raises(ConfigError) as err:
        build_moe_layer(8, 16, **cfg)
    msg = str(err.value)
    assert f"{key}=" in msg and "allowed" in msg


# --- router-specific settings live with their router (rmoe.routing.*Options), not in MoEConfig's flat fields


def _message(**cfg) -> str:
    with pytest.raises(ConfigError) as err:
        MoEConfig.from_dict(cfg)
    return str(err.value)


def test_router_options_are_validated_by_their_router():
    from rmoe.routing import CosineOptions, LossFreeOptions

    assert {"score_fn", "bias_update_rate", "cosine_proj_dim", "cosine_init_temperature", "extra"}.isdisjoint(
        f.name for f in dataclasses.fields(MoEConfig))
    c = MoEConfig.from_dict({"router": "lossfree", "router_options": {"score_fn": "sigmoid"}})
    assert c.router_options == LossFreeOptions(score_fn="sigmoid", bias_update_rate=1e-3)
    assert MoEConfig(router="cosine", top_k=1).router_options == CosineOptions(proj_dim=256, init_temperature=0.5)
    assert _message(router="topk", router_options={"score_fn": "sigmoid"}) == (
        "invalid MoE config: router_options.score_fn='sigmoid'; allowed: no keys (router 'topk' has no settings)")
    assert _message(router="cosine", top_k=1, router_options={"proj": 3}) == (
        "invalid MoE config: router_options.proj=3; allowed: keys ['proj_dim', 'init_temperature'] for router "
        "'cosine'")
    assert _message(router="cosine", top_k=1, router_options={"proj_dim": 0}) == (
        "invalid MoE config: router_options.proj_dim=0; allowed: an integer >= 1")
    assert _message(router="cosine", top_k=1, router_options={"init_temperature": 0.0}) == (
        "invalid MoE config: router_options.init_temperature=0.0; allowed: a number > 0")
    # a round trip through to_dict keeps them
    assert MoEConfig.from_dict(c.to_dict()) == c


def test_the_previous_releases_flat_keys_are_read_with_a_deprecation_message():
    from rmoe.config import ConfigDeprecationWarning

    with pytest.warns(ConfigDeprecationWarning, match=r"'score_fn' is deprecated: use router_options.score_fn \(the"):
        old = MoEConfig.from_dict({"router": "lossfree", "score_fn": "sigmoid", "bias_update_rate": 0.5})
    assert (old.router_options.score_fn, old.router_options.bias_update_rate) == ("sigmoid", 0.5)
    with pytest.warns(ConfigDeprecationWarning, match=r"'cosine_proj_dim' is deprecated: use router_options.proj_dim"):
        assert MoEConfig.from_dict({"router": "cosine", "top_k": 1, "cosine_proj_dim": 4}).router_options.proj_dim == 4
    # another router never read them: still ignored, now with the message
    with pytest.warns(ConfigDeprecationWarning, match=r"router 'lossfree''s router_options.score_fn \(ignored for "
                                                      r"router 'topk'\)"):
        ignored = MoEConfig.from_dict({"router": "topk", "score_fn": "sigmoid"})
    assert ignored == MoEConfig(router="topk")
    with pytest.warns(ConfigDeprecationWarning, match="'extra' is deprecated: it was never read"):
        MoEConfig.from_dict({"extra": {}})
    # set on top of a config that states the new key (+moe.score_fn=softmax on moe=lossfree): the old key wins
    with pytest.warns(ConfigDeprecationWarning, match=r"\(the old key's value 'softmax' is used\)"):
        both = MoEConfig.from_dict({"router": "lossfree", "score_fn": "softmax",
                                    "router_options": {"score_fn": "sigmoid", "bias_update_rate": 0.25}})
    assert (both.router_options.score_fn, both.router_options.bias_update_rate) == ("softmax", 0.25)


def test_topany_refuses_gate_noise_it_would_not_use():
    # the routing step adds noise for every router; DynMoE's gate has none, so the value is refused, not ignored
    assert _message(router="topany", initial_experts=2, max_experts=4, gate_noise=1.0) == (
        "invalid MoE config: gate_noise=1.0; allowed: 0 for router 'topany' (DynMoE's gate has no noise)")


def test_the_slot_count_is_max_experts_everywhere_and_the_old_name_warns():
    from rmoe.config import ConfigDeprecationWarning

    layer = build_moe_layer(4, 8, router="topany", initial_experts=2, max_experts=5)
    assert layer.max_experts == layer.router.max_experts == layer.experts.max_experts == 5
    assert layer.cfg.initial_experts == 2  # the experts active at the start
    for obj, owner in ((layer, "MoELayer"), (layer.router, "TopAnyRouter"), (layer.experts, "Experts")):
        with pytest.warns(ConfigDeprecationWarning, match=rf"{owner}.num_experts is deprecated: use "
                                                          rf"{owner}.max_experts"):
            assert obj.num_experts == 5


def test_fusion_and_curriculum_decays_have_their_own_names_and_beta_still_reads_with_a_warning():
    """``beta`` meant Stateful Fusion's EMA decay and the exp_decay curriculum's factor; they are now
    ``fusion.ema_decay`` and ``curriculum.decay``. The old name is read for one release, with a warning."""
    import warnings
    from dataclasses import asdict

    from rmoe import FusionConfig
    from rmoe.config import ConfigDeprecationWarning
    from rmoe.schedules import build_schedule

    assert FusionConfig(ema_decay=0.5).ema_decay == 0.5 and "beta" not in asdict(FusionConfig())
    with pytest.warns(ConfigDeprecationWarning, match=r"fusion.beta.*fusion.ema_decay.*0.7"):
        assert FusionConfig.from_any({"beta": 0.7, "agg": "mean"}) == FusionConfig(ema_decay=0.7, agg="mean")
    with pytest.warns(ConfigDeprecationWarning, match="fusion.beta"):
        assert FusionConfig(beta=0.3).ema_decay == 0.3
    with pytest.warns(FutureWarning, match=r"curriculum.beta.*curriculum.decay"):
        old = build_schedule("exp_decay", lambda_min=1e-3, lambda_max=1e-2, beta=0.9)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        new = build_schedule("exp_decay", lambda_min=1e-3, lambda_max=1e-2, decay=0.9)
    assert old == new and new.decay == 0.9
    # λ at step 0 = max(1e-3, 1e-2 * 0.9^1) = 9e-3, by hand
    assert new.value(0, 100)[0] == pytest.approx(9e-3)
