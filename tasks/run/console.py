"""What a run prints: the progress bar, the log lines, the run header, the resolved config, the summaries.

* **Progress bar** (:func:`progress_bar`, ``callbacks.progress_bar`` in ``conf/callbacks/default.yaml``):
  Lightning's Rich bar (TQDM without ``rich``) showing the metrics logged with ``prog_bar=True``
  (``train/loss``, ``val/score``) and nothing else (no ``v_num``). A step-based run (``max_steps > 0``
  and ``max_epochs`` -1/None: one endless epoch, e.g. DomainBed) reads ``Step ... k/max_steps`` with
  ``k`` the optimizer steps taken, not ``Epoch 0/-2`` over the batches of the epoch. The Rich bar
  stops when training ends, so what the module prints at ``on_fit_end`` (the end-of-run summaries) goes
  straight to stdout instead of through Rich's live console (which hard-wraps lines at the terminal
  width). ``trainer.enable_progress_bar=false`` drops it (:func:`drop_disabled_progress_bar`).
* **Log lines** (:func:`route_lightning_logs`): the ``lightning`` package logger has a console handler
  of its own *and* propagates to the root logger, where Hydra's job logging prints (and writes to
  ``<run>/<job>.log``) every record again; the Lightning handlers are removed so each line is printed
  once, by Hydra.
* **Header and config** (:func:`run_header`, :func:`print_config_tree`, :func:`save_resolved_config`):
  printed by rank 0 at the start of ``rmoe-train``; the resolved config is saved as
  ``<run>/config_resolved.yaml`` (Hydra's ``.hydra/config.yaml`` keeps the unresolved one).
* **Summaries** (:func:`dev_summary`): the GLUE end-of-run lines (best dev score and its epoch, the
  last score, the run folder); DomainBed prints its per-domain table (:mod:`tasks.domainbed.module`).
"""

from __future__ import annotations

import logging
import math
import os
import sys
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning  # noqa: F401  (its __init__ installs the console handlers that route_lightning_logs removes)
from lightning.pytorch.callbacks import ProgressBar, RichProgressBar, TQDMProgressBar
from lightning.pytorch.utilities.imports import _RICH_AVAILABLE
from omegaconf import DictConfig, OmegaConf

RESOLVED_CONFIG = "config_resolved.yaml"
# the config tree: these groups first, in this order, then the rest
TREE_ORDER = ("task_name", "variant", "seed", "moe", "curriculum", "backbone", "backend", "data", "module",
              "trainer", "callbacks", "logger", "paths")


# --------------------------------------------------------------------------------------------
# progress bar
# --------------------------------------------------------------------------------------------
def step_based(trainer: Any) -> bool:
    """Whether a run is bounded by optimizer steps only (``max_steps > 0``, ``max_epochs`` -1 or None)."""
    max_steps = getattr(trainer, "max_steps", -1)
    max_epochs = getattr(trainer, "max_epochs", None)
    return isinstance(max_steps, int) and max_steps > 0 and max_epochs in (None, -1)


def epoch_description(current_epoch: int, max_epochs: int | None) -> str:
    """``Epoch 1 (of 2)``: the epoch index as the records write it (``metrics.csv``'s ``epoch``, ``best_epoch001``,
    the summary's "at epoch 1"), out of the number of epochs -- not Lightning's ``Epoch 1/1`` (index / last index)."""
    if max_epochs is None or max_epochs < 0:
        return f"Epoch {current_epoch}"
    return f"Epoch {current_epoch} (of {max_epochs})"


class _StepDisplay:
    """Shared by both bars: steps out of ``max_steps`` for step-based runs; no ``v_num``."""

    trainer: Any

    @property
    def total_train_batches(self) -> int | float:
        if step_based(self.trainer):
            return self.trainer.max_steps
        return super().total_train_batches  # type: ignore[misc]

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        # the parent shows ``batch_idx + 1`` done: for a step-based run, the optimizer steps taken
        if step_based(trainer):
            batch_idx = int(trainer.global_step) - 1
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)  # type: ignore[misc]

    def get_metrics(self, trainer: Any, pl_module: Any) -> dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)  # type: ignore[misc]
        items.pop("v_num", None)
        return items


