"""Every paper entry point composes the same protocol for a (benchmark, method) cell.

The expected table is written here from SPEC §3-5 (not read from conf/): λ schedule and values, aux
loss, pool sizes, Stateful Fusion, expert dropout, batch-prioritized routing, early stopping, block
weight. Entry points: every experiment file, every paper/study sweep with each of its `moe` (or
`experiment`) values, and the plain `task=... moe=...` command line.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from rmoe import ConfigError, MoEConfig, build_schedule
from tasks.run.common import split_moe_config
from tasks.train import CONF_DIR

SWEEPS = str(Path(CONF_DIR).parents[1] / "sweeps")
METHODS = ("dense", "moe_topk", "moe_cosine", "gmoe", "dynmoe", "rmoe", "lossfree", "expert_choice")

# SPEC §3-5. lam: (mode, {params read by that mode}); pool: (initial_experts, max_experts)
GLUE_DROPOUT = (0.1, "pre_act")
VISION_DROPOUT = (0.1, "post_act")
EXPECTED = {
    ("glue", "dense"): {"lam": ("constant", {"lambda0": 0.01}), "layer": None},
    ("glue", "moe_topk"): {"lam": ("constant", {"lambda0": 0.01}), "aux": "switch", "pool": (8, 8),
                           "fusion": None, "dropout": GLUE_DROPOUT, "bpr": False},
    # the paper's GLUE MoE row: the released scripts' cosine_top gate (noise 1.0, cf 1.5, BPR, load-importance)
    ("glue", "moe_cosine"): {"lam": ("constant", {"lambda0": 0.01}), "aux": "load_importance_tutel",
                             "pool": (8, 8), "fusion": None, "dropout": GLUE_DROPOUT, "bpr": True},
    ("glue", "gmoe"): {"lam": ("constant", {"lambda0": 0.01}), "aux": "load_importance_tutel", "pool": (6, 6),
                       "fusion": None, "dropout": GLUE_DROPOUT, "bpr": True},
    ("glue", "dynmoe"): {"lam": ("constant", {"lambda0": 0.01}), "aux": "dynmoe", "pool": (8, 16),
                         "fusion": None, "dropout": GLUE_DROPOUT, "bpr": False},
    ("glue", "rmoe"): {"lam": ("linear_ramp", {"lambda_min": 1e-3, "lambda_max": 1e-2}), "aux": "dynmoe",
                       "pool": (8, 16), "fusion": {"ema_decay": 0.99, "agg": "sum", "update_in_eval": True,
                                                   "mix_alpha": 1.0},
                       "dropout": GLUE_DROPOUT, "bpr": False},
    # beyond the paper: loss-free balancing and expert choice keep the baselines' constant λ (no aux loss by default)
    ("glue", "lossfree"): {"lam": ("constant", {"lambda0": 0.01}), "aux": "none", "pool": (8, 8), "fusion": None,
                           "dropout": GLUE_DROPOUT, "bpr": False},
    ("glue", "expert_choice"): {"lam": ("constant", {"lambda0": 0.01}), "aux": "none", "pool": (8, 8),
                                "fusion": None, "dropout": GLUE_DROPOUT, "bpr": False},
    ("domainbed", "dense"): {"lam": ("constant", {"lambda0": 1.0}), "layer": None},
    ("domainbed", "moe_topk"): {"lam": ("constant", {"lambda0": 1.0}), "aux": "switch", "pool": (8, 8),
                                "fusion": None, "dropout": VISION_DROPOUT, "bpr": False},
    ("domainbed", "moe_cosine"): {"lam": ("constant", {"lambda0": 1.0}), "aux": "load_importance_tutel",
                                  "pool": (8, 8), "fusion": None, "dropout": VISION_DROPOUT, "bpr": True},
    ("domainbed", "gmoe"): {"lam": ("constant", {"lambda0": 1.0}), "aux": "load_importance_tutel", "pool": (6, 6),
                            "fusion": None, "dropout": VISION_DROPOUT, "bpr": True},
    ("domainbed", "dynmoe"): {"lam": ("constant", {"lambda0": 1.0}), "aux": "gshard_binary", "pool": (6, 8),
                              "fusion": None, "dropout": VISION_DROPOUT, "bpr": False},
    ("domainbed", "rmoe"): {"lam": ("exp_decay", {"lambda_min": 1e-3, "lambda_max": 1e-2, "decay": 0.9}),
                            "aux": "gshard_binary", "pool": (6, 8), "fusion": None, "dropout": VISION_DROPOUT,
                            "bpr": False},
    ("domainbed", "lossfree"): {"lam": ("constant", {"lambda0": 1.0}), "aux": "none", "pool": (8, 8),
                                "fusion": None, "dropout": VISION_DROPOUT, "bpr": False},
    ("domainbed", "expert_choice"): {"lam": ("constant", {"lambda0": 1.0}), "aux": "none", "pool": (8, 8),
                                     "fusion": None, "dropout": VISION_DROPOUT, "bpr": False},
}
# λ at steps 0, 1, 21, 22 of a 5001-step run, by hand from SPEC §3's formulas
LAMBDA_AT = {
    "constant": None,
    "linear_ramp": lambda t, T: 1e-3 + 9e-3 * min(t / T, 1),
    "exp_decay": lambda t, T: max(1e-3, 1e-2 * 0.9 ** (t + 1)),
}


@pytest.fixture(scope="session")
def _compose(compose_cfg):
    def _compose_(overrides: list[str], config_dir: str = CONF_DIR, config_name: str = "train"):
        return compose_cfg(overrides, config_name=config_name, config_dir=config_dir, hydra=True)
    return _compose_


def check_cell(cfg, bench: str, method: str, where: str) -> None:
    exp = EXPECTED[(bench, method)]
    assert cfg.moe.name == method, where
    cur = OmegaConf.to_container(cfg.curriculum, resolve=True)
    mode, params = exp["lam"]
    assert cur["mode"] == mode, f"{where}: curriculum mode {cur['mode']} != {mode}"
    for k, v in params.items():
        assert cur[k] == pytest.approx(v), f"{where}: curriculum.{k}={cur[k]} != {v}"
    schedule = build_schedule(cur.pop("mode"), **cur)
    for t in (0, 1, 21, 22):
        want = params["lambda0"] if mode == "constant" else LAMBDA_AT[mode](t, 5001)
        assert schedule(t, 5001)[0] == pytest.approx(want), f"{where}: λ({t})"
    weight = 1.0 if bench == "glue" else 0.01
    assert cfg.module.block_weight == weight, where
    layers, _, layer = split_moe_config(OmegaConf.to_container(cfg.moe, resolve=True))
    if exp.get("layer", "moe") is None:
        assert layer is None, f"{where}: the dense model has no MoE layer"
    else:
        mc = MoEConfig.from_dict(layer)
        assert layers, where
        assert mc.aux_loss == exp["aux"], f"{where}: aux {mc.aux_loss}"
        assert (mc.initial_experts, mc.max_experts) == exp["pool"], where
        fusion = None if mc.fusion is None else {k: getattr(mc.fusion, k) for k in exp["fusion"] or {}}
        assert fusion == exp["fusion"], f"{where}: fusion {mc.fusion}"
        assert (mc.expert_dropout, mc.expert_dropout_position) == exp["dropout"], where
        assert mc.batch_prioritized_routing == exp["bpr"], where
        if method == "gmoe":
            assert (mc.top_k, mc.capacity_factor, mc.gate_noise) == (1, 1.5, 1.0), where
        if method == "moe_cosine":
            assert (mc.router, mc.top_k, mc.capacity_factor, mc.gate_noise) == ("cosine", 2, 1.5, 1.0), where
        if method == "lossfree":
            opts = mc.router_options
            assert (mc.top_k, opts.score_fn, opts.bias_update_rate) == (2, "sigmoid", 1e-3), where
        if method == "expert_choice":
            assert (mc.capacity_factor, mc.causal) == (2.0, False), where
    stop = cfg.callbacks.get("early_stopping")
    if bench == "glue":  # stop after more than 3 epochs without improvement: patience 4
        assert stop is not None and stop.patience == 4 and stop.monitor == "val/score" and stop.mode == "max", where
    else:
        assert stop is None, where
    if cfg.backbone.name in ("vit_small", "deit_small"):
        assert cfg.backbone.drop_path_rate == 0.1, where


def _bench_method(stem: str) -> tuple[str, str]:
    return next(m for m in METHODS if stem.endswith("_" + m))


EXPERIMENTS = sorted(str(p.relative_to(Path(CONF_DIR) / "experiment"))[:-5]
                     for p in (Path(CONF_DIR) / "experiment").rglob("*.yaml"))


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_file_has_its_cells_protocol(_compose, name):
    bench, stem = name.split("/")
    cfg = _compose([f"experiment={name}"])
    check_cell(cfg, bench, _bench_method(stem), f"experiment={name}")


def _sweep_values(cfg, key: str) -> list[str]:
    params = cfg.hydra.sweeper.params or {}
    return [v.strip() for v in str(params[key]).split(",")] if key in params else []


SWEEP_CELLS = [
    ("glue_methods", ["task=glue/rte"], "glue"),
    ("glue_paper", ["task=glue/rte"], "glue"),
    ("optuna_glue", ["task=glue/rte"], "glue"),
    ("smoke", [], "glue"),
    ("reproduce_glue", [], "glue"),
    ("domainbed_paper", [], "domainbed"),
]


@pytest.mark.parametrize("sweep,fixed,bench", SWEEP_CELLS)
def test_every_sweep_gives_each_method_its_protocol(_compose, sweep, fixed, bench):
    base = _compose(fixed, SWEEPS, sweep)
    methods = _sweep_values(base, "moe") or [base.moe.name]
    assert methods
    for m in methods:
        cfg = _compose([*fixed, f"moe={m}"], SWEEPS, sweep)
        check_cell(cfg, bench, m, f"sweeps/{sweep} moe={m}")


def test_the_study_domainbed_sweep_gives_each_method_its_protocol(_compose):
    base = _compose([], SWEEPS, "reproduce_domainbed")
    exps = _sweep_values(base, "experiment")
    assert {_bench_method(e.split("/")[1]) for e in exps} >= {"dense", "gmoe", "dynmoe", "rmoe"}
    for e in exps:
        check_cell(_compose([f"experiment={e}"], SWEEPS, "reproduce_domainbed"), "domainbed",
                   _bench_method(e.split("/")[1]), f"reproduce_domainbed experiment={e}")


@pytest.mark.parametrize("task,bench", [("glue/rte", "glue"), ("glue/cola", "glue"), ("domainbed/pacs", "domainbed"),
                                        ("domainbed/rotated_mnist", "domainbed")])
@pytest.mark.parametrize("method", METHODS)
def test_command_line_cells_get_the_same_protocol(_compose, task, bench, method):
    check_cell(_compose([f"task={task}", f"moe={method}"]), bench, method, f"task={task} moe={method}")


def test_curriculum_ablation_uses_the_benchmarks_baseline_lambda(_compose):
    glue = _compose(["task=glue/rte", "moe=rmoe", "curriculum=constant"])
    vision = _compose(["task=domainbed/pacs", "moe=rmoe", "curriculum=constant"])
    assert (glue.curriculum.mode, glue.curriculum.lambda0) == ("constant", 0.01)
    assert (vision.curriculum.mode, vision.curriculum.lambda0) == ("constant", 1.0)
    assert glue.moe.fusion is not None and vision.moe.fusion is None  # the rest of the cell is unchanged


def test_search_spaces_never_propose_lambda_min_above_lambda_max(_compose):
    optuna = _compose(["task=glue/rte"], SWEEPS, "optuna_glue")
    p = optuna.hydra.sweeper.params

    def bounds(spec: str) -> tuple[float, float]:
        lo, hi = re.search(r"interval\(([^,]+),([^)]+)\)", spec).groups()
        return float(lo), float(hi)

    assert bounds(p["curriculum.lambda_min"])[1] <= bounds(p["curriculum.lambda_max"])[0]
    grid = _compose(["task=glue/rte"], SWEEPS, "glue_paper")
    lo = [float(v) for v in _sweep_values(grid, "curriculum.lambda_min")]
    hi = [float(v) for v in _sweep_values(grid, "curriculum.lambda_max")]
    assert lo and hi and max(lo) <= min(hi)


def test_lambda_min_above_lambda_max_is_rejected_before_training(_compose):
    import hydra

    cfg = _compose(["task=glue/rte", "moe=rmoe", "curriculum.lambda_min=0.1"])
    # train() builds the callbacks before the trainer: the ConfigError surfaces wrapped by Hydra, message intact
    msg = r"lambda_min=0\.1 > lambda_max=0\.01.*allowed: lambda_min <= lambda_max"
    with pytest.raises(Exception, match=msg) as err:
        hydra.utils.instantiate(cfg.callbacks.curriculum, _convert_="all")
    assert isinstance(err.value.__cause__, ConfigError)


PAPER_GLUE_TASKS = ("cola", "mrpc", "qnli", "mnli", "rte")


@pytest.mark.parametrize("task", PAPER_GLUE_TASKS)
def test_the_papers_glue_moe_row_is_the_released_cosine_router(_compose, task):
    """The paper's GLUE "MoE" row is what the released scripts ran (DynMoE EMoE/Language/scripts/<task>.sh:
    --gate_type cosine_top; search_glue_no_trainer.py: gate_noise 1.0, capacity_factor 1.5, is_gshard_loss off;
    moe_utils.py: batch_prioritized_routing=True): a cell of its own, beside the textbook top-k."""
    cfg = _compose([f"experiment=glue/{task}_moe_cosine"])
    check_cell(cfg, "glue", "moe_cosine", task)
    assert cfg.variant == "moe_cosine" and cfg.backbone.name == "bert_large_cased"
    topk = MoEConfig.from_dict(split_moe_config(OmegaConf.to_container(
        _compose([f"experiment=glue/{task}_moe_topk"]).moe, resolve=True))[2])
    assert (topk.router, topk.aux_loss, topk.gate_noise, topk.capacity_factor) == ("topk", "switch", 0.0, 0.0)


RELEASED_ON = {  # SPEC §9: which released behaviours each released variant switches on, per benchmark
    ("glue", "rmoe_released"): {"fusion_pad_clamp", "pool_reads_clamped", "eval_fallback_gate", "upcycle_bias_split",
                                "route_padding"},
    ("glue", "dynmoe_released"): {"eval_fallback_gate", "upcycle_bias_split", "route_padding"},
    ("domainbed", "rmoe_released"): {"eval_fallback_gate"},  # the released vision runs: no fusion, bias copied
    ("domainbed", "dynmoe_released"): {"eval_fallback_gate"},
}


@pytest.mark.parametrize("bench,task", [("glue", "glue/rte"), ("domainbed", "domainbed/rotated_mnist")])
@pytest.mark.parametrize("method", ["rmoe", "dynmoe"])
def test_released_variants_are_their_methods_cell_with_the_released_switches(_compose, bench, task, method):
    name = f"{method}_released"
    cfg = _compose([f"task={task}", f"moe={name}"])
    assert cfg.variant == name and cfg.moe.name == name
    # the rest of the cell is the method's own protocol
    check_cell(OmegaConf.merge(cfg, {"moe": {"name": method}}), bench, method, f"task={task} moe={name}")
    layer = MoEConfig.from_dict(split_moe_config(OmegaConf.to_container(cfg.moe, resolve=True))[2])
    on = {f.name for f in dataclasses.fields(layer.released) if getattr(layer.released, f.name)}
    assert on == RELEASED_ON[(bench, name)]
    # the paper's methods keep every released behaviour off
    plain = MoEConfig.from_dict(split_moe_config(OmegaConf.to_container(
        _compose([f"task={task}", f"moe={method}"]).moe, resolve=True))[2])
    assert not plain.released.any


def test_a_released_variant_name_without_released_switches_is_refused(_compose):
    from tasks.run.checks import ConfigError as RunConfigError
    from tasks.run.checks import check_config

    cfg = _compose(["task=glue/rte", "moe=rmoe", "variant=rmoe_released"])
    with pytest.raises(RunConfigError, match=r"variant='rmoe_released'.*allowed: moe=rmoe_released"):
        check_config(cfg)
    check_config(_compose(["task=glue/rte", "moe=rmoe_released"]))


# --- λ's values: one home per cell --------------------------------------------------------------------------------
LAMBDA_KEYS = ("lambda0", "lambda_min", "lambda_max", "decay")
PHASE_VALUE_KEYS = ("value", "start_value", "end_value")


def _yaml(path: Path) -> dict:
    import yaml

    return yaml.safe_load(path.read_text()) or {}


def _lambda_literals(path: Path) -> dict[str, object]:
    """The λ values a conf file states as literals (not interpolations): ``{key: value}``."""
    data = _yaml(path)
    conf = Path(CONF_DIR)
    node = data if path.parent == conf / "curriculum" else data.get("curriculum")
    if not isinstance(node, dict):
        return {}
    out = {k: node[k] for k in LAMBDA_KEYS if isinstance(node.get(k), (int, float))}
    for i, phase in enumerate(node.get("phases") or []):
        out.update({f"phases[{i}].{k}": phase[k] for k in PHASE_VALUE_KEYS
                    if isinstance(phase, dict) and isinstance(phase.get(k), (int, float))})
    return out


def _included(path: Path) -> list[Path]:
    """The conf files a protocol cell includes through its defaults list (``/protocol/<b>/<m>@_here_``)."""
    out = []
    for entry in _yaml(path).get("defaults") or []:
        if isinstance(entry, str) and entry.startswith("/protocol/"):
            out.append(Path(CONF_DIR) / f"{entry[1:].split('@')[0]}.yaml")
    return out


def _cell_chain(path: Path) -> list[Path]:
    chain, todo = [], [path]
    while todo:
        p = todo.pop()
        chain.append(p)
        todo.extend(_included(p))
    return chain


CELLS = sorted(p for p in (Path(CONF_DIR) / "protocol").rglob("*.yaml") if not p.name.startswith("_"))


def test_lambda_values_are_stated_only_in_the_protocol_cells():
    """A curriculum option, a module, a task or an experiment file states no λ value: λ's values live in the
    protocol cells alone (a curriculum option names a schedule shape; its phases refer to the cell's values)."""
    stating = {p.relative_to(CONF_DIR).as_posix(): _lambda_literals(p) for p in Path(CONF_DIR).rglob("*.yaml")}
    stating = {k: v for k, v in stating.items() if v}
    outside = {k: v for k, v in stating.items() if not k.startswith("protocol/")}
    assert not outside, f"λ values stated outside conf/protocol/: {outside}"
    assert {"protocol/glue/rmoe.yaml", "protocol/domainbed/rmoe.yaml", "protocol/glue/moe_topk.yaml"} <= set(stating)


@pytest.mark.parametrize("cell", CELLS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_each_cells_lambda_values_are_in_exactly_one_file(cell):
    files = [p.relative_to(CONF_DIR).as_posix() for p in _cell_chain(cell) if _lambda_literals(p)]
    assert len(files) == 1, f"{cell.relative_to(CONF_DIR)}: λ values stated in {files or 'no file'}"


def _distinct_cells() -> list[tuple[str, str]]:
    """One (benchmark, method) per distinct λ content among the cells (the others state the same values)."""
    seen: dict[str, tuple[str, str]] = {}
    for cell in CELLS:
        values = next(_lambda_literals(p) for p in _cell_chain(cell) if _lambda_literals(p))
        mode = next((_yaml(p)["curriculum"]["mode"] for p in _cell_chain(cell)
                     if "mode" in (_yaml(p).get("curriculum") or {})), None)
        seen.setdefault(repr((cell.parent.name, mode, sorted(values.items()))), (cell.parent.name, cell.stem))
    return sorted(seen.values())


TASK_OF = {"glue": "glue/rte", "domainbed": "domainbed/rotated_mnist"}
CURRICULUM_OPTIONS = sorted(p.stem for p in (Path(CONF_DIR) / "curriculum").glob("*.yaml"))


@pytest.mark.parametrize("bench,method", _distinct_cells())
def test_a_curriculum_option_keeps_the_cells_values_or_names_the_missing_key(_compose, bench, method):
    """``curriculum=<mode>`` on the command line changes the schedule's shape only: every λ value the run uses is
    the cell's, or the run is refused before training naming the key the cell does not state."""
    from tasks.run.checks import ConfigError as RunConfigError
    from tasks.run.checks import check_curriculum

    cell = [f"task={TASK_OF[bench]}", f"moe={method}"]
    base = OmegaConf.to_container(_compose(cell).curriculum, resolve=True)
    cell_values = {k: base[k] for k in LAMBDA_KEYS if k in base}
    assert cell_values
    for option in CURRICULUM_OPTIONS:
        cfg = _compose([*cell, f"curriculum={option}"])
        try:
            check_curriculum(cfg)
        except RunConfigError as err:
            key = re.search(r"curriculum\.(\w+) is missing", str(err)).group(1)
            assert key in LAMBDA_KEYS and key not in cell_values, (option, str(err))
            assert f"conf/protocol/{bench}/{method}.yaml" in str(err) and f"+curriculum.{key}=" in str(err)
            continue
        cur = OmegaConf.to_container(cfg.curriculum, resolve=True)
        assert cur["mode"] == option
        assert {k: cur[k] for k in LAMBDA_KEYS if k in cur} == cell_values, option
        if option == "phased":  # its phases are written in the cell's ramp ends
            ends = {v for ph in cur["phases"] for k, v in ph.items() if k in PHASE_VALUE_KEYS}
            assert ends == {cell_values["lambda_min"], cell_values["lambda_max"]}


def test_no_cell_repeats_the_baseline_cell_it_is_layered_over():
    """A method whose protocol is the baseline's has no cell of its own (conf/train.yaml layers every cell over
    <benchmark>/moe_topk, and an absent cell is the baseline's): a cell that states exactly the baseline's settings
    is a second home of them -- unless another cell builds on it (glue/dynmoe, under glue/dynmoe_released)."""
    built_on = {d.split("@")[0].lstrip("/") for c in CELLS for d in _yaml(c).get("defaults", []) if d != "_self_"}
    for bench in ("glue", "domainbed"):
        base = _yaml(Path(CONF_DIR) / "protocol" / bench / "moe_topk.yaml")
        same = [c.stem for c in CELLS if c.parent.name == bench and c.stem != "moe_topk"
                and _yaml(c) == base and f"protocol/{bench}/{c.stem}" not in built_on]
        assert same == [], f"conf/protocol/{bench}/: {same} repeat moe_topk.yaml; delete them"


def test_a_method_without_a_cell_is_told_the_baseline_cell_it_uses(_compose):
    from tasks.run.checks import ConfigError as RunConfigError
    from tasks.run.checks import check_curriculum

    cfg = _compose(["task=glue/rte", "moe=gmoe", "curriculum=exp_decay"])
    assert not (Path(CONF_DIR) / "protocol" / "glue" / "gmoe.yaml").exists()
    with pytest.raises(RunConfigError, match=r"the protocol cell conf/protocol/glue/moe_topk\.yaml \(the baselines' "
                                             r"cell: glue/gmoe has none of its own\), which states no lambda_min"):
        check_curriculum(cfg)
