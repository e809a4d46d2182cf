"""Before ``trainer.fit``: make the run resumable and check the checkpoint it resumes from.

:func:`prepare_fit` (called by :func:`tasks.job.train` just before ``trainer.fit``)

* adds :class:`callbacks.resume.RNGStateCallback` to the trainer (unless already there), so every
  checkpoint carries the Python/NumPy/torch generator states and a resumed run continues them;
* when ``ckpt_path`` is a file, :func:`check_checkpoint` reads it (memory-mapped) and fails before
  training when it is missing, unreadable or truncated, or when its ``state_dict`` does not fit
  the model — naming the file, the first mismatching keys/shapes and what the model expects
  (typically: a checkpoint of another backbone, ``moe`` option or number of experts).

* checks the checkpoint's *run identity* (task, dataset, test_envs, method/variant, backbone: written
  into every checkpoint by :class:`callbacks.resume.RunIdentityCallback`) against this run's and
  refuses another run's checkpoint naming the differences (:class:`CheckpointIdentityError`); a
  checkpoint without an identity (written before it was recorded) is accepted with a warning;
* ``init_from=<ckpt>`` starts a *new* run from another
  checkpoint's weights only (fine-tuning, e.g. from another task): shapes must fit, the identity is
  not checked, and nothing else (optimizer, step, λ, loader position) is taken over.

Lightning's own ``ckpt_path`` keywords (``last``, ``best``, ``hpc``, ``registry...``) and remote
URLs (``s3://...``) are left to Lightning.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from callbacks.resume import IDENTITY_KEY, RNGStateCallback, RunIdentityCallback

SHOW = 5  # mismatching keys named in the message, per kind
ALLOWED = ("a complete checkpoint written by rmoe-train for this model configuration "
           "(e.g. <run>/checkpoints/last.ckpt), or ckpt_path=null to start from scratch")
INIT_ALLOWED = ("a complete checkpoint written by rmoe-train whose weights fit this model (e.g. "
                "<run>/checkpoints/best_epoch002.ckpt), or init_from=null to start from random/pretrained weights")
IDENTITY_FIELDS = ("task_name", "task", "test_envs", "method", "variant", "backbone")


class CheckpointMismatchError(ValueError):
    """The checkpoint's ``state_dict`` does not fit the model (keys or shapes)."""


class CheckpointIdentityError(ValueError):
    """The checkpoint was written by a run of another task, dataset, test_envs, method or backbone."""


