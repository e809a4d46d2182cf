import math

import pytest

from rmoe import ConfigError, MoEConfig, build_moe_layer


def test_defaults_and_router_aux_defaults():
    assert MoEConfig(router="topk").aux_loss == "switch"
    assert MoEConfig(router="cosine", top_k=1).aux_loss == "switch"
    c = MoEConfig(router="topany", num_experts=8, max_experts=16)
    assert c.aux_loss == "dynmoe" and c.max_experts == 16
    assert MoEConfig(num_experts=4).max_experts == 4


@pytest.mark.parametrize(
    "cfg, key",
    [
        ({"top_k": 5, "num_experts": 4}, "top_k"),
        ({"router": "topany", "num_experts": 9, "max_experts": 8}, "num_experts"),
        ({"router": "topk", "num_experts": 4, "max_experts": 8}, "max_experts"),
        ({"router": "bogus"}, "router"),
        ({"backend": "cuda"}, "backend"),
        ({"capacity_factor": -1.0}, "capacity_factor"),
        ({"capacity_factor": math.nan}, "capacity_factor"),
        ({"gate_noise": -0.1}, "gate_noise"),
        ({"fusion": {"beta": 1.0}}, "fusion.beta"),
        ({"fusion": {"beta": -0.1}}, "fusion.beta"),
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
