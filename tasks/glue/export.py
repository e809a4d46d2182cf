"""``save_pretrained``-style export of a GLUE model, and the loader that rebuilds it.

``rmoe-eval ckpt_path=<ckpt> export=<folder>`` writes one of two layouts (``rmoe_config.json``'s ``layout``):

* ``transformers`` -- a model without MoE layers (``moe=dense``): a plain Hugging Face sequence classifier.
  ``config.json`` names the architecture (``BertForSequenceClassification`` for BERT backbones) with the task's
  labels (``id2label``, ``problem_type``) and ``model.safetensors`` holds the encoder under the Hugging Face
  names (``bert.*``) and the head as ``classifier.*``, so ``AutoModelForSequenceClassification.from_pretrained
  (folder)`` gives the checkpoint's logits (in eval mode) with no ``rmoe`` installed. The export checks this
  itself on a random batch before it writes anything, and refuses a backbone whose Hugging Face classifier
  computes something else than ``head(pooler_output)``.
* ``rmoe`` -- a model with MoE layers. Transformers has no architecture for a MoE FFN (router, experts, the
  Stateful Fusion state ``m``, the DynMoE expert mask): loaded into a ``BertModel`` the experts would be
  dropped and the FFNs randomly initialised without an error. So ``config.json`` carries ``model_type``
  :data:`MOE_MODEL_TYPE`, which ``AutoConfig`` / ``AutoModel*.from_pretrained`` refuse loudly (the message
  names it, and it says how to load the folder); the encoder's Hugging Face config is kept in
  ``rmoe_config.json`` (``encoder_config``) and ``model.safetensors`` holds every weight and buffer of the
  module (``encoder.*`` with its MoE layers, ``head.*``, the MoE state buffers).

Both layouts also have ``rmoe_config.json`` (the GLUE task and its labels, the MoE layers, ``init`` and the
:class:`rmoe.MoEConfig` fields, the backend, the head's dropout, the checkpoint it came from) and the tokenizer's
``save_pretrained`` files (``AutoTokenizer.from_pretrained(folder)`` reads them). :func:`load_pretrained` rebuilds
the same :class:`tasks.glue.module.GLUEModule` from either layout (and from format-1 folders of older commits) and
loads the weights strictly; in eval mode it returns the checkpoint's logits (``tests/tasks/glue/test_export.py``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from safetensors.torch import load_file, load_model, save_model
from transformers import AutoModelForSequenceClassification

from tasks.run.common import split_moe_config

from .module import GLUEModule

WEIGHTS_FILE = "model.safetensors"
RMOE_CONFIG_FILE = "rmoe_config.json"
EXPORT_FORMAT = 2
#: GLUEModule's training-only arguments for a loaded export, which is evaluated, never trained: no held-out slice,
#: no frozen prefix (the same forward), and optimizer/loss weights that no eval-mode forward reads
NOT_TRAINED = {"heldout_samples": None, "freeze_layers": 0, "cache_frozen": False, "lr": 1.0, "weight_decay": 0.0,
               "warmup_ratio": 0.0, "adam_eps": 1.0, "block_weight": 0.0, "z_loss_weight": 0.0}
#: ``config.json``'s model_type of a MoE export: AutoConfig's "does not recognize this architecture" quotes it
MOE_MODEL_TYPE = ("rmoe-moe (a MoE model: Transformers has no architecture for its MoE FFN layers; load it with "
                  "tasks.glue.export.load_pretrained(folder) from the rmoe package)")


class ExportError(ValueError):
    """An export that would not load as described (the message names the backbone and why)."""


def _plain(obj: Any) -> Any:
    if isinstance(obj, (DictConfig, ListConfig)):
        return OmegaConf.to_container(obj, resolve=True)
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def _write_json(path: Path, record: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


def _encoder_config_dict(model: Any) -> dict[str, Any]:
    hf = model.encoder.config.to_dict()
    return {k: v for k, v in hf.items() if k not in ("transformers_version", "architectures", "_name_or_path")}


def transformers_classifier(model: Any) -> Any:
    """The Hugging Face ``AutoModelForSequenceClassification`` holding ``model``'s encoder and head (eval mode).

    Raises :class:`ExportError` unless it gives ``model``'s logits on a random batch (same backbone type, a
    ``classifier`` Linear on the pooled output)."""
    task = model.task
    cfg = model.encoder.config.__class__.from_dict(_encoder_config_dict(model))
    cfg.num_labels = task.num_labels
    cfg.problem_type = "regression" if task.is_regression else "single_label_classification"
    if task.labels is not None:
        cfg.id2label = dict(enumerate(task.labels))
        cfg.label2id = {name: i for i, name in enumerate(task.labels)}
    cfg.classifier_dropout = float(model.head[0].p)
    hf = AutoModelForSequenceClassification.from_config(cfg)
    base = getattr(hf, hf.base_model_prefix, None)
    head = getattr(hf, "classifier", None)
    why = None
    if base is None or type(base) is not type(model.encoder):
        why = f"its base model is {type(base).__name__}, not the encoder's {type(model.encoder).__name__}"
    elif not isinstance(head, torch.nn.Linear) or head.weight.shape != model.head[1].weight.shape:
        why = f"its classifier is {type(head).__name__}, not a Linear on the pooled output"
    if why is None:
        base.load_state_dict(model.encoder.state_dict(), strict=True)
        head.load_state_dict(model.head[1].state_dict(), strict=True)
        hf.eval()
        was_training = model.training
        model.eval()
        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(0, cfg.vocab_size, (2, 9), generator=gen)
        mask = torch.ones_like(ids)
        mask[1, 6:] = 0
        batch = {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}
        with torch.no_grad():
            ours, theirs = model(batch), hf(**batch).logits
        model.train(was_training)
        if not torch.allclose(ours, theirs, rtol=1e-5, atol=1e-6):
            why = f"its logits differ from the module's (max abs difference {float((ours - theirs).abs().max()):.3g})"
    if why is not None:
        raise ExportError(f"export: {type(hf).__name__} cannot hold this {cfg.model_type} model ({why}); allowed: a "
                          "backbone whose Hugging Face sequence classifier is a Linear on the pooler output (BERT)")
    return hf


def export_pretrained(model: Any, folder: str | os.PathLike, tokenizer: Any = None,
                      source: dict[str, Any] | None = None) -> Path:
    """Write ``model`` (a :class:`tasks.glue.module.GLUEModule`) to ``folder`` (module docstring)."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"export={str(folder)!r} is a file; allowed: a folder (created if missing)")
    hp = model.hparams
    moe = _plain(hp.get("moe"))
    backend = hp.get("backend", "torch")
    layers, init, layer_cfg = split_moe_config(moe, backend)
    dense = layer_cfg is None
    hf = transformers_classifier(model) if dense else None  # refused before anything is written
    folder.mkdir(parents=True, exist_ok=True)
    record = {
        "format": EXPORT_FORMAT,
        "layout": "transformers" if dense else "rmoe",
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
    if dense:
        hf.save_pretrained(folder)  # config.json (architectures, labels) and model.safetensors, HF names
    else:
        record["encoder_config"] = _encoder_config_dict(model)
        _write_json(folder / "config.json", {"model_type": MOE_MODEL_TYPE, "rmoe_export_format": EXPORT_FORMAT})
        save_model(model, str(folder / WEIGHTS_FILE))
    _write_json(folder / RMOE_CONFIG_FILE, record)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return folder


def load_pretrained(folder: str | os.PathLike, map_location: str = "cpu") -> Any:
    """The :class:`tasks.glue.module.GLUEModule` exported to ``folder``, weights loaded, in eval mode."""
    folder = Path(folder)
    for name in ("config.json", WEIGHTS_FILE, RMOE_CONFIG_FILE):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder}: no {name}; allowed: a folder written by rmoe-eval export=<folder> "
                                    f"(config.json, {WEIGHTS_FILE}, {RMOE_CONFIG_FILE})")
    record = json.loads((folder / RMOE_CONFIG_FILE).read_text())
    fmt, layout = record.get("format"), record.get("layout", "rmoe")
    if fmt not in (1, EXPORT_FORMAT):
        raise ValueError(f"{folder / RMOE_CONFIG_FILE}: format={fmt!r}; allowed: 1 or {EXPORT_FORMAT}")
    if fmt == 1 or layout == "transformers":
        hf = json.loads((folder / "config.json").read_text())
        drop = ("transformers_version", "architectures", "_name_or_path", "id2label", "label2id", "num_labels",
                "problem_type", "classifier_dropout", "dtype", "torch_dtype")
        hf = {k: v for k, v in hf.items() if k not in drop}
    else:
        hf = record["encoder_config"]
    model = GLUEModule(record["task"], {"pretrained": None, "config": hf}, record["moe"], backend=record["backend"],
                       classifier_dropout=record.get("classifier_dropout"), **NOT_TRAINED)
    if layout == "transformers" and fmt == EXPORT_FORMAT:
        state = load_file(str(folder / WEIGHTS_FILE), device=map_location)
        prefix = next(k.split(".", 1)[0] for k in state if not k.startswith("classifier."))
        model.encoder.load_state_dict({k[len(prefix) + 1:]: v for k, v in state.items()
                                       if k.startswith(prefix + ".")}, strict=True)
        model.head[1].load_state_dict({k.removeprefix("classifier."): v for k, v in state.items()
                                       if k.startswith("classifier.")}, strict=True)
    else:
        load_model(model, str(folder / WEIGHTS_FILE), strict=True, device=map_location)
    return model.eval()
