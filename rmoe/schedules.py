"""Curriculum schedules for the load-balancing weight λ (RMoE mechanism 1, SPEC §3).

The pure functions :func:`constant`, :func:`linear_ramp`, :func:`exp_decay` and :func:`phased` give
λ for ``(step, total_steps)``; :func:`build_schedule` validates a ``curriculum`` mapping and returns
a small frozen :class:`Schedule` object that knows its phase names and computes ``(λ, phase_name)``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .config import ConfigError

SCHEDULES = ("constant", "linear_ramp", "exp_decay", "phased")


def _check_lambda(key: str, value: Any) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
        raise ConfigError(f"invalid curriculum: {key}={value!r}; allowed: a finite number >= 0")
    return float(value)


def _check_order(p: Mapping[str, Any]) -> tuple[float, float]:
    """``λ_min <= λ_max`` (a phased schedule states a downward move explicitly)."""
    lo, hi = _check_lambda("lambda_min", p["lambda_min"]), _check_lambda("lambda_max", p["lambda_max"])
    if lo > hi:
        raise ConfigError(f"invalid curriculum: lambda_min={lo!r} > lambda_max={hi!r}; allowed: "
                          "lambda_min <= lambda_max (for lambda moving down use mode=phased)")
    return lo, hi


def constant(step: int, total_steps: int, lambda0: float) -> float:
    """``λ = λ0``."""
    return lambda0


def linear_ramp(step: int, total_steps: int, lambda_min: float, lambda_max: float) -> float:
    """``λ = λ_min + (λ_max − λ_min) * min(τ/T, 1)``."""
    frac = min(step / total_steps, 1.0) if total_steps > 0 else 1.0
    return lambda_min + (lambda_max - lambda_min) * frac


def exp_decay(step: int, total_steps: int, lambda_min: float, lambda_max: float, decay: float) -> float:
    """``λ = max(λ_min, λ_max * decay^(τ+1))`` (the released code multiplies by the decay before the first step)."""
    return max(lambda_min, lambda_max * decay ** (step + 1))


@dataclass(frozen=True)
class Phase:
    """A phase ends at ``end`` (fraction of T, or step) and moves λ linearly ``start -> stop``."""

    name: str
    end: float
    start_value: float
    end_value: float


def parse_phases(phases: Sequence[Mapping[str, Any]], units: str = "fraction") -> list[Phase]:
    """Validate a list of ``{name, end, value}`` or ``{name, end, start_value, end_value}``.

    Phase ``i`` starts where phase ``i-1`` ends (the first at 0). Ends strictly increase; with
    ``units == "fraction"`` they lie in (0, 1]; with ``"steps"`` they are positive integers.
    """
    if units not in ("fraction", "steps"):
        raise ConfigError(f"invalid curriculum: units={units!r}; allowed: fraction|steps")
    if not phases:
        raise ConfigError("invalid curriculum: phases=[]; allowed: a non-empty list of phases")
    out: list[Phase] = []
    prev_end = 0.0
    for i, p in enumerate(phases):
        key = f"curriculum.phases[{i}]"
        if not isinstance(p, Mapping) or "end" not in p or "name" not in p:
            raise ConfigError(f"invalid curriculum: {key}={p!r}; allowed: a mapping with name, end and "
                              "value or start_value/end_value")
        unknown = set(p) - {"name", "end", "value", "start_value", "end_value"}
        if unknown:
            raise ConfigError(f"invalid curriculum: {key}.{sorted(unknown)[0]}; allowed keys: "
                              "name, end, value, start_value, end_value")
        end = p["end"]
        if not isinstance(end, (int, float)) or isinstance(end, bool) or not math.isfinite(end):
            raise ConfigError(f"invalid curriculum: {key}.end={end!r}; allowed: a number")
        if units == "fraction" and not (0 < end <= 1):
            raise ConfigError(f"invalid curriculum: {key}.end={end!r}; allowed: a fraction in (0, 1]")
        if end <= prev_end:
            raise ConfigError(f"invalid curriculum: {key}.end={end!r}; allowed: > the previous phase's end "
                              f"({prev_end}) — phase boundaries must be in increasing order")
        if "value" in p:
            if "start_value" in p or "end_value" in p:
                raise ConfigError(f"invalid curriculum: {key} has both value and start_value/end_value; "
                                  "allowed: one of them")
            a = b = _check_lambda(f"{key}.value", p["value"])
        else:
            if "start_value" not in p or "end_value" not in p:
                raise ConfigError(f"invalid curriculum: {key}={dict(p)!r}; allowed: value, or both "
                                  "start_value and end_value")
            a = _check_lambda(f"{key}.start_value", p["start_value"])
            b = _check_lambda(f"{key}.end_value", p["end_value"])
        out.append(Phase(str(p["name"]), float(end), a, b))
        prev_end = float(end)
    return out


def phased(step: int, total_steps: int, phases: Sequence[Phase], units: str = "fraction") -> tuple[float, str]:
    """Piecewise-linear λ over named phases; after the last end, hold its end value."""
    pos = (step / total_steps if total_steps > 0 else 1.0) if units == "fraction" else float(step)
    start = 0.0
    for ph in phases:
        if pos < ph.end:
            frac = (pos - start) / (ph.end - start)
            return ph.start_value + (ph.end_value - ph.start_value) * frac, ph.name
        start = ph.end
    last = phases[-1]
    return last.end_value, last.name


class Schedule:
    """A λ schedule: ``schedule(τ, T) -> (λ, phase_name)``; ``phase_names`` lists its phases in
    order (``phase_index`` of a name is its position there)."""

    phase_names: tuple[str, ...] = ()

    def value(self, step: int, total_steps: int) -> tuple[float, str]:
        raise NotImplementedError

    def __call__(self, step: int, total_steps: int) -> tuple[float, str]:
        return self.value(step, total_steps)

    def phase_index(self, phase: str) -> int:
        """Position of ``phase`` in :attr:`phase_names` (−1 for a name the schedule does not have)."""
        return self.phase_names.index(phase) if phase in self.phase_names else -1


@dataclass(frozen=True)
class Constant(Schedule):
    """``λ = λ0``; one phase, ``constant``."""

    lambda0: float
    phase_names = ("constant",)

    def value(self, step: int, total_steps: int) -> tuple[float, str]:
        return constant(step, total_steps, self.lambda0), "constant"


@dataclass(frozen=True)
class LinearRamp(Schedule):
    """``λ = λ_min + (λ_max − λ_min) * min(τ/T, 1)``; one phase, ``ramp``."""

    lambda_min: float
    lambda_max: float
    phase_names = ("ramp",)

    def value(self, step: int, total_steps: int) -> tuple[float, str]:
        return linear_ramp(step, total_steps, self.lambda_min, self.lambda_max), "ramp"


@dataclass(frozen=True)
class ExpDecay(Schedule):
    """``λ = max(λ_min, λ_max * decay^(τ+1))``; one phase, ``decay``."""

    lambda_min: float
    lambda_max: float
    decay: float
    phase_names = ("decay",)

    def value(self, step: int, total_steps: int) -> tuple[float, str]:
        return exp_decay(step, total_steps, self.lambda_min, self.lambda_max, self.decay), "decay"


@dataclass(frozen=True)
class Phased(Schedule):
    """Piecewise-linear λ over named :class:`Phase` s (see :func:`phased`); ``units``:
    ``fraction`` (phase ends are fractions of T) or ``steps``."""

    phases: tuple[Phase, ...]
    units: str = "fraction"

    @property
    def phase_names(self) -> tuple[str, ...]:  # type: ignore[override]
        return tuple(p.name for p in self.phases)

    def value(self, step: int, total_steps: int) -> tuple[float, str]:
        return phased(step, total_steps, self.phases, self.units)


PARAMS = ("lambda0", "lambda_min", "lambda_max", "decay", "phases", "units")
MODE_PARAMS = {"constant": ("lambda0",), "linear_ramp": ("lambda_min", "lambda_max"),
               "exp_decay": ("lambda_min", "lambda_max", "decay"), "phased": ("phases", "units")}
#: the previous release's names, read with a warning for one release: old -> new
RENAMED = {"beta": "decay"}


def renamed_params(params: dict[str, Any]) -> dict[str, Any]:
    """``params`` with each previous release's name (:data:`RENAMED`) moved to its new one, with a warning."""
    out = dict(params)
    for old, new in RENAMED.items():
        if old in out:
            value = out.pop(old)
            warnings.warn(f"curriculum.{old} is deprecated: use curriculum.{new} (the old key's value {value!r} is "
                          "used); the old key is read until the next release", FutureWarning, stacklevel=3)
            out.setdefault(new, value)
    return out