def run_identity(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """What makes two runs the same run (resuming one from the other's checkpoint is allowed)."""
    def sel(key: str) -> Any:
        if isinstance(cfg, DictConfig):
            v = OmegaConf.select(cfg, key, default=None)
            return OmegaConf.to_container(v, resolve=True) if isinstance(v, (DictConfig, ListConfig)) else v
        node: Any = cfg
        for part in key.split("."):
            node = node.get(part) if isinstance(node, Mapping) else None
        return node

    test_envs = sel("data.test_envs")
    return {"task_name": sel("task_name"), "task": sel("data.task") or sel("data.dataset"),
            "test_envs": sorted(int(t) for t in test_envs) if test_envs is not None else None,
            "method": sel("moe.name"), "variant": sel("variant") or sel("moe.name"),
            "backbone": sel("backbone.name")}


def check_identity(path: str, saved: Mapping[str, Any] | None, expected: Mapping[str, Any] | None) -> None:
    """Refuse a checkpoint whose recorded run identity differs from this run's."""
    if not expected:
        return
    if not saved:
        warnings.warn(f"ckpt_path={path!r} records no run identity (written before identities were "
                      "recorded): its task/method/backbone cannot be checked", stacklevel=2)
        return
    diff = [f"{k}: checkpoint {saved.get(k)!r}, this run {expected.get(k)!r}" for k in IDENTITY_FIELDS
            if k in saved and k in expected and saved.get(k) != expected.get(k)]
    if diff:
        raise CheckpointIdentityError(
            f"ckpt_path={path!r} was written by another run ({'; '.join(diff)}); resuming it would mix that "
            "run's state and records into this one; allowed: a checkpoint of this run (same task, dataset, "
            "test_envs, method/variant and backbone), or init_from=<ckpt> to fine-tune from its weights as "
            "a new run")


def _allowed(key: str) -> str:
    return INIT_ALLOWED if key == "init_from" else ALLOWED


def _is_local_path(ckpt_path: str) -> bool:
    if ckpt_path in ("last", "best", "hpc") or ckpt_path.startswith("registry"):
        return False
    return "://" not in ckpt_path


def _shape(v: Any) -> list[int] | None:
    return list(v.shape) if hasattr(v, "shape") else None


def _first(items: list[str], n: int = SHOW) -> str:
    more = f", ... ({len(items) - n} more)" if len(items) > n else ""
    return ", ".join(items[:n]) + more


def load_checkpoint_file(ckpt_path: str | os.PathLike, key: str = "ckpt_path") -> dict[str, Any]:
    """Read a checkpoint for inspection; a clear error naming ``key`` (the config key that gave it) and the
    path when it is missing or corrupt."""
    path = os.fspath(ckpt_path)
    allowed = _allowed(key)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{key}={path!r}: no such file; allowed: {allowed}")
    if os.path.isdir(path):
        raise IsADirectoryError(f"{key}={path!r} is a folder; allowed: {allowed}")
    if os.path.getsize(path) == 0:
        raise ValueError(f"{key}={path!r} is an empty file (0 bytes); allowed: {allowed}")
    try:
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
        except RuntimeError as e:  # legacy (non-zip) files cannot be memory-mapped
            if "mmap" not in str(e):
                raise
            ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise ValueError(f"{key}={path!r} is not a readable checkpoint (truncated or corrupt?): "
                         f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}; allowed: {allowed}") from e
    if not isinstance(ckpt, Mapping) or not isinstance(ckpt.get("state_dict"), Mapping):
        what = f"keys {sorted(ckpt)[:8]}" if isinstance(ckpt, Mapping) else f"a {type(ckpt).__name__}"
        raise ValueError(f"{key}={path!r} is not a Lightning checkpoint: no 'state_dict' mapping ({what}); "
                         f"allowed: {allowed}")
    return dict(ckpt)


def state_dict_mismatch(saved: Mapping[str, Any], expected: Mapping[str, Any],
                        strict: bool = True) -> dict[str, list]:
    """``{"missing": [...], "unexpected": [...], "shape": [(key, saved_shape, expected_shape), ...]}``."""
    missing = [k for k in expected if k not in saved] if strict else []
    unexpected = [k for k in saved if k not in expected] if strict else []
    shape = [(k, _shape(saved[k]), _shape(v)) for k, v in expected.items()
             if k in saved and _shape(v) is not None and _shape(saved[k]) != _shape(v)]
    return {"missing": missing, "unexpected": unexpected, "shape": shape}


def check_checkpoint(ckpt_path: str | os.PathLike | None, model: torch.nn.Module,
                     key: str = "ckpt_path") -> dict[str, Any] | None:
    """Fail before training when ``ckpt_path`` cannot be resumed into ``model`` (see module docstring).

    Returns the loaded (memory-mapped) checkpoint, or ``None`` when there is nothing to check."""
    if ckpt_path is None or ckpt_path == "":
        return None
    path = os.fspath(ckpt_path)
    if not _is_local_path(path):
        return None
    ckpt = load_checkpoint_file(path, key)
    expected = model.state_dict()
    diff = state_dict_mismatch(ckpt["state_dict"], expected, strict=bool(getattr(model, "strict_loading", True)))
    if any(diff.values()):
        parts = []
        if diff["shape"]:
            parts.append(f"{len(diff['shape'])} tensor(s) of another shape: " + _first(
                [f"{k}: checkpoint {a}, model expects {b}" for k, a, b in diff["shape"]]))
        if diff["missing"]:
            parts.append(f"{len(diff['missing'])} key(s) the model expects are missing: {_first(diff['missing'])}")
        if diff["unexpected"]:
            parts.append(f"{len(diff['unexpected'])} key(s) the model does not have: {_first(diff['unexpected'])}")
        raise CheckpointMismatchError(
            f"{key}={path!r} does not fit the model {type(model).__name__} "
            f"({len(expected)} tensors): " + "; ".join(parts)
            + f". The checkpoint was written for another architecture (backbone, moe option, initial_experts/"
              f"max_experts or MoE layers); allowed: {_allowed(key)}")
    return ckpt


def init_from_checkpoint(init_from: str | os.PathLike, model: torch.nn.Module) -> None:
    """Load only the weights of ``init_from`` into ``model`` (a new run starting from them)."""
    ckpt = check_checkpoint(init_from, model, key="init_from")
    if ckpt is None:
        raise ValueError(f"init_from={os.fspath(init_from)!r}: allowed: a local checkpoint file")
    model.load_state_dict(ckpt["state_dict"], strict=bool(getattr(model, "strict_loading", True)))


def prepare_fit(trainer: Any, model: torch.nn.Module, ckpt_path: str | os.PathLike | None,
                identity: Mapping[str, Any] | None = None) -> int | None:
    """Add the RNG-state and run-identity callbacks to ``trainer``; check ``ckpt_path`` against
    ``model`` (shapes) and ``identity`` (this run's :func:`run_identity`). Returns the checkpoint's
    global step (None without a local checkpoint)."""
    if not any(isinstance(cb, RNGStateCallback) for cb in trainer.callbacks):
        trainer.callbacks.append(RNGStateCallback())
    if identity and not any(isinstance(cb, RunIdentityCallback) for cb in trainer.callbacks):
        trainer.callbacks.append(RunIdentityCallback(identity))
    ckpt = check_checkpoint(ckpt_path, model)
    if ckpt is None:
        return None
    check_identity(os.fspath(ckpt_path), ckpt.get(IDENTITY_KEY), identity)
    step = int(ckpt.get("global_step", 0) or 0)
    del ckpt
    return step
