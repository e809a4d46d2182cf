"""Route trace: the experts every probe token chose, per (step, layer), kept in the run folder so
routing can be compared across checkpoints offline, and OLMoE's router saturation computed from it.

Written by ``callbacks.stability.RoutingStabilityCallback`` with ``route_trace: true`` at every probe
(rank 0 only; the probe batch is the same on every rank). Layout::

    <run>/route_trace/step_<step, 8 digits>.npz   one file per probe (written atomically)
        <layer>: int16 [N, K]   expert indices of the N real probe tokens (layer = moe0, moe1, ...;
                                K = the router's slots, −1 = empty), column 0 the token's first choice

A run resumed from a checkpoint writes the files of the steps it probes again (identical under exact
resume). ``python -m callbacks.route_trace <run>`` prints the saturation of every layer.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping

import numpy as np
import torch
from torch import Tensor

from rmoe.metrics import router_saturation

_FILE = re.compile(r"step_(\d+)\.npz")


def write_step(trace_dir: str, step: int, indices: Mapping[str, Tensor]) -> str:
    """Write ``<trace_dir>/step_<step>.npz`` with one int16 ``[N, K]`` array per layer."""
    os.makedirs(trace_dir, exist_ok=True)
    arrays = {}
    for name, idx in indices.items():
        a = idx.detach().cpu()
        if a.numel() and int(a.max()) > np.iinfo(np.int16).max:
            raise ValueError(f"route trace: layer {name} has expert index {int(a.max())} > int16")
        arrays[name] = a.numpy().astype(np.int16)
    path = os.path.join(trace_dir, f"step_{int(step):08d}.npz")
    tmp = path + ".tmp.npz"
    np.savez_compressed(tmp, **arrays)
    os.replace(tmp, path)
    return path


def load_route_trace(trace_dir: str) -> dict[str, dict[int, np.ndarray]]:
    """``{layer: {step: int16 [N, K]}}`` from every ``step_*.npz`` of ``trace_dir``."""
    out: dict[str, dict[int, np.ndarray]] = {}
    for fname in sorted(os.listdir(trace_dir)):
        m = _FILE.fullmatch(fname)
        if not m:
            continue
        with np.load(os.path.join(trace_dir, fname)) as z:
            for layer in z.files:
                out.setdefault(layer, {})[int(m[1])] = z[layer]
    return out


def top1(indices: np.ndarray) -> np.ndarray:
    """Each token's first choice (column 0; −1 for a token with no expert)."""
    return indices[:, 0] if indices.shape[1] else np.full(indices.shape[0], -1, dtype=indices.dtype)


def saturation(trace: str | Mapping[str, Mapping[int, np.ndarray]], reference_step: int | None = None
               ) -> dict[str, dict[int, float]]:
    """OLMoE's router saturation per layer and saved step: the share of probe tokens whose top-1
    expert equals their top-1 at ``reference_step`` (default: the last saved step, i.e. the final
    checkpoint's routing when the last step was probed). ``trace``: a trace folder or its
    :func:`load_route_trace` result."""
    if isinstance(trace, str):
        trace = load_route_trace(trace)
    return {layer: router_saturation({s: torch.from_numpy(top1(a).astype(np.int64)) for s, a in steps.items()},
                                     reference_step)
            for layer, steps in trace.items()}


def main(argv: list[str]) -> None:
    run = argv[0] if argv else "."
    trace_dir = run if os.path.basename(os.path.normpath(run)) == "route_trace" else os.path.join(run, "route_trace")
    for layer, per_step in saturation(trace_dir).items():
        print(layer + ": " + ", ".join(f"{s}: {v:.3f}" for s, v in per_step.items()))


if __name__ == "__main__":
    main(sys.argv[1:])
