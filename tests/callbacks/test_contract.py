"""callbacks/contract.py: the capabilities the callbacks need from the modules, checked at setup by name."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from callbacks.contract import (
    DomainEvalModule,
    LambdaModule,
    LambdaReader,
    RoutingProbe,
    TrainingForward,
    members,
    missing_members,
    require,
)
from callbacks.curriculum import CurriculumCallback
from callbacks.domainbed_results import DomainBedResultsCallback

VIT = {"arch": None, "patch_size": 4, "embed_dim": 16, "depth": 2, "num_heads": 2, "mlp_ratio": 2.0}


class Bare(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(2, 1)


def test_each_protocol_lists_its_members():
    assert members(LambdaReader) == ["lambda_aux"]
    assert members(LambdaModule) == ["lambda_aux", "set_lambda"]
    assert members(DomainEvalModule) == ["lambda_aux", "last_eval"]
    assert members(RoutingProbe) == ["routing_probe"] and members(TrainingForward) == ["training_forward"]


def test_missing_members_are_named_by_the_callback_at_setup(tmp_path):
    trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    curriculum = CurriculumCallback({"mode": "constant", "lambda0": 0.1})
    with pytest.raises(TypeError, match=r"^CurriculumCallback needs the LightningModule to provide LambdaModule "
                                        r"\(callbacks.contract\): Bare has no lambda_aux, set_lambda$"):
        curriculum.setup(trainer, Bare(), "fit")
    results = DomainBedResultsCallback(output_dir=str(tmp_path), args={}, hparams={})
    with pytest.raises(TypeError, match=r"DomainBedResultsCallback .* DomainEvalModule .*: Bare has no lambda_aux, "
                                        r"last_eval$"):
        results.setup(trainer, Bare(), "fit")


def test_a_member_that_is_not_callable_counts_as_missing():
    class NotCallable(Bare):
        set_lambda = 0.5
        lambda_aux = 0.0

    assert missing_members(NotCallable(), LambdaModule) == ["set_lambda"]
    require(NotCallable(), LambdaReader, "x")  # a plain attribute is a readable λ


def test_the_benchmark_modules_provide_what_the_callbacks_need(build_module):
    glue = build_module(["task=glue/rte"], backbone={"pretrained": None, "config": {
        "model_type": "bert", "vocab_size": 100, "hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
        "intermediate_size": 32}}, moe=None)
    vision = build_module(["task=domainbed/rotated_digits"], backbone=VIT, input_shape=[2, 8, 8], num_classes=3,
                          moe=None)
    assert missing_members(glue, LambdaModule) == [] and missing_members(glue, TrainingForward) == []
    for proto in (LambdaModule, DomainEvalModule, RoutingProbe, TrainingForward):
        assert missing_members(vision, proto) == [], proto.__name__
        assert isinstance(vision, proto)
    assert not isinstance(glue, DomainEvalModule)
