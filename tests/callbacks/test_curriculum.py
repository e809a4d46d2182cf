"""CurriculumCallback: λ set on the module every optimizer step, logged, restored on resume."""

import csv

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, TensorDataset

from callbacks.curriculum import CurriculumCallback
from rmoe.config import ConfigError


class Tiny(L.LightningModule):
    """The callback's contract: ``set_lambda(value)``; records the λ each training step saw."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(2, 1)
        self.lambda_aux = -1.0
        self.seen = []

    def set_lambda(self, value):
        self.lambda_aux = value

    def training_step(self, batch, batch_idx):
        self.seen.append(self.lambda_aux)
        (x,) = batch
        return self.lin(x).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def loader(n=8):
    return DataLoader(TensorDataset(torch.randn(n, 2)), batch_size=1)


def fit(cb, tmp_path, max_epochs=1, n=8, accumulate=1, ckpt_path=None, module=None):
    module = module or Tiny()
    trainer = L.Trainer(max_epochs=max_epochs, callbacks=[cb], logger=CSVLogger(tmp_path, name="", version=""),
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        log_every_n_steps=1, accumulate_grad_batches=accumulate, accelerator="cpu")
    trainer.fit(module, loader(n), ckpt_path=ckpt_path)
    return module, trainer


def logged(tmp_path, key):
    with open(tmp_path / "metrics.csv", newline="") as f:
        return [float(r[key]) for r in csv.DictReader(f) if r.get(key)]


def test_linear_ramp_every_step(tmp_path):
    cb = CurriculumCallback({"mode": "linear_ramp", "lambda_min": 0.001, "lambda_max": 0.009})
    module, _ = fit(cb, tmp_path)
    want = [0.001 + 0.008 * t / 8 for t in range(8)]  # λ at step τ of T = 8
    assert module.seen == pytest.approx(want)
    assert logged(tmp_path, "curriculum/lambda") == pytest.approx(want)
    assert logged(tmp_path, "curriculum/phase") == [0.0] * 8


def test_exp_decay_and_constant(tmp_path):
    module, _ = fit(CurriculumCallback({"mode": "exp_decay", "lambda_min": 0.1, "lambda_max": 1.0, "decay": 0.5}),
                    tmp_path / "a", n=5)
    # λ_max β^(τ+1), floored: the released code multiplies by β before the first step
    assert module.seen == pytest.approx([0.5, 0.25, 0.125, 0.1, 0.1])
    module, _ = fit(CurriculumCallback({"mode": "constant", "lambda0": 0.01}), tmp_path / "b", n=3)
    assert module.seen == pytest.approx([0.01] * 3)


def test_phased_logs_phase_index(tmp_path):
    phases = [{"name": "warm", "end": 0.25, "value": 0.0},
              {"name": "up", "end": 0.75, "start_value": 0.0, "end_value": 1.0},
              {"name": "hold", "end": 1.0, "value": 1.0}]
    module, _ = fit(CurriculumCallback({"mode": "phased", "units": "fraction", "phases": phases}), tmp_path)
    # τ/T = 0, .125 (warm) | .25, .375, .5, .625 (up: (τ/T - .25) / .5) | .75, .875 (hold)
    assert module.seen == pytest.approx([0, 0, 0, 0.25, 0.5, 0.75, 1, 1])
    assert logged(tmp_path, "curriculum/phase") == [0, 0, 1, 1, 1, 1, 2, 2]


def test_steps_are_optimizer_steps_under_accumulation(tmp_path):
    cb = CurriculumCallback({"mode": "linear_ramp", "lambda_min": 0.0, "lambda_max": 1.0})
    module, trainer = fit(cb, tmp_path, n=8, accumulate=2)
    assert trainer.global_step == 4
    assert module.seen == pytest.approx([0, 0, 0.25, 0.25, 0.5, 0.5, 0.75, 0.75])


def test_state_dict_roundtrip_and_resume(tmp_path):
    cb = CurriculumCallback({"mode": "linear_ramp", "lambda_min": 0.0, "lambda_max": 1.0})
    fit(cb, tmp_path / "a", n=4)
    state = cb.state_dict()
    assert state == {"mode": "linear_ramp", "lambda": pytest.approx(0.75), "phase": "ramp", "step": 3}
    cb2 = CurriculumCallback({"mode": "linear_ramp", "lambda_min": 0.0, "lambda_max": 1.0})
    cb2.load_state_dict(state)
    assert (cb2.lam, cb2.phase, cb2.step) == (pytest.approx(0.75), "ramp", 3)

    # through a Lightning checkpoint: the restored λ is on the module when training starts again
    trainer_cb = CurriculumCallback({"mode": "linear_ramp", "lambda_min": 0.0, "lambda_max": 1.0})
    _, trainer = fit(trainer_cb, tmp_path / "b", n=4)
    ckpt = tmp_path / "b.ckpt"
    trainer.save_checkpoint(ckpt)

    class Probe(L.Callback):
        def on_train_start(self, trainer, pl_module):
            self.at_start = pl_module.lambda_aux

    probe = Probe()
    cb3 = CurriculumCallback({"mode": "linear_ramp", "lambda_min": 0.0, "lambda_max": 1.0})
    module = Tiny()
    trainer3 = L.Trainer(max_epochs=2, callbacks=[cb3, probe], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    trainer3.fit(module, loader(4), ckpt_path=ckpt)
    assert probe.at_start == pytest.approx(0.75)  # put back before the first resumed step
    assert module.seen == pytest.approx([0.5, 0.625, 0.75, 0.875])  # T = 8 now: τ = 4..7


@pytest.mark.parametrize("schedule,match", [
    ({"mode": "nope"}, "allowed: constant|linear_ramp|exp_decay|phased"),
    ({"mode": "linear_ramp", "lambda_min": 0.1}, "lambda_max missing"),
    ({"mode": "constant", "lambda0": 0.1, "betta": 2}, "betta=2"),
    ({"lambda0": 0.1}, "no 'mode'"),
])
def test_bad_schedule_fails_at_construction(schedule, match):
    with pytest.raises((ConfigError, ValueError), match=match.replace("|", r"\|")):
        CurriculumCallback(schedule)


def test_schedule_object_gives_the_phase_names():
    phases = [{"name": "warm", "end": 0.5, "value": 0.0}, {"name": "hold", "end": 1.0, "value": 1.0}]
    cb = CurriculumCallback({"mode": "phased", "phases": phases, "name": "phased"})
    assert cb.phase_names == ("warm", "hold") and cb.phase_index("hold") == 1 and cb.phase_index("x") == -1
    assert CurriculumCallback({"mode": "exp_decay", "lambda_min": 0, "lambda_max": 1, "decay": 0.5}).phase_names == (
        "decay",)


def test_module_without_set_lambda_is_named(tmp_path):
    class NoSetter(Tiny):
        set_lambda = None

    cb = CurriculumCallback({"mode": "constant", "lambda0": 0.1})
    with pytest.raises(TypeError, match="NoSetter has no set_lambda"):
        fit(cb, tmp_path, n=2, module=NoSetter())


def test_resume_without_curriculum_state_fails_naming_the_checkpoint(tmp_path):
    # a checkpoint written by a run without the curriculum callback holds no λ
    trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu")
    trainer.fit(Tiny(), loader(2))
    ckpt = tmp_path / "no_curriculum.ckpt"
    trainer.save_checkpoint(ckpt)
    assert "CurriculumCallback" not in torch.load(ckpt, weights_only=False)["callbacks"]
    module = Tiny()
    with pytest.raises(ValueError, match=r"no_curriculum\.ckpt.*holds no CurriculumCallback state"):
        fit(CurriculumCallback({"mode": "constant", "lambda0": 0.1}), tmp_path / "b", max_epochs=2, n=2,
            ckpt_path=ckpt, module=module)
    assert module.seen == []  # failed before the first resumed step