class StepTQDMProgressBar(_StepDisplay, TQDMProgressBar):
    """Lightning's TQDM bar with the display of :class:`_StepDisplay`."""

    def on_train_epoch_start(self, trainer: Any, *args: Any) -> None:
        super().on_train_epoch_start(trainer, *args)
        if self.is_enabled:
            self.train_progress_bar.set_description(
                "Step" if step_based(trainer) else epoch_description(trainer.current_epoch, trainer.max_epochs))


def _rich_bar_class() -> type | None:
    if not _RICH_AVAILABLE:
        return None

    class StepRichProgressBar(_StepDisplay, RichProgressBar):
        """Lightning's Rich bar with the display of :class:`_StepDisplay`; stopped at the end of training."""

        def _get_train_description(self, current_epoch: int) -> str:
            if step_based(self.trainer):
                return f"{'Step':{len(self.validation_description)}}"
            text = epoch_description(current_epoch, self.trainer.max_epochs)
            return f"{text:{len(self.validation_description)}}"

        def on_train_end(self, trainer: Any, pl_module: Any) -> None:
            # give stdout back before the module prints its summary at on_fit_end (the live console would
            # hard-wrap it); a later stage (test) starts the bar again
            self._stop_progress()

    return StepRichProgressBar


def progress_bar(refresh_rate: int | None = None, leave: bool = False) -> ProgressBar:
    """The run's progress bar: Rich when ``rich`` is installed, TQDM otherwise (module docstring).
    ``refresh_rate``: Rich's refreshes per second / TQDM's batches between updates (None: Lightning's)."""
    rich_cls = _rich_bar_class()
    kwargs: dict[str, Any] = {"leave": leave}
    if refresh_rate is not None:
        kwargs["refresh_rate"] = int(refresh_rate)
    return rich_cls(**kwargs) if rich_cls is not None else StepTQDMProgressBar(**kwargs)


def drop_disabled_progress_bar(callbacks: list[Any], enabled: bool) -> list[Any]:
    """``callbacks`` without progress bars when ``trainer.enable_progress_bar`` is false (Lightning
    refuses a progress bar callback then)."""
    return list(callbacks) if enabled else [c for c in callbacks if not isinstance(c, ProgressBar)]


# --------------------------------------------------------------------------------------------
# log lines
# --------------------------------------------------------------------------------------------
LIGHTNING_LOGGERS = ("lightning", "lightning.pytorch", "lightning.fabric")


def route_lightning_logs() -> None:
    """Print Lightning's log records once: when the root logger has handlers (Hydra's job logging),
    remove the console handlers the ``lightning`` packages install at import and let their records
    propagate to the root (module docstring). Without root handlers nothing changes."""
    if not logging.getLogger().handlers:
        return
    for name in LIGHTNING_LOGGERS:
        lg = logging.getLogger(name)
        for h in list(lg.handlers):
            if type(h) is logging.StreamHandler:
                lg.removeHandler(h)
        lg.propagate = True


# --------------------------------------------------------------------------------------------
# header and config
# --------------------------------------------------------------------------------------------
def run_header(cfg: DictConfig, run_dir: str | os.PathLike | None) -> list[str]:
    """The run's identity in a few lines: task, method (``moe.name``), variant, seed, run folder."""
    moe = cfg.get("moe") or {}
    data = cfg.get("data") or {}
    task = data.get("task") or data.get("dataset")
    lines = [f"run     {cfg.get('task_name')}" + (f" ({task})" if task else ""),
             f"method  {moe.get('name')}   variant {cfg.get('variant')}   seed {cfg.get('seed')}"]
    if cfg.get("ckpt_path"):
        lines.append(f"resume  {cfg.ckpt_path}")
    if run_dir:
        lines.append(f"folder  {run_dir}")
    width = max(len(s) for s in lines)
    rule = "─" * min(width, 78)
    return [rule, *lines, rule]


def resolved_config(cfg: DictConfig) -> dict[str, Any]:
    """``cfg`` as plain containers with every interpolation resolved (``???`` left as is)."""
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)  # type: ignore[return-value]


