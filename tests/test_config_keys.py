"""Every config option composes, and every key of an instantiated node is read by its target.

For every option of every group (and every experiment file) the composed config's instantiated nodes
(`data`, `module`, `trainer`, each callback and logger) are bound against their target's signature:
a key the target does not take would be an error at instantiation (no `**kwargs` catch-alls), so a
setting cannot be silently ignored. The datamodules are instantiated for real (cheap: no data read).
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path

import hydra
import pytest
from hydra.utils import get_method
from omegaconf import OmegaConf

from tasks.train import CONF_DIR

CONF = Path(CONF_DIR)
OURS = ("tasks", "callbacks", "rmoe")


def _options(group: str) -> list[str]:
    return sorted(str(p.relative_to(CONF / group))[:-5] for p in (CONF / group).rglob("*.yaml")
                  if not p.name.startswith("_"))


@pytest.fixture(scope="session")
def _compose(compose_cfg):
    def compose_(overrides: list[str]):
        cfg = compose_cfg(overrides)
        if cfg.data._target_.endswith("GLUEDataModule"):
            from tasks.glue.tasks import get_task

            # GLUE tasks whose TSVs are not in the offline data (SST-2, QNLI, MNLI, QQP): the hub source
            # (the constructor reads nothing then; the local-folder checks have their own tests)
            root = os.environ.get("RMOE_DATA_DIR")
            if not root or not (Path(root) / "glue" / get_task(cfg.data.task).dir_name / "train.tsv").is_file():
                cfg = compose_cfg([*overrides, "data.glue_dir=hub"])
        return cfg
    return compose_


def _accepted(target) -> set[str] | None:
    """The keyword arguments ``target`` reads; a subclass that forwards ``**kwargs`` to its base
    (e.g. a ModelCheckpoint subclass) reads its own and its bases' up to one without ``**kwargs``."""
    classes = inspect.getmro(target) if inspect.isclass(target) else [target]
    names: set[str] = set()
    for cls in classes:
        fn = cls.__init__ if inspect.isclass(target) else cls
        if inspect.isclass(target) and "__init__" not in vars(cls):
            continue
        params = inspect.signature(fn).parameters
        names |= {n for n, p in params.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
        if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
            return names
    # a third-party target that hands **kwargs on to its library (WandbLogger -> wandb.init): not ours to check
    assert not target.__module__.startswith(OURS), f"{target} takes **kwargs: a key could be swallowed"
    return None


def _bind(node, where: str) -> None:
    """Every key of ``node`` is an argument its ``_target_`` reads (nothing swallowed by ``**kwargs``)."""
    target = get_method(node["_target_"])
    accepted = _accepted(target)
    if accepted is None:
        return
    unknown = sorted(k for k in node if not k.startswith("_") and k not in accepted)
    assert not unknown, f"{where}: {node['_target_']} takes no {unknown}"


def _check(cfg, where: str) -> None:
    c = OmegaConf.to_container(cfg, resolve=False)
    for key in ("data", "module", "trainer"):
        assert "_target_" in c[key], f"{where}: {key} is not an instantiated node"
        _bind(c[key], f"{where} {key}")
    for group in ("callbacks", "logger"):
        for name, node in (c.get(group) or {}).items():
            if isinstance(node, dict) and "_target_" in node:
                _bind(node, f"{where} {group}.{name}")
    # the datamodule for real: its constructor validates (unknown task/dataset, test_envs, options)
    hydra.utils.instantiate(cfg.data, _convert_="all")


GROUPS = {g: _options(g) for g in ("task", "backbone", "moe", "backend", "trainer", "logger", "callbacks",
                                   "curriculum", "debug")}
CASES = [(g, o) for g, opts in GROUPS.items() for o in opts]


@pytest.mark.parametrize("group,option", CASES, ids=[f"{g}={o}" for g, o in CASES])
def test_every_group_option_composes_and_its_keys_are_read(_compose, group, option):
    extra = []
    if group in ("backbone",) and option.startswith(("vit", "deit")):
        extra = ["task=domainbed/rotated_digits"]
    elif group == "backbone":
        extra = ["task=glue/rte"]
    cfg = _compose([f"{group}={option}", *extra])
    _check(cfg, f"{group}={option}")


EXPERIMENTS = _options("experiment")


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_composes_and_its_keys_are_read(_compose, name):
    _check(_compose([f"experiment={name}"]), f"experiment={name}")


def test_a_dataset_option_the_dataset_does_not_have_is_an_error(_compose):
    cfg = _compose(["task=domainbed/rotated_digits", "data.augment=false"])
    with pytest.raises(Exception, match=r"invalid data\.augment=False: dataset RotatedDigits has no such option; "
                                        r"allowed: null \(the options of RotatedDigits are max_images\)"):
        hydra.utils.instantiate(cfg.data, _convert_="all")
    cfg = _compose(["task=domainbed/pacs", "data.max_images=100"])
    with pytest.raises(Exception, match=r"invalid data\.max_images=100: dataset PACS has no such option"):
        hydra.utils.instantiate(cfg.data, _convert_="all")


def test_debug_runs_get_their_own_task_name(_compose):
    assert _compose(["task=glue/rte", "debug=fast"]).task_name == "debug/rte"
    assert _compose(["task=domainbed/pacs", "debug=fdr"]).task_name == "debug/PACS"


def _stated_with_python_default(conf_file: Path) -> list[str]:
    """The keys of a conf/module/ file whose target's constructor also has a default for them (a value, or a
    fallback, stated in two places)."""
    import inspect

    from hydra.utils import get_class

    node = OmegaConf.load(conf_file)
    params = inspect.signature(get_class(node["_target_"]).__init__).parameters
    return [k for k in node if k != "_target_" and k in params
            and params[k].default is not inspect.Parameter.empty]


@pytest.mark.parametrize("name", _options("module"))
def test_module_defaults_have_one_home(name):
    """Each argument of the benchmark's LightningModule has its default in one place: the conf/module/ file
    states it and the constructor requires it (a key the file does not state may keep a Python default)."""
    duplicated = _stated_with_python_default(CONF / "module" / f"{name}.yaml")
    assert duplicated == [], f"conf/module/{name}.yaml and its target both state defaults for {duplicated}"
