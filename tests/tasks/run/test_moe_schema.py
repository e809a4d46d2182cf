"""The ``moe`` group's base (``tasks.run.moe_schema``): every default in one home, the method files state only
what sets their method apart, and runs saved before the base existed continue."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from rmoe.config import FusionConfig, MoEConfig
from rmoe.routing import CosineOptions, LossFreeOptions
from tasks.run.continuation import ResumeChangeError, check_continuation
from tasks.run.moe_schema import fusion_defaults, layer_defaults, router_options_defaults
from tasks.train import CONF_DIR

MOE = Path(CONF_DIR) / "moe"
METHODS = sorted(p.stem for p in MOE.glob("*.yaml") if not p.name.startswith("_"))


def _merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _own_and_base(method: str) -> tuple[dict, dict]:
    """``(what the file states, what its defaults list gives)``, read from the YAML by hand."""
    own = yaml.safe_load((MOE / f"{method}.yaml").read_text())
    base: dict = {}
    for entry in own.pop("defaults", []):
        if entry == "_self_":
            continue
        name, _, package = entry.partition("@")
        if name == "_layer":
            node = layer_defaults()
        elif name == "_fusion":
            node = fusion_defaults()
        elif name.startswith("_options/"):
            node = router_options_defaults()[name.split("/", 1)[1]]
        else:  # another method's file
            parent_own, parent_base = _own_and_base(name)
            node = _merge(parent_base, parent_own)
        base = _merge(base, {package: node} if package else node)
    return own, base


def _leaves(node: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in node.items():
        if isinstance(v, dict) and v:
            out.update(_leaves(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


@pytest.mark.parametrize("method", METHODS)
def test_a_method_file_states_no_value_its_base_already_gives(method):
    """0 defaults stated twice: each key a conf/moe/ file states differs from what its base gives (rmoe's
    dataclass defaults through moe/_layer, moe/_fusion, moe/_options/<router>, or the method it extends)."""
    own, base = _own_and_base(method)
    assert set(layer_defaults()) <= set(base), f"conf/moe/{method}.yaml does not build on moe/_layer"
    base_leaves = _leaves(base)
    repeated = [k for k, v in _leaves(own).items() if k in base_leaves and base_leaves[k] == v]
    assert repeated == [], f"conf/moe/{method}.yaml repeats its base's values for {repeated}"


def test_the_base_is_rmoes_dataclass_defaults():
    """Written from the dataclasses' fields here, not through the module: MoEConfig's fields less the two set
    elsewhere (backend, causal), activation null (the backbone's), and the three layout keys."""
    layer = layer_defaults()
    assert set(layer) == {f.name for f in dataclasses.fields(MoEConfig)} - {"backend", "causal"} | {
        "name", "layers", "init", "num_experts"}
    assert layer["num_experts"] is None  # the previous release's initial_experts: composes, unset
    assert (layer["router"], layer["initial_experts"], layer["top_k"], layer["capacity_factor"]) == ("topk", 8, 2, 0.0)
    assert layer["activation"] is None and layer["init"] == "upcycle" and layer["layers"] == "${backbone.moe_layers}"
    assert layer["released"] == {"fusion_pad_clamp": False, "pool_reads_clamped": False, "eval_fallback_gate": False,
                                 "upcycle_bias_split": False, "route_padding": False}
    assert fusion_defaults() == {"ema_decay": FusionConfig.ema_decay, "agg": "sum", "update_in_eval": False,
                                 "mix_alpha": 1.0}
    opts = router_options_defaults()
    assert opts["lossfree"] == {"score_fn": LossFreeOptions.score_fn, "bias_update_rate": 1e-3}
    assert opts["cosine"] == {"proj_dim": CosineOptions.proj_dim, "init_temperature": 0.5}
    assert "topk" not in opts  # a router without settings has no options node


@pytest.mark.parametrize("override", ["moe.normalize_gate=false", "moe.released.route_padding=true",
                                      "moe.router_options.proj_dim=64", "moe.expert_dropout=0.1"])
def test_a_key_the_method_file_does_not_state_is_overridable_without_plus(compose_cfg, override):
    key, value = override.split("=")
    cfg = compose_cfg(["task=glue/rte", "moe=gmoe", override])
    assert str(OmegaConf.select(cfg, key)).lower() == value


def test_rmoes_config_composes_from_the_base(compose_cfg):
    cfg = compose_cfg(["task=glue/rte", "moe=rmoe"])
    assert cfg.moe.fusion.ema_decay == 0.99 and cfg.moe.fusion.agg == "sum"
    assert cfg.moe.fusion.update_in_eval is True  # the GLUE protocol's, over moe/_fusion's false
    assert compose_cfg(["task=glue/rte", "moe=rmoe", "moe.fusion=null"]).moe.fusion is None
    assert compose_cfg(["task=glue/rte", "moe=lossfree"]).moe.router_options.score_fn == "sigmoid"


README_RUN = Path(__file__).resolve().parents[3] / "docs" / "records" / "readme_default_run"


def test_a_run_saved_before_the_base_continues_and_a_real_change_is_still_refused(compose_cfg, tmp_path):
    """The README's default run (docs/records/readme_default_run) was saved before moe/_layer existed: its moe node
    lacks the keys rmoe.yaml did not state then. Continuing it is no change; a changed or added value still is."""
    saved = (README_RUN / ".hydra" / "config.yaml").read_text()
    assert "normalize_gate" not in saved and "released" not in saved  # the premise: an old run's config
    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "config.yaml").write_text(saved)
    # the other changes since that run (a new callback option, data_seed's default) are allowed here; the keys
    # renamed since (moe.num_experts -> initial_experts, curriculum.beta -> decay) are no change
    assert "num_experts: 6" in saved and "beta: 0.9" in saved
    overrides = [*yaml.safe_load((README_RUN / ".hydra" / "overrides.yaml").read_text()),
                 "resume.allow_changes=[callbacks,data]"]
    changes = check_continuation(compose_cfg(overrides), tmp_path)
    assert [c["key"] for c in changes if c["key"].startswith(("moe.", "curriculum."))] == []
    for override in ("moe.normalize_gate=false", "moe.released.eval_fallback_gate=true", "moe.top_k=2",
                     "moe.gate_noise=0.5", "moe.initial_experts=4", "curriculum.decay=0.5"):
        key = override.split("=")[0]
        with pytest.raises(ResumeChangeError, match=key.replace(".", r"\.")):
            check_continuation(compose_cfg([*overrides, override]), tmp_path)


