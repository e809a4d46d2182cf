"""Curriculum schedules (SPEC §3)."""

import dataclasses
import math

import pytest

from rmoe import ConfigError, build_schedule
from rmoe.schedules import Constant, ExpDecay, LinearRamp, Phase, Phased, exp_decay, linear_ramp


def test_constant():
    f = build_schedule("constant", lambda0=0.01)
    assert f(0, 100) == (0.01, "constant") and f(1000, 100) == (0.01, "constant")


def test_linear_ramp_by_hand():
    f = build_schedule("linear_ramp", lambda_min=1e-3, lambda_max=1e-2)
    assert f(0, 100)[0] == pytest.approx(1e-3)
    assert f(50, 100)[0] == pytest.approx(5.5e-3)
    assert f(100, 100)[0] == pytest.approx(1e-2)
    assert f(250, 100)[0] == pytest.approx(1e-2)  # min(τ/T, 1)
    assert linear_ramp(25, 100, 1e-2, 1e-3) == pytest.approx(1e-2 - 0.25 * 9e-3)  # downward ramp


def test_exp_decay_by_hand():
    f = build_schedule("exp_decay", lambda_min=0.1, lambda_max=1.0, decay=0.5)
    assert f(0, 10)[0] == 0.5  # β applied before the first step: λ_max β^(τ+1)
    assert f(2, 10)[0] == 0.125
    assert f(10, 10)[0] == 0.1  # floor
    assert exp_decay(3, 0, 0.0, 2.0, 0.9) == pytest.approx(2.0 * 0.9**4)


def test_exp_decay_vision_defaults_reach_the_floor_at_step_21():
    # SPEC §3 vision: λ_max 1e-2, β 0.9, λ_min 1e-3: 1e-2 * 0.9^22 = 9.85e-4 < 1e-3 <= 1e-2 * 0.9^21
    f = build_schedule("exp_decay", lambda_min=1e-3, lambda_max=1e-2, decay=0.9)
    assert f(0, 5001)[0] == pytest.approx(9e-3)
    assert f(1, 5001)[0] == pytest.approx(8.1e-3)
    assert f(20, 5001)[0] == pytest.approx(1.0941898913151245e-3)
    assert f(21, 5001)[0] == pytest.approx(1e-3)
    assert f(22, 5001)[0] == pytest.approx(1e-3)


@pytest.mark.parametrize("mode,extra", [("linear_ramp", {}), ("exp_decay", {"decay": 0.9})])
def test_lambda_min_above_lambda_max_is_rejected(mode, extra):
    with pytest.raises(ConfigError, match=r"lambda_min=0\.01 > lambda_max=0\.001.*lambda_min <= lambda_max"):
        build_schedule(mode, lambda_min=1e-2, lambda_max=1e-3, **extra)


def test_phased_fractions_both_directions():
    phases = [
        {"name": "warmup", "end": 0.2, "start_value": 0.0, "end_value": 0.01},
        {"name": "hold", "end": 0.6, "value": 0.01},
        {"name": "anneal", "end": 1.0, "start_value": 0.01, "end_value": 0.002},
    ]
    f = build_schedule("phased", phases=phases)
    assert f(0, 100) == (0.0, "warmup")
    assert f(10, 100)[0] == pytest.approx(0.005) and f(10, 100)[1] == "warmup"
    assert f(20, 100) == (0.01, "hold")
    assert f(59, 100) == (0.01, "hold")
    lam, ph = f(80, 100)
    assert ph == "anneal" and lam == pytest.approx(0.01 - 0.5 * 0.008)
    assert f(100, 100) == (0.002, "anneal") and f(130, 100) == (0.002, "anneal")


def test_phased_absolute_steps():
    f = build_schedule("phased", units="steps", phases=[
        {"name": "a", "end": 10, "start_value": 1.0, "end_value": 0.0},
        {"name": "b", "end": 30, "start_value": 0.0, "end_value": 2.0},
    ])
    assert f(5, 1000) == (0.5, "a")
    assert f(20, 1000) == (1.0, "b")
    assert f(40, 1000) == (2.0, "b")


