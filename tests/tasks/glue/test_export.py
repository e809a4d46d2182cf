"""``tasks.glue.export``: a dense model's export is a plain Hugging Face sequence classifier
(``AutoModelForSequenceClassification.from_pretrained`` gives the module's logits); a MoE model's export is
refused by ``AutoModel`` loudly and rebuilt by ``load_pretrained`` (tiny BERT, offline, no mocks)."""

import json

import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from tasks.glue.export import MOE_MODEL_TYPE, export_pretrained, load_pretrained
from tasks.train import CONF_DIR


def tiny_backbone():
    with open(f"{CONF_DIR}/backbone/tiny_bert.yaml") as f:
        return yaml.safe_load(f)


def moe_cfg(name):
    """The ``moe`` node of ``moe=<name>`` as composed (the method file over moe/_layer's defaults), on layer 1."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = OmegaConf.to_container(compose("train", overrides=[f"moe={name}"]).moe, resolve=False)
    cfg["layers"] = [1]
    return cfg


def trained_like(model):
    """Weights no fresh init has: every parameter moved by a seeded random amount."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model.eval()


def a_batch():
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(1000, 30000, (3, 11), generator=gen)
    ids[:, 0] = 101
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    mask[2, 4:] = 0
    types = torch.zeros_like(ids)
    types[:, 6:] = 1
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}


@pytest.mark.parametrize("task", ["rte", "stsb"])
def test_dense_export_loads_with_auto_model_for_sequence_classification(build_module, tmp_path, task):
    from transformers import AutoModelForSequenceClassification

    model = trained_like(build_module(["task=glue/rte"], task=task, backbone=tiny_backbone(), moe=moe_cfg("dense")))
    export_pretrained(model, tmp_path / "x")
    cfg = json.loads((tmp_path / "x" / "config.json").read_text())
    assert cfg["architectures"] == ["BertForSequenceClassification"]
    hf = AutoModelForSequenceClassification.from_pretrained(tmp_path / "x").eval()
    batch = a_batch()
    with torch.no_grad():
        want = model(batch)
        got = hf(**batch).logits
    assert got.shape == (3, 1 if task == "stsb" else 2)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    if task == "rte":
        assert hf.config.id2label == {0: "entailment", 1: "not_entailment"}
        assert hf.config.problem_type == "single_label_classification"
    else:
        assert hf.config.problem_type == "regression"
    # the weights are under the Hugging Face names: an empty prefix would leave a random model
    fresh = AutoModelForSequenceClassification.from_config(hf.config).eval()
    with torch.no_grad():
        assert not torch.allclose(fresh(**batch).logits, want)
    # and rmoe's own loader rebuilds the module from the same folder
    with torch.no_grad():
        torch.testing.assert_close(load_pretrained(tmp_path / "x")(batch), want, rtol=0, atol=0)


def test_moe_export_is_refused_by_auto_model_and_rebuilt_by_load_pretrained(build_module, tmp_path):
    from transformers import AutoModel, AutoModelForSequenceClassification

    model = trained_like(build_module(["task=glue/rte"], backbone=tiny_backbone(), moe=moe_cfg("moe_topk")))
    export_pretrained(model, tmp_path / "x")
    for auto in (AutoModel, AutoModelForSequenceClassification):
        with pytest.raises(ValueError, match=r"rmoe-moe .*load_pretrained"):
            auto.from_pretrained(tmp_path / "x")
    assert json.loads((tmp_path / "x" / "config.json").read_text())["model_type"] == MOE_MODEL_TYPE
    batch = a_batch()
    with torch.no_grad():
        torch.testing.assert_close(load_pretrained(tmp_path / "x")(batch), model(batch), rtol=0, atol=0)