def save_resolved_config(cfg: DictConfig, run_dir: str | os.PathLike) -> Path:
    """Write ``<run_dir>/config_resolved.yaml`` (atomically) and return its path."""
    path = Path(run_dir) / RESOLVED_CONFIG
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(OmegaConf.to_yaml(OmegaConf.create(resolved_config(cfg))))
    os.replace(tmp, path)
    return path


def _ordered_keys(container: Mapping[str, Any]) -> list[str]:
    first = [k for k in TREE_ORDER if k in container]
    return first + [k for k in container if k not in first]


# groups that other nodes copy whole (``module.backbone: ${backbone}``): shown once, referred to elsewhere
SHARED_GROUPS = ("backbone", "moe", "curriculum")


def _refer_to_groups(node: Any, groups: Mapping[str, Any], top: str) -> Any:
    """``node`` with every non-empty mapping equal to a top-level group (other than ``top``, the branch
    being drawn) replaced by ``"<as <group> above>"``."""
    if isinstance(node, dict):
        for g, value in groups.items():
            if g != top and node and node == value:
                return f"<as {g} above>"
        return {k: _refer_to_groups(v, groups, top) for k, v in node.items()}
    if isinstance(node, list):
        return [_refer_to_groups(v, groups, top) for v in node]
    return node


def config_tree(cfg: DictConfig) -> Any:
    """The resolved config as a Rich tree (a branch of YAML per top-level key, the run's groups first;
    a copy of a whole ``backbone``/``moe``/``curriculum`` group inside another node is shown as
    ``<as moe above>``) when ``rich`` is installed; the plain resolved YAML otherwise."""
    container = resolved_config(cfg)
    try:
        from rich.syntax import Syntax
        from rich.tree import Tree
    except ImportError:
        return OmegaConf.to_yaml(OmegaConf.create(container))
    groups = {g: container[g] for g in SHARED_GROUPS if isinstance(container.get(g), dict)}
    tree = Tree("config (resolved)", guide_style="dim")
    for key in _ordered_keys(container):
        value = _refer_to_groups(container[key], groups, key)
        if isinstance(value, (dict, list)) and value:
            text = textwrap.dedent(OmegaConf.to_yaml(OmegaConf.create({key: value})).split("\n", 1)[1])
        else:
            text = f"{value}"
        tree.add(str(key), guide_style="dim").add(Syntax(text.rstrip("\n"), "yaml", theme="ansi_dark",
                                                          background_color="default"))
    return tree


def print_config_tree(cfg: DictConfig, file: Any = None) -> None:
    """Print :func:`config_tree` (Rich: colours, lines wrapped at the terminal's width) on a terminal; off a
    terminal (a pipe, a Slurm log) the plain resolved YAML, every line whole (Rich would cut lines at 80 columns
    without a mark)."""
    file = file or sys.stdout
    tree = config_tree(cfg) if file.isatty() else OmegaConf.to_yaml(OmegaConf.create(resolved_config(cfg)))
    if isinstance(tree, str):
        print(tree, end="", file=file, flush=True)
        return
    from rich.console import Console

    Console(file=file).print(tree)


# --------------------------------------------------------------------------------------------
# end-of-run summaries
# --------------------------------------------------------------------------------------------
def dev_summary(epochs: Sequence[Mapping[str, Any]], headline: str, run_dir: str | os.PathLike | None,
                title: str) -> list[str]:
    """GLUE's end-of-run lines from the per-validation records ``[{"epoch", "step", "score"}]``:
    the best dev score (first of ties) with its epoch and step, the last one, the run folder."""
    scored = [e for e in epochs if e.get("score") is not None and math.isfinite(float(e["score"]))]
    lines = [f"#### {title}", ""]
    if scored:
        best = max(scored, key=lambda e: float(e["score"]))  # max returns the first of equal scores
        last = scored[-1]
        lines += [f"dev {headline}: best {float(best['score']):.4f} at epoch {best['epoch']} (step {best['step']})",
                  f"dev {headline}: last {float(last['score']):.4f} at epoch {last['epoch']} (step {last['step']})"]
    else:
        lines.append(f"dev {headline}: no validation ran")
    if run_dir:
        lines.append(f"run folder: {run_dir}")
    return lines