def build_schedule(mode: str, **params: Any) -> Schedule:
    """Validate parameters and return the mode's :class:`Schedule` object.

    constant: ``lambda0``; linear_ramp: ``lambda_min, lambda_max``; exp_decay:
    ``lambda_min, lambda_max, decay`` (0 < decay <= 1; ``beta``, its previous name, is read with a
    warning); phased: ``phases, units``. Parameters of the
    other modes may be present and are not read (a protocol states its benchmark's ``lambda0``
    beside its ramp, for the curriculum-off ablation); any other key is an error.
    """
    params = renamed_params(params)
    unknown = sorted(set(params) - set(PARAMS))
    if unknown:
        k = unknown[0]
        raise ConfigError(f"invalid curriculum: {k}={params[k]!r} is not a curriculum parameter; "
                          f"allowed: mode, {', '.join(PARAMS)}")
    if mode not in MODE_PARAMS:
        raise ConfigError(f"invalid curriculum: mode={mode!r}; allowed: {'|'.join(SCHEDULES)}")
    missing = [n for n in MODE_PARAMS[mode] if n not in params and n != "units"]
    if missing:
        raise ConfigError(f"invalid curriculum: {missing[0]} missing for mode {mode!r}")

    if mode == "constant":
        return Constant(_check_lambda("lambda0", params["lambda0"]))
    if mode == "linear_ramp":
        return LinearRamp(*_check_order(params))
    if mode == "exp_decay":
        lo, hi = _check_order(params)
        decay = params["decay"]
        if not isinstance(decay, (int, float)) or not (0 < decay <= 1):
            raise ConfigError(f"invalid curriculum: decay={decay!r}; allowed: a number in (0, 1]")
        return ExpDecay(lo, hi, float(decay))
    units = params.get("units", "fraction")
    return Phased(tuple(parse_phases(params["phases"], units)), units)
