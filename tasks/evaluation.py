"""``rmoe-eval``'s work once its command line named a checkpoint (:func:`run`: Hydra over ``conf/eval.yaml``)
and :func:`evaluate`; the command itself is :mod:`tasks.eval`.

``rmoe-eval ckpt_path=<run>/checkpoints/<file>.ckpt [key=value ...]``:

* **Config.** A checkpoint inside a run folder (``<run>/checkpoints/``, ``<run>/.hydra/`` present) is
  evaluated with the config that run saved (``<run>/.hydra/config.yaml``); ``conf/eval.yaml`` is composed with
  the run's group options (:func:`run_choice_overrides`), so ``key=value`` overrides on the command line are
  checked against the run's structure, then applied on top of the saved config (e.g. ``data.glue_dir=...``,
  ``trainer.limit_val_batches=1.0``, ``data.eval_batch_size=128``), and a group option whose node exists
  (``trainer=gpu``) replaces that node. ``run_config=null`` composes the config from the groups instead (as
  ``rmoe-train`` would, e.g. for a checkpoint outside a run folder: give the same ``task=``/``backbone=``/
  ``moe=``), ``run_config=<file>`` takes another saved config. The checkpoint must fit the model (shapes,
  keys) and its run identity must match the config's (task, method, variant, backbone): a mismatch fails
  naming the difference.
* **What it runs** (one device; ``trainer.devices=1``, no logger, no callbacks): the checkpoint's weights and
  buffers are loaded, then ``export=<folder>`` writes the ``save_pretrained``-style folder first (the state
  as saved; a dense model as a Hugging Face ``...ForSequenceClassification``, :mod:`tasks.glue.export`);
  ``validate=true`` runs the validation loop over every validation loader of the run -- dev (MNLI: matched and
  mismatched), the held-out slice (``data.heldout_samples``),
  DomainBed's in/out splits of every environment -- with the run's own ``trainer.limit_val_batches`` and
  batch sizes, so the best checkpoint's ``val/*`` metrics are the ones logged at its epoch; GLUE test files
  (``<glue_dir>/<Task>/test.tsv``) with labels add ``test/*`` metrics, and ``predict=true`` writes GLUE's
  submission files ``<run>/predictions/<Task>.tsv`` (:mod:`tasks.glue.predict`).
* **Output.** ``<eval_dir>/<ckpt stem>.json`` (default ``<run>/eval/``; next to the checkpoint when it is
  not in a run folder; written atomically): ``metrics``, the checkpoint's ``epoch``/``global_step``, the
  config file used, the overrides, the prediction files and the export folder; the metrics are printed.
  The run's own records (``done``, ``summary.json``, ``metrics.csv``, checkpoints) are never written.

Stateful Fusion with ``moe.fusion.update_in_eval=true`` (RMoE's GLUE protocol) updates the fusion state ``m``
during every evaluation forward: the checkpoint holds ``m`` after the dev pass of its epoch, so evaluating it
again starts from another state and gives other numbers than the ones logged in training (a warning says
so); with ``update_in_eval=false`` (and every other method) the logged metrics are reproduced exactly.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf, open_dict

from callbacks.records import CONFIG_FILE, HYDRA_FILE, git_commit, write_json_atomic
from callbacks.resume import IDENTITY_KEY
from callbacks.run_summary import hydra_overrides
from rmoe.surgery import find_moe_layers
from tasks.glue.export import export_pretrained
from tasks.glue.predict import find_test_files, glue_test_splits, predict_dev_sets, predict_test_sets
from tasks.resolvers import register_resolvers
from tasks.run.common import CONF_DIR
from tasks.run.console import route_lightning_logs
from tasks.run.resume import IDENTITY_FIELDS, check_checkpoint, run_identity
from tasks.run.run_folder import run_folder_of_checkpoint

log = logging.getLogger("tasks.eval")

#: the keys of conf/eval.yaml that are not part of a run's config
EVAL_KEYS = ("ckpt_path", "run_config", "validate", "predict", "export", "eval_dir")
EVAL_SUBDIR = "eval"
PREDICTIONS_SUBDIR = "predictions"


class EvalConfigError(ValueError):
    """A bad rmoe-eval argument; the message names the key, the value and what is allowed."""


def default_eval_dir(ckpt_path: Any) -> str:
    """``<run>/eval`` for a checkpoint in ``<run>/checkpoints/``, else ``eval/`` next to the checkpoint."""
    if ckpt_path in (None, ""):
        raise EvalConfigError("ckpt_path is not set; allowed: the path of a checkpoint file, e.g. "
                              "ckpt_path=<run>/checkpoints/best_epoch002.ckpt")
    run = run_folder_of_checkpoint(str(ckpt_path))
    return str((run if run is not None else Path(str(ckpt_path)).expanduser().parent) / EVAL_SUBDIR)


def register_eval_resolvers() -> None:
    """``${rmoe_eval_dir:<ckpt_path>}`` (:func:`default_eval_dir`) and the training resolvers."""
    register_resolvers()
    if not OmegaConf.has_resolver("rmoe_eval_dir"):
        OmegaConf.register_new_resolver("rmoe_eval_dir", default_eval_dir)


def _run_config_path(cfg: DictConfig) -> Path | None:
    src = cfg.get("run_config")
    if src in (None, "", "null"):
        return None
    if src == "auto":
        run = run_folder_of_checkpoint(str(cfg.ckpt_path))
        return run / CONFIG_FILE if run is not None and (run / CONFIG_FILE).is_file() else None
    path = Path(str(src)).expanduser()
    if not path.is_file():
        raise EvalConfigError(f"run_config={str(src)!r}: no such file; allowed: auto (the run's "
                              ".hydra/config.yaml), null (compose from the groups) or a saved config.yaml")
    return path


def eval_config(cfg: DictConfig, overrides: Sequence[str] = (), groups: Iterable[str] = ()) -> DictConfig:
    """The config to evaluate with: the run's saved config (see the module docstring) with ``overrides``
    applied and the eval keys of ``cfg``, or ``cfg`` itself when there is no saved config to use.

    ``cfg``: the composed ``conf/eval.yaml``; ``overrides``: the command line's ``key=value`` overrides;
    ``groups``: the config group names (a group override replaces the node of that name)."""
    path = _run_config_path(cfg)
    if path is None:
        return cfg
    run_cfg = OmegaConf.load(path)
    groups = set(groups)
    for o in OverridesParser.create().parse_overrides(list(overrides)):
        key = o.key_or_group
        if key in EVAL_KEYS or key.split(".")[0] == "hydra":
            continue
        if o.is_delete():
            parent, _, leaf = key.rpartition(".")
            node = OmegaConf.select(run_cfg, parent) if parent else run_cfg
            if isinstance(node, DictConfig) and leaf in node:
                node.pop(leaf)
        elif key in groups:
            if key not in cfg or key not in run_cfg:
                raise EvalConfigError(
                    f"override {o.input_line!r} changes the config group {key!r}, which the run's saved config "
                    f"({path}) has no node for; allowed: key=value overrides, or run_config=null to compose the "
                    "config from the groups (give the run's task=/backbone=/moe= too)")
            run_cfg[key] = OmegaConf.to_container(cfg[key], resolve=False)
        else:
            OmegaConf.update(run_cfg, key, o.value(), merge=False, force_add=True)
    with open_dict(run_cfg):
        run_cfg.setdefault("paths", {})
        run_cfg.paths.output_dir = str(path.parent.parent)  # the run folder (<run>/.hydra/config.yaml)
        for k in EVAL_KEYS:
            run_cfg[k] = cfg.get(k)
        run_cfg.run_config = str(path)
    return run_cfg


def run_choice_overrides(ckpt_path: Any) -> list[str]:
    """``group=option`` for each config group the checkpoint's run chose (``<run>/.hydra/hydra.yaml``; not
    Hydra's own groups nor ``protocol``, which follows from data and moe): ``rmoe-eval`` composes with them
    first, so the command line's overrides are checked against the run's config structure."""
    run = run_folder_of_checkpoint(str(ckpt_path)) if ckpt_path else None
    if run is None or not (run / HYDRA_FILE).is_file():
        return []
    choices = OmegaConf.select(OmegaConf.load(run / HYDRA_FILE), "hydra.runtime.choices", default=None) or {}
    return [f"{g}={o}" for g, o in choices.items() if o is not None and not g.startswith("hydra/")
            and g.split("@")[0] != "protocol"]


def _check_identity(ckpt_path: str, saved: dict[str, Any] | None, cfg: DictConfig) -> None:

    if not saved:
        warnings.warn(f"ckpt_path={ckpt_path!r} records no run identity: its task/method/backbone cannot be checked "
                      "against the config", stacklevel=2)
        return
    expected = run_identity(cfg)
    diff = [f"{k}: checkpoint {saved.get(k)!r}, config {expected.get(k)!r}" for k in IDENTITY_FIELDS
            if k in saved and saved.get(k) != expected.get(k)]
    if diff:
        raise EvalConfigError(
            f"ckpt_path={ckpt_path!r} was written by another run than the config describes ({'; '.join(diff)}); "
            "allowed: the checkpoint's own config (a checkpoint in <run>/checkpoints/ with run_config=auto), or "
            "the task=/backbone=/moe=/variant= options it was trained with")


def _warn_fusion_updates(model: Any) -> None:

    moving = [name for name, layer in find_moe_layers(model)
              if getattr(layer, "fusion", None) is not None and layer.fusion.cfg.update_in_eval]
    if moving:
        warnings.warn(f"moe.fusion.update_in_eval=true: the fusion state of {moving} moves during evaluation, and the "
                      "checkpoint holds it after its own dev pass, so these metrics differ from the ones logged in "
                      "training (evaluate with moe.fusion.update_in_eval=false to freeze it)", stacklevel=2)


def _float_metrics(values: Any) -> dict[str, float]:
    return {k: float(v) for k, v in values.items() if k != "val/score_best"}


def evaluate(cfg: DictConfig, write: bool = True) -> dict[str, Any]:
    """Evaluate ``cfg.ckpt_path`` with ``cfg`` (a run's config plus the eval keys, see :func:`eval_config`).

    Returns the record written to ``<eval_dir>/<ckpt stem>.json`` (``metrics``, ``epoch``, ``global_step``,
    ``predictions``, ``export``, ...); ``write=False`` writes no file except the export and predictions."""
    register_eval_resolvers()
    ckpt_path = cfg.get("ckpt_path")
    eval_dir = Path(cfg.get("eval_dir") or default_eval_dir(ckpt_path))
    export, predict = cfg.get("export"), predict_mode(cfg.get("predict"))
    is_glue = str(OmegaConf.select(cfg, "data._target_", default="")).startswith("tasks.glue.")
    for key, value in (("predict", predict), ("export", export)):
        if value and not is_glue:
            raise EvalConfigError(f"{key}={value!r}: GLUE runs only (this run's data is "
                                  f"{OmegaConf.select(cfg, 'data._target_', default=None)}); allowed: "
                                  f"{'false' if key == 'predict' else 'null'}")
    if cfg.get("seed") is not None:
        L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    datamodule = hydra.utils.instantiate(cfg.data, _convert_="all")
    if predict:
        check_predict_inputs(predict, datamodule)  # before the model is built
    model = hydra.utils.instantiate(cfg.module, _convert_="all")
    ckpt = check_checkpoint(str(ckpt_path), model)
    if ckpt is None:
        raise EvalConfigError(f"ckpt_path={ckpt_path!r}; allowed: a local checkpoint file")
    _check_identity(str(ckpt_path), ckpt.get(IDENTITY_KEY), cfg)
    model.load_state_dict(ckpt["state_dict"])
    record: dict[str, Any] = {"ckpt_path": os.path.abspath(str(ckpt_path)), "epoch": ckpt.get("epoch"),
                              "global_step": ckpt.get("global_step"), "config": cfg.get("run_config"),
                              "metrics": {}, "predictions": {}, "export": None}
    del ckpt
    _warn_fusion_updates(model)
    datamodule.prepare_data()
    datamodule.setup("validate")
    if export:
        record["export"] = str(export_pretrained(model, export, tokenizer=datamodule.tokenizer,
                                                 source={"ckpt_path": record["ckpt_path"], "epoch": record["epoch"],
                                                         "global_step": record["global_step"]}))
    trainer = hydra.utils.instantiate(cfg.trainer, callbacks=[], logger=False, enable_checkpointing=False,
                                      devices=1, num_nodes=1, strategy="auto", limit_predict_batches=1.0,
                                      _convert_="all")
    if cfg.get("validate", True):
        trainer.validate(model=model, datamodule=datamodule, verbose=False)
        record["metrics"].update(_float_metrics(trainer.callback_metrics))
    if is_glue:
        out = eval_dir.parent / PREDICTIONS_SUBDIR
        test_metrics, files = predict_test_sets(trainer, model, datamodule, out if predict == "test" else None)
        record["metrics"].update(test_metrics)
        record["predictions"] = files
        if predict == "dev":
            record["predictions"].update(predict_dev_sets(trainer, model, datamodule, out))
    if not any(k.startswith("test") for k in record["metrics"]):
        record["no_test_metrics"] = no_test_metrics_reason(cfg, datamodule, is_glue)
    record.update({"finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "commit": git_commit(),
                   "overrides": hydra_overrides()})
    if write:
        record["path"] = str(write_json_atomic(eval_dir / f"{Path(str(ckpt_path)).stem}.json", record))
    return record


PREDICT_MODES = {"false": None, "true": "test", "test": "test", "dev": "dev"}


def predict_mode(value: Any) -> str | None:
    """``predict=``: false (none), true/test (the GLUE test files' submission files), dev (the dev sets)."""
    key = str(value).lower() if value is not None else "false"
    if key not in PREDICT_MODES:
        raise EvalConfigError(f"predict={value!r}; allowed: false, true|test (GLUE's submission files from "
                              "<glue_dir>/<Task>/test.tsv), dev (predictions for every dev row)")
    return PREDICT_MODES[key]


def check_predict_inputs(mode: str, datamodule: Any) -> None:
    """``predict=test`` needs every test file of the task (GLUE's test layout) under ``data.glue_dir``;
    ``predict=dev`` every dev row (``data.max_eval_samples=null``)."""
    task = datamodule.task
    if mode == "dev":
        if getattr(datamodule, "max_eval_samples", None) is not None:
            raise EvalConfigError(f"predict=dev with data.max_eval_samples={datamodule.max_eval_samples} (a subset of "
                                  "the dev rows); allowed: data.max_eval_samples=null")
        return
    if len(find_test_files(datamodule.glue_dir, task)) == len(glue_test_splits(task)):
        return
    where = (f"{datamodule.glue_dir}/{task.dir_name}/" if datamodule.glue_dir else "the hub dataset (no test files)")
    raise EvalConfigError(
        f"predict=true: no GLUE test file {', '.join(s.stem + '.tsv' for s in glue_test_splits(task))} in {where} "
        f"(data.glue_dir={datamodule.glue_dir!r}; the offline data has none); allowed: predict=dev (predictions for "
        f"the dev set), or data.glue_dir=<folder with {task.dir_name}/{glue_test_splits(task)[0].stem}.tsv in "
        "GLUE's test layout>")


def no_test_metrics_reason(cfg: DictConfig, datamodule: Any, is_glue: bool) -> str:
    """Why an evaluation has no ``test/*`` metric (printed by rmoe-eval and by ``test=true``)."""
    if is_glue:
        task = datamodule.task
        return (f"no labelled GLUE test file under data.glue_dir={datamodule.glue_dir!r} ({task.dir_name}/test.tsv "
                "with a label column gives test/* metrics; GLUE's own test labels are not public): the metrics are "
                "the dev set's (val/*) and the held-out slice's")
    envs = OmegaConf.select(cfg, "data.test_envs", default=None)
    return (f"DomainBed: the test environments (data.test_envs={OmegaConf.to_container(envs) if envs else envs}) are "
            "evaluated with every environment's in/out splits among the val metrics, not as test/*")


def print_record(record: dict[str, Any], file: Any = None) -> None:
    """The metrics, one per line, then the files written."""
    file = file or sys.stdout
    print(f"rmoe-eval {record['ckpt_path']} (epoch {record.get('epoch')}, step {record.get('global_step')})", file=file)
    width = max((len(k) for k in record["metrics"]), default=0)
    for k in sorted(record["metrics"]):
        print(f"  {k:<{width}}  {record['metrics'][k]:.6g}", file=file)
    if record.get("no_test_metrics"):
        print(f"  (no test metrics: {record['no_test_metrics']})", file=file)
    for what, path in [("metrics", record.get("path")), ("export", record.get("export")),
                       *[(f"predictions {n}", p) for n, p in record.get("predictions", {}).items()]]:
        if path:
            print(f"  -> {what}: {path}", file=file)


@hydra.main(config_path=CONF_DIR, config_name="eval", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> float | None:
    route_lightning_logs()  # each Lightning line once (Hydra's job logging prints them)
    hc = HydraConfig.get()
    injected = set(run_choice_overrides(cfg.ckpt_path)) if cfg.get("run_config") == "auto" else set()
    overrides = [o for o in hc.overrides.task if o not in injected]
    try:
        run_cfg = eval_config(cfg, overrides, set(hc.runtime.choices))
        record = evaluate(run_cfg)
    except EvalConfigError as e:
        print(f"rmoe-eval: error: {e}", file=sys.stderr)
        sys.exit(2)
    print_record(record)
    return record["metrics"].get("val/score")


def run() -> None:
    """``rmoe-eval`` after :func:`tasks.eval.main` checked that a checkpoint is named: the run's own group options
    first (its config structure, so ``key=value`` overrides are checked against it), then Hydra."""
    register_eval_resolvers()
    argv = sys.argv[1:]
    ckpt = next((a.split("=", 1)[1] for a in reversed(argv) if a.lstrip("+").startswith("ckpt_path=")), None)
    if not any(a.lstrip("+").startswith("run_config=") and a.split("=", 1)[1] != "auto" for a in argv):
        # the run's own group options first: its config structure, so key=value overrides are checked against it
        given = {a.split("=", 1)[0].lstrip("+~") for a in argv if "=" in a}
        sys.argv[1:] = [*(o for o in run_choice_overrides(ckpt) if o.split("=", 1)[0] not in given), *argv]
    _hydra_main()
