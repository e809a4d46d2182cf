"""``save_pretrained``-style export of a MoE-fied GLUE model, and the loader that rebuilds it.

The folder (``rmoe-eval ckpt_path=<ckpt> export=<folder>``)::

    config.json            the Hugging Face encoder config (AutoConfig.from_pretrained reads it)
    model.safetensors      every weight and buffer of the model: encoder (with its MoE layers), head, and the
                           MoE state buffers (Stateful Fusion ``m``, the DynMoE expert mask and pool records)
    rmoe_config.json       what rebuilds the model around the weights: the GLUE task and its labels, the MoE
                           layers, ``init`` and the :class:`rmoe.MoEConfig` fields (``moe``), the backend, the
                           head's dropout, and the checkpoint it came from
    tokenizer files        the tokenizer's ``save_pretrained`` output (AutoTokenizer.from_pretrained reads it)

:func:`load_pretrained` builds the same :class:`tasks.glue.module.GLUEModule` (randomly initialised encoder of
that config, FFN -> MoE surgery at the same layers, the head) and loads the weights strictly; in eval mode it
returns the same logits as the checkpoint it was exported from (``tests/tasks/test_eval.py``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

WEIGHTS_FILE = "model.safetensors"
RMOE_CONFIG_FILE = "rmoe_config.json"
EXPORT_FORMAT = 1


def _plain(obj: Any) -> Any:
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(obj, (DictConfig, ListConfig)):
        return OmegaConf.to_container(obj, resolve=True)
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def export_pretrained(model: Any, folder: str | os.PathLike, tokenizer: Any = None,
                      source: dict[str, Any] | None = None) -> Path:
    """Write ``model`` (a :class:`tasks.glue.module.GLUEModule`) to ``folder`` (module docstring)."""
    from safetensors.torch import save_model

    from tasks.run.common import split_moe_config

    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"export={str(folder)!r} is a file; allowed: a folder (created if missing)")
    folder.mkdir(parents=True, exist_ok=True)
    hp = model.hparams
    moe = _plain(hp.get("moe"))
    backend = hp.get("backend", "torch")
    layers, init, layer_cfg = split_moe_config(moe, backend)
    model.encoder.config.save_pretrained(folder)
    save_model(model, str(folder / WEIGHTS_FILE))
    record = {
        "format": EXPORT_FORMAT,
        "task": model.task.name,
        "labels": list(model.task.labels) if model.task.labels is not None else None,
        "num_labels": model.task.num_labels,
        "moe": moe,
        "backend": backend,
        "moe_layers": layers,
        "moe_init": init,
        "moe_layer_config": layer_cfg,
        "classifier_dropout": hp.get("classifier_dropout"),
        "source": _plain(source or {}),
    }
    tmp = folder / (RMOE_CONFIG_FILE + ".tmp")
    tmp.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, folder / RMOE_CONFIG_FILE)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return folder


def load_pretrained(folder: str | os.PathLike, map_location: str = "cpu") -> Any:
    """The :class:`tasks.glue.module.GLUEModule` exported to ``folder``, weights loaded, in eval mode."""
    from safetensors.torch import load_model
    from transformers import AutoConfig

    from .module import GLUEModule

    folder = Path(folder)
    for name in ("config.json", WEIGHTS_FILE, RMOE_CONFIG_FILE):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder}: no {name}; allowed: a folder written by rmoe-eval export=<folder> "
                                    f"(config.json, {WEIGHTS_FILE}, {RMOE_CONFIG_FILE})")
    record = json.loads((folder / RMOE_CONFIG_FILE).read_text())
    if record.get("format") != EXPORT_FORMAT:
        raise ValueError(f"{folder / RMOE_CONFIG_FILE}: format={record.get('format')!r}; allowed: {EXPORT_FORMAT}")
    hf = AutoConfig.from_pretrained(folder).to_dict()
    hf = {k: v for k, v in hf.items() if k not in ("transformers_version", "architectures", "_name_or_path")}
    backbone = {"pretrained": None, "config": hf}
    model = GLUEModule(record["task"], backbone, record["moe"], backend=record["backend"],
                       classifier_dropout=record.get("classifier_dropout"))
    missing, unexpected = load_model(model, str(folder / WEIGHTS_FILE), strict=True, device=map_location)
    if missing or unexpected:  # strict=True raises first; kept for clarity
        raise ValueError(f"{folder / WEIGHTS_FILE}: missing {missing}, unexpected {unexpected}")
    return model.eval()
