"""PNG plots of routing history, written into a run folder (matplotlib, Agg backend)."""

from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402


def _save(fig, path: str) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def write_routing_plots(history: dict, out_dir: str) -> dict[str, str]:
    """Write every plot the history supports; returns ``{name: path}``.

    expert-load heatmap over steps per layer, λ (and phase) over steps, fusion weights π over steps,
    tokens-per-expert histogram (last logged step), probe fluctuation over steps, and the
    domain × expert routing matrix when validation ran over several domains.
    """
    os.makedirs(out_dir, exist_ok=True)
    paths: dict[str, str] = {}
    steps = history.get("step", [])
    for layer, loads in history.get("load", {}).items():
        if not loads:
            continue
        arr = np.asarray(loads, dtype=float)
        xs = steps[-len(loads):] if len(steps) >= len(loads) else list(range(len(loads)))
        half = ((xs[-1] - xs[0]) / (2 * (len(xs) - 1)) if len(xs) > 1 else 0) or 0.5  # columns centred on steps
        fig, ax = plt.subplots(figsize=(7, 3))
        im = ax.imshow(arr.T, aspect="auto", origin="lower", cmap="viridis", interpolation="nearest",
                       extent=(xs[0] - half, xs[-1] + half, -0.5, arr.shape[1] - 0.5))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set(xlabel="step", ylabel="expert", title=f"{layer}: share of tokens per expert")
        fig.colorbar(im, ax=ax)
        paths[f"load_heatmap_{layer}"] = _save(fig, os.path.join(out_dir, f"load_heatmap_{layer}.png"))
        fig, ax = plt.subplots(figsize=(5, 3))
        ax.bar(np.arange(arr.shape[1]), arr[-1])
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set(xlabel="expert", ylabel="share of tokens", title=f"{layer}: tokens per expert (step {steps[-1]})")
        paths[f"tokens_hist_{layer}"] = _save(fig, os.path.join(out_dir, f"tokens_hist_{layer}.png"))
    lam = [v for v in history.get("lambda", [])]
    if steps and lam and not all(np.isnan(lam)):
        fig, ax = plt.subplots(figsize=(6, 3))
        ax.plot(steps, lam, color="C0")
        phases = history.get("phase", [])
        prev = None
        for s, ph in zip(steps, phases):
            if ph is not None and ph != prev:
                ax.axvline(s, color="grey", lw=0.5, ls="--")
                ax.text(s, max(lam), str(ph), fontsize=7, rotation=90, va="top")
                prev = ph
        ax.set(xlabel="step", ylabel="λ", title="load-balancing weight λ")
        paths["lambda"] = _save(fig, os.path.join(out_dir, "lambda.png"))
    for layer, pis in history.get("pi", {}).items():
        if not pis:
            continue
        arr = np.asarray(pis, dtype=float)
        fig, ax = plt.subplots(figsize=(6, 3))
        xs = steps[-len(pis):] if len(steps) >= len(pis) else list(range(len(pis)))
        for e in range(arr.shape[1]):
            ax.plot(xs, arr[:, e], lw=1)
        ax.set(xlabel="step", ylabel="π_e", title=f"{layer}: Stateful Fusion weights")
        paths[f"fusion_pi_{layer}"] = _save(fig, os.path.join(out_dir, f"fusion_pi_{layer}.png"))
    for layer, rows in history.get("probe", {}).items():
        pts = [(s, f, j) for s, f, j in rows if f is not None]
        if not pts:
            continue
        s, f, j = zip(*pts)
        fig, ax = plt.subplots(figsize=(6, 3))
        ax.plot(s, f, label="top-1 flip rate")
        ax.plot(s, j, label="Jaccard churn")
        ax.set(xlabel="step", ylabel="fraction of probe tokens", title=f"{layer}: routing fluctuation")
        ax.legend()
        paths[f"fluctuation_{layer}"] = _save(fig, os.path.join(out_dir, f"fluctuation_{layer}.png"))
    for layer, loads in history.get("domain_loads", {}).items():
        arr = np.asarray(loads, dtype=float)
        arr = arr / np.clip(arr.sum(1, keepdims=True), 1, None)
        fig, ax = plt.subplots(figsize=(6, 3))
        im = ax.imshow(arr, aspect="auto", cmap="magma")
        ax.set(xlabel="expert", ylabel="validation set (domain split)", title=f"{layer}: domain × expert routing")
        fig.colorbar(im, ax=ax)
        paths[f"domain_expert_{layer}"] = _save(fig, os.path.join(out_dir, f"domain_expert_{layer}.png"))
    return paths
