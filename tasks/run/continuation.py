"""A continuation is the run it continues: its config is the run's own, changes are refused unless allowed.

``rmoe-train ckpt_path=<run>/checkpoints/last.ckpt [key=value ...]`` continues ``<run>`` in place:

* **Config.** The command line is the run's saved overrides (``<run>/.hydra/overrides.yaml``, less
  ``ckpt_path`` and ``resume.*``; a key given again on the command line replaces the saved one) followed
  by the command line (:func:`continuation_argv`), so Hydra composes the run's config again.
* **Changes.** The composed config is compared, key by key (unresolved, as Hydra saves it), with the
  run's saved ``<run>/.hydra/config.yaml`` (:func:`config_changes`). Any difference -- a changed key
  of the identity, the optimizer, the data, the seed, the schedule length, a callback, or a default
  that changed in the code since the run started -- is refused before anything is written
  (:class:`ResumeChangeError`, naming each key with the run's value and the new one), unless the
  key (or a parent of it) is listed in ``resume.allow_changes`` (e.g.
  ``resume.allow_changes=[trainer.max_steps]`` to extend a run). Keys that do not change what is
  trained are not compared (:data:`NOT_RUN_KEYS`), nor a ``moe.*`` key the run's saved config lacks that now
  holds the ``moe`` group's base default (:func:`tasks.run.moe_schema.is_schema_default`: the method files
  stated fewer keys before the base existed; the layer built is the same). A key renamed since the run was saved
  (:func:`tasks.run.moe_schema.renamed_keys`: ``moe.num_experts``, ``moe.fusion.beta``, ``curriculum.beta``) is
  compared under its new name. An allowed change is recorded in
  ``<run>/attempts.jsonl`` (the attempt's ``changes``: key, the run's value, the new value, the step it
  applies from) and the run's ``.hydra/`` then holds the changed config.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf

from tasks.run.moe_schema import is_schema_default, renamed_keys

#: keys (and their sub-keys) that do not change what a run trains: not compared on a continuation
NOT_RUN_KEYS = ("ckpt_path", "resume", "skip_if_done", "test", "tags", "print_config", "paths", "logger",
                "trainer.enable_progress_bar", "trainer.enable_model_summary", "data.num_workers")
_ABSENT = "<absent>"


class ResumeChangeError(ValueError):
    """A continuation whose config differs from the run's saved config in a key that was not allowed."""


def override_key(override: str) -> str:
    """``seed`` for ``seed=3``, ``callbacks.x._target_`` for ``+callbacks.x._target_=...``, ``a`` for ``~a``."""
    return override.split("=", 1)[0].lstrip("+~")


def _under(key: str, prefixes: Sequence[str]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def saved_overrides(run_dir: str | os.PathLike) -> list[str]:
    """The run's ``.hydra/overrides.yaml`` ([] without one)."""
    path = Path(run_dir) / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return []
    got = yaml.safe_load(path.read_text()) or []
    return [str(o) for o in got]


def continuation_argv(argv: Sequence[str], run_dir: str | os.PathLike) -> list[str]:
    """The run's saved overrides (less ``ckpt_path``, ``resume.*`` and the keys ``argv`` sets) then ``argv``."""
    given = {override_key(a) for a in argv if ("=" in a or a.startswith("~")) and not a.startswith("-")}
    keep = [o for o in saved_overrides(run_dir)
            if not _under(override_key(o), ("ckpt_path", "resume")) and override_key(o) not in given]
    return keep + list(argv)


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, Mapping):
        out: dict[str, Any] = {}
        for k, v in node.items():
            key = f"{prefix}.{k}" if prefix else str(k)
            if isinstance(v, Mapping) and v:
                out.update(_flatten(v, key))
            else:
                out[key] = v
        return out
    return {prefix: node}


def config_changes(now: Any, saved: Any) -> list[dict[str, Any]]:
    """``[{key, run, now}]``: every leaf key (unresolved values) that differs between ``saved`` (the run's
    ``.hydra/config.yaml``) and ``now`` (this attempt's composed config), sorted; :data:`NOT_RUN_KEYS` left out, a
    renamed key compared under its new name, and a ``moe.*`` key the run lacks that now holds the ``moe`` group's
    base default not counted (module docstring)."""
    def plain(c: Any) -> Any:
        return OmegaConf.to_container(c, resolve=False) if isinstance(c, DictConfig) else c

    a, b = _flatten(plain(saved)), _flatten(plain(now))
    for old, new in renamed_keys().items():  # a key under its previous name (the run's, or given again): the new one
        for flat in (a, b):
            if old in flat and new not in flat:
                flat[new] = flat.pop(old)
    router = b.get("moe.router")
    out = []
    for key in sorted(set(a) | set(b)):
        if _under(key, NOT_RUN_KEYS):
            continue
        old, new = a.get(key, _ABSENT), b.get(key, _ABSENT)
        if old != new and not (old == _ABSENT and is_schema_default(key, new, router)):  # the base added it since
            out.append({"key": key, "run": old, "now": new})
    return out


def check_continuation(cfg: Any, run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Refuse a continuation of ``run_dir`` whose config ``cfg`` changes the run (see the module
    docstring); returns the allowed changes. No saved config: nothing to compare ([])."""
    path = Path(run_dir) / ".hydra" / "config.yaml"
    if not path.is_file():
        return []
    changes = config_changes(cfg, OmegaConf.load(path))
    allowed = OmegaConf.select(cfg, "resume.allow_changes", default=None) or []
    allowed = [str(a) for a in allowed]
    refused = [c for c in changes if not _under(c["key"], allowed)]
    if refused:
        lines = "; ".join(f"{c['key']}: the run has {c['run']!r}, this attempt {c['now']!r}" for c in refused)
        keys = ",".join(c["key"] for c in refused)
        raise ResumeChangeError(
            f"ckpt_path={cfg.get('ckpt_path')!r} continues the run in {str(run_dir)!r}, but this attempt's config "
            f"differs from the run's ({path}): {lines}; a continuation is the run it continues. Allowed: drop "
            f"those overrides (or set each key back to the run's value), or say so explicitly with "
            f"resume.allow_changes=[{keys}] (recorded in attempts.jsonl with the step it applies from), or "
            "start a new run from its weights with init_from=<ckpt> in another folder")
    return changes