@pytest.mark.parametrize("kwargs, needle", [
    ({"mode": "phased", "phases": [{"name": "a", "end": 0.5, "value": 1}, {"name": "b", "end": 0.4, "value": 1}]},
     "phases[1].end=0.4"),
    ({"mode": "phased", "phases": [{"name": "a", "end": 1.5, "value": 1}]}, "phases[0].end=1.5"),
    ({"mode": "phased", "phases": []}, "phases=[]"),
    ({"mode": "phased", "phases": [{"name": "a", "end": 1.0, "value": -1}]}, "phases[0].value=-1"),
    ({"mode": "linear_ramp", "lambda_min": -1e-3, "lambda_max": 1e-2}, "lambda_min=-0.001"),
    ({"mode": "constant", "lambda0": math.nan}, "lambda0=nan"),
    ({"mode": "exp_decay", "lambda_min": 0, "lambda_max": 1, "decay": 1.5}, "decay=1.5"),
    ({"mode": "cosine"}, "mode='cosine'"),
    ({"mode": "constant", "lambda0": 1, "lambda_maxx": 2}, "lambda_maxx=2"),  # a typo, not another mode's key
])
def test_bad_schedules_fail_with_key_and_value(kwargs, needle):
    kwargs = dict(kwargs)
    mode = kwargs.pop("mode")
    with pytest.raises(ConfigError) as err:
        build_schedule(mode, **kwargs)
    assert needle in str(err.value) and "allowed" in str(err.value)


def test_other_modes_parameters_are_carried_but_not_read():
    # a protocol states its benchmark's lambda0 beside its ramp; switching the mode picks the right one
    params = {"lambda0": 0.5, "lambda_min": 1e-3, "lambda_max": 1e-2, "decay": 0.9}
    assert build_schedule("constant", **params)(7, 10)[0] == 0.5
    assert build_schedule("linear_ramp", **params)(5, 10)[0] == pytest.approx(1e-3 + 0.5 * 9e-3)
    assert build_schedule("exp_decay", **params)(0, 10)[0] == pytest.approx(9e-3)


def test_schedule_objects_know_their_phases():
    assert build_schedule("constant", lambda0=0.5) == Constant(0.5)
    assert Constant(0.5).phase_names == ("constant",) and Constant(0.5)(3, 10) == (0.5, "constant")
    ramp = build_schedule("linear_ramp", lambda_min=0.0, lambda_max=2.0)
    assert ramp == LinearRamp(0.0, 2.0) and ramp.phase_names == ("ramp",)
    assert ramp.value(1, 4) == (0.5, "ramp")  # 0 + 2 * 1/4
    decay = build_schedule("exp_decay", lambda_min=0.0, lambda_max=1.0, decay=0.5)
    assert decay == ExpDecay(0.0, 1.0, 0.5) and decay.phase_names == ("decay",)
    assert decay.value(1, 4) == (0.25, "decay")  # 1 * 0.5^2
    with pytest.raises(dataclasses.FrozenInstanceError):
        ramp.lambda_max = 3.0


def test_phased_object_names_and_values_by_hand():
    f = build_schedule("phased", units="steps", phases=[
        {"name": "off", "end": 2, "value": 0.0},
        {"name": "up", "end": 6, "start_value": 0.0, "end_value": 0.4},
        {"name": "down", "end": 8, "start_value": 0.4, "end_value": 0.2},
    ])
    assert isinstance(f, Phased) and f.units == "steps"
    assert f.phase_names == ("off", "up", "down")
    assert f.phases == (Phase("off", 2.0, 0.0, 0.0), Phase("up", 6.0, 0.0, 0.4), Phase("down", 8.0, 0.4, 0.2))
    assert [f.phase_index(n) for n in ("off", "up", "down", "other")] == [0, 1, 2, -1]
    # step 1: off; 4: up, (4-2)/4 of 0 -> 0.4 = 0.2; 7: down, 0.4 - 0.5 * 0.2 = 0.3; 9: after the end, hold 0.2
    got = [f(t, 1000) for t in (1, 4, 7, 9)]
    want = [(0.0, "off"), (0.2, "up"), (0.3, "down"), (0.2, "down")]
    assert [p for _, p in got] == [p for _, p in want]
    assert [v for v, _ in got] == pytest.approx([v for v, _ in want])