def test_every_built_in_routers_settings_are_in_the_torch_free_map():
    """The schema reads rmoe.router_options.OPTIONS (torch-free); each registered router's Options is there."""
    from rmoe.config import RouterOptions
    from rmoe.registry import ROUTERS
    from rmoe.router_options import OPTIONS

    with_settings = {name: ROUTERS[name].Options for name in ROUTERS.names()
                     if ROUTERS[name].Options is not RouterOptions}
    assert with_settings == OPTIONS and set(OPTIONS) == {"cosine", "lossfree"}


def test_the_previous_releases_num_experts_still_reads_with_a_warning(compose_cfg):
    """moe.num_experts (the experts active at the start, now initial_experts) composes on the command line and in
    rmoe's constructor; the old key's value is used, with a deprecation warning naming the new one."""
    from rmoe.config import ConfigDeprecationWarning
    from tasks.run.common import split_moe_config

    cfg = compose_cfg(["task=glue/rte", "moe=moe_topk", "moe.num_experts=4"])
    layer = split_moe_config(OmegaConf.to_container(cfg.moe, resolve=True))[2]
    with pytest.warns(ConfigDeprecationWarning, match="'num_experts' is deprecated: use initial_experts"):
        assert MoEConfig.from_dict(layer).initial_experts == 4
    with pytest.warns(ConfigDeprecationWarning, match="use initial_experts"):
        assert MoEConfig(num_experts=3, top_k=1).initial_experts == 3
    assert MoEConfig.from_dict({**layer, "num_experts": None}).initial_experts == 8  # unset: the default
