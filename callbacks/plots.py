"""Routing plots of a run: drawn from the routing-stability history (matplotlib, Agg backend),
written as PNGs (``PLOT_DPI``) and sent to every image-capable logger.

The history is :meth:`callbacks.stability.RoutingStabilityCallback.series` -- the same object a
finished run keeps as ``summary.json``'s ``series``, so ``python -m tasks.plots <run>`` redraws the
very plots the run wrote. Keys read here (all optional)::

    step        [s, ...]               optimizer steps of the training-stream records
    load        {layer: [[share_e]]}   share of tokens per expert slot, one row per step
    active      {layer: [[bool_e]]}    pool slots in use at those steps (DynMoE/RMoE grow/shrink it)
    pi          {layer: [[π_e]]}       Stateful Fusion weights at those steps
    probe       {layer: [[s, flip, churn]]}
    lambda, phase                      λ applied and its phase at those steps
    schedule    {mode, **params, total_steps}   the curriculum (rmoe.schedules.build_schedule)
    domain_loads {layer: [[tokens_e]]} one row per validation set (last validation pass)
    domain_rows [{name, split, test}]  what those rows are (DomainBed: domain name, in/out, test domain)
    layers      {layer: module path}

``info`` (``task``, ``method``, ``variant``, ``seed``) titles every plot.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.patches import Patch, Rectangle  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from PIL import Image

from rmoe.schedules import build_schedule

PLOT_DPI = 150
#: inactive pool slots: hatched light grey (a dead expert -- in the pool, no token -- is the colour map's 0)
INACTIVE = {"facecolor": "0.88", "hatch": "///", "edgecolor": "0.6"}
TEST_COLOR = "crimson"
_MAX_CURVE_POINTS = 2000


# --- titles --------------------------------------------------------------------------------------
def run_label(info: Mapping[str, Any] | None) -> str:
    """``"rmoe · RotatedDigits · seed 0"``; the method in brackets when the variant is an ablation
    (``"rmoe_nofusion (rmoe) · ..."``)."""
    info = info or {}
    variant, method = info.get("variant") or info.get("method"), info.get("method")
    parts = []
    if variant:
        parts.append(f"{variant} ({method})" if method and method != variant else str(variant))
    if info.get("task"):
        parts.append(str(info["task"]))
    if info.get("seed") is not None:
        parts.append(f"seed {info['seed']}")
    return " · ".join(parts)


def plot_title(info: Mapping[str, Any] | None, what: str, layer: str | None = None,
               layers: Mapping[str, str] | None = None) -> str:
    """Two lines: the run (method/variant, task, seed) and the layer; then what the plot shows."""
    head = run_label(info)
    if layer:
        path = (layers or {}).get(layer)
        head = " · ".join(p for p in (head, f"{layer} ({path})" if path else layer) if p)
    return f"{head}\n{what}" if head else what


# --- helpers -------------------------------------------------------------------------------------
def _xs(steps: list, n: int) -> list:
    return list(steps[-n:]) if len(steps) >= n else list(range(n))


def _active(history: Mapping[str, Any], layer: str, n: int, width: int) -> np.ndarray:
    """``[n, width]`` bool: the pool slots in use for the last ``n`` records (all True when unknown)."""
    rows = (history.get("active") or {}).get(layer) or []
    out = np.ones((n, width), dtype=bool)
    m = min(n, len(rows))
    if m:
        arr = np.asarray(rows[-m:], dtype=bool)
        if arr.shape[1] == width:
            out[n - m:] = arr
    return out


def _edges(xs: list, end: float | None = None) -> np.ndarray:
    """Column edges of a heatmap over (possibly irregular) steps: midway between records, the
    first and last half a gap outside (not below 0, not past the run's last step ``end``)."""
    x = np.asarray(xs, dtype=float)
    if len(x) == 1:
        return np.array([x[0] - 0.5, x[0] + 0.5])
    mid = (x[1:] + x[:-1]) / 2
    first, last = x[0] - (mid[0] - x[0]), x[-1] + (x[-1] - mid[-1])
    if end:
        last = min(last, max(float(end), x[-1] + 0.5))
    return np.r_[max(first, min(0.0, x[0])), mid, last]


def _inactive_legend(fig: Figure) -> None:
    fig.legend(handles=[Patch(label="inactive pool slot (not a dead expert)", **INACTIVE)], loc="lower left",
               fontsize=7, frameon=False)


def _heatmap(ax, values: np.ndarray, active: np.ndarray, xs: list, cmap: str, label: str, fig: Figure,
             end: float | None = None) -> bool:
    """``values[step, expert]`` as columns over the steps; inactive slots (masked) hatched grey.
    Returns whether any slot was inactive (the caller adds the legend)."""
    xe, ye = _edges(xs, end), np.arange(values.shape[1] + 1) - 0.5
    cm = plt.get_cmap(cmap).with_extremes(bad=(0, 0, 0, 0))
    ax.add_patch(Rectangle((xe[0], ye[0]), xe[-1] - xe[0], ye[-1] - ye[0], zorder=0, lw=0, **INACTIVE))
    mesh = ax.pcolormesh(xe, ye, np.ma.masked_array(values.T, mask=~active.T), cmap=cm, vmin=0.0, zorder=1)
    ax.set_xlim(xe[0], xe[-1])
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    fig.colorbar(mesh, ax=ax, label=label)
    return not active.all()


def lambda_curve(schedule: Mapping[str, Any], steps: Iterable[int] = ()) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """``(τ, λ(τ), phase(τ))`` of the recorded schedule over the whole run ``0 <= τ <= T``
    (every step, or ``_MAX_CURVE_POINTS`` of them plus each phase change). Without ``total_steps``
    the curve spans the logged ``steps``."""
    params = {k: v for k, v in schedule.items() if k not in ("mode", "total_steps")}
    sched = build_schedule(str(schedule["mode"]), **params)
    steps = list(steps)
    total = int(schedule.get("total_steps") or 0)
    end = total or (max(steps) if steps else 1)
    if end + 1 <= _MAX_CURVE_POINTS:
        taus = np.arange(end + 1)
    else:
        taus = np.unique(np.linspace(0, end, _MAX_CURVE_POINTS).round().astype(int))
        ph = [sched(int(t), total)[1] for t in taus]
        # refine every phase change to the exact step (bisection between two samples)
        extra = []
        for i in range(1, len(taus)):
            if ph[i] != ph[i - 1]:
                lo, hi = int(taus[i - 1]), int(taus[i])
                while hi - lo > 1:
                    mid = (lo + hi) // 2
                    lo, hi = (mid, hi) if sched(mid, total)[1] == ph[i - 1] else (lo, mid)
                extra += [lo, hi]
        taus = np.unique(np.r_[taus, extra]).astype(int)
    vals = [sched(int(t), total) for t in taus]
    return taus, np.asarray([v[0] for v in vals], dtype=float), [v[1] for v in vals]


def _lambda_figure(history: Mapping[str, Any], info: Mapping[str, Any] | None) -> Figure | None:
    steps = list(history.get("step") or [])
    logged = [np.nan if v is None else float(v) for v in history.get("lambda") or []]
    schedule = history.get("schedule")
    if not schedule and not (steps and logged and not all(np.isnan(logged))):
        return None
    fig, ax = plt.subplots(figsize=(7, 3.2))
    what = "load-balancing weight λ"
    if schedule:
        taus, lam, phases = lambda_curve(schedule, steps)
        ax.plot(taus, lam, color="C0", lw=1.5, label=f"schedule ({schedule['mode']})", zorder=3)
        # phase spans, named
        start, k = 0, 0
        for i in range(1, len(taus) + 1):
            if i == len(taus) or phases[i] != phases[start]:
                a, b = taus[start], taus[i] if i < len(taus) else taus[-1]
                ax.axvspan(a, b, color=("C1", "C2", "C4", "C6")[k % 4], alpha=0.12, lw=0)
                k += 1
                ax.text((a + b) / 2, 1.0, phases[start], transform=ax.get_xaxis_transform(), ha="center",
                        va="bottom", fontsize=8)
                if start > 0:
                    ax.axvline(a, color="grey", lw=0.7, ls="--")
                start = i
        what += f" over the run (T = {schedule.get('total_steps') or 'unknown'} steps), phases named"
        lo, hi = np.nanmin(lam), np.nanmax(lam)
    else:
        lo = hi = np.nan
    pts = [(s - 1, v) for s, v in zip(steps, logged) if not np.isnan(v)]
    if pts:
        # a λ logged at step s (after s updates) was applied in update s: τ = s - 1
        x, y = zip(*pts)
        ax.plot(x, y, "o", ms=3.5, color="black", label="applied (logged)", zorder=4)
        lo, hi = np.nanmin([lo, *y]), np.nanmax([hi, *y])
    if lo > 0 and hi / lo >= 20:
        ax.set_yscale("log")
    ax.set(xlabel="optimizer step τ", ylabel="λ")
    ax.set_title(plot_title(info, what), fontsize=9, pad=14)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    return fig


def _domain_labels(history: Mapping[str, Any], n: int) -> tuple[list[str], list[bool]]:
    rows = history.get("domain_rows") or []
    if len(rows) != n:
        return [f"set {i}" for i in range(n)], [False] * n
    labels = [" ".join(str(r[k]) for k in ("name", "split") if r.get(k) not in (None, "")) for r in rows]
    test = [bool(r.get("test")) for r in rows]
    return [f"{lab} (test)" if t else lab for lab, t in zip(labels, test)], test


# --- the plots -----------------------------------------------------------------------------------
def draw_routing_plots(history: Mapping[str, Any], info: Mapping[str, Any] | None = None) -> dict[str, Figure]:
    """Every plot the history supports, ``{name: figure}`` (names are the PNG file stems):

    ``load_heatmap_<layer>`` share of tokens per expert slot over steps; ``tokens_hist_<layer>`` the
    last record's shares; ``fusion_pi_<layer>`` π over steps (heatmap); ``fluctuation_<layer>`` probe
    top-1 flip rate and Jaccard churn; ``domain_expert_<layer>`` validation set × expert shares of
    the last validation; ``lambda`` the schedule over the run with its phases and the applied λ.
    Inactive pool slots are hatched grey; a dead expert (in the pool, no token) is the colour map's 0.
    """
    figs: dict[str, Figure] = {}
    steps = list(history.get("step") or [])
    layers = history.get("layers") or {}
    end = (history.get("schedule") or {}).get("total_steps")
    for layer, loads in (history.get("load") or {}).items():
        if not loads:
            continue
        arr = np.asarray(loads, dtype=float)
        xs = _xs(steps, len(arr))
        active = _active(history, layer, len(arr), arr.shape[1])
        fig, ax = plt.subplots(figsize=(7, 3.4))
        hatched = _heatmap(ax, arr, active, xs, "viridis", "share of tokens", fig, end)
        ax.set(xlabel="step", ylabel="expert slot")
        ax.set_title(plot_title(info, "share of tokens per expert (dark = dead: in the pool, no token)", layer,
                                layers), fontsize=9)
        fig.tight_layout(rect=(0, 0.05 if hatched else 0, 1, 1))
        if hatched:
            _inactive_legend(fig)
        figs[f"load_heatmap_{layer}"] = fig

        fig, ax = plt.subplots(figsize=(6, 3.2))
        last, act = arr[-1], active[-1]
        e = np.arange(arr.shape[1])
        handles = []
        for i in e[~act]:
            ax.axvspan(i - 0.4, i + 0.4, zorder=0, lw=0, **INACTIVE)
        if (~act).any():
            handles.append(Patch(label="inactive pool slot", **INACTIVE))
        ax.bar(e[act], last[act], color="C0", label="share of tokens")
        dead = act & (last <= 0)
        if dead.any():
            ax.plot(e[dead], np.zeros(dead.sum()), "x", color="red", ms=8, mew=2, label="dead (no token)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlim(-0.6, arr.shape[1] - 0.4)
        ax.set(xlabel="expert slot", ylabel="share of tokens")
        ax.set_title(plot_title(info, f"tokens per expert at step {xs[-1]} "
                                      f"({int(act.sum())} of {len(act)} slots active)", layer, layers), fontsize=9)
        h, _ = ax.get_legend_handles_labels()
        ax.legend(handles=h + handles, fontsize=7, loc="best")
        fig.tight_layout()
        figs[f"tokens_hist_{layer}"] = fig
    fig = _lambda_figure(history, info)
    if fig is not None:
        figs["lambda"] = fig
    for layer, pis in (history.get("pi") or {}).items():
        if not pis:
            continue
        arr = np.asarray(pis, dtype=float)
        xs = _xs(steps, len(arr))
        fig, ax = plt.subplots(figsize=(7, 3.4))
        hatched = _heatmap(ax, arr, _active(history, layer, len(arr), arr.shape[1]), xs, "cividis", "π_e", fig,
                           end)
        ax.set(xlabel="step", ylabel="expert slot")
        ax.set_title(plot_title(info, "Stateful Fusion weights π_e over steps", layer, layers), fontsize=9)
        fig.tight_layout(rect=(0, 0.05 if hatched else 0, 1, 1))
        if hatched:
            _inactive_legend(fig)
        figs[f"fusion_pi_{layer}"] = fig
    for layer, rows in (history.get("probe") or {}).items():
        pts = [(s, f, j) for s, f, j in rows if f is not None]
        if not pts:
            continue
        s, f, j = zip(*pts)
        fig, ax = plt.subplots(figsize=(6, 3.2))
        ax.plot(s, f, "o-", ms=3, label="top-1 flip rate")
        ax.plot(s, j, "s--", ms=3, label="Jaccard churn (1 − mean Jaccard)")
        ax.set_ylim(0, max(1.0, *f, *j) * 1.02)
        ax.set(xlabel="step", ylabel="fraction of probe tokens")
        ax.set_title(plot_title(info, "routing fluctuation on the fixed probe batch since the previous probe",
                                layer, layers), fontsize=9)
        ax.legend(fontsize=7)
        fig.tight_layout()
        figs[f"fluctuation_{layer}"] = fig
    for layer, loads in (history.get("domain_loads") or {}).items():
        arr = np.asarray(loads, dtype=float)
        if arr.ndim != 2 or not len(arr):
            continue
        arr = arr / np.clip(arr.sum(1, keepdims=True), 1, None)
        active = _active(history, layer, 1, arr.shape[1])[0]
        labels, test = _domain_labels(history, len(arr))
        fig, ax = plt.subplots(figsize=(7, 1.2 + 0.28 * len(arr)))
        extent = (-0.5, arr.shape[1] - 0.5, len(arr) - 0.5, -0.5)
        cm = plt.get_cmap("magma").with_extremes(bad=(0, 0, 0, 0))
        ax.add_patch(Rectangle((-0.5, -0.5), arr.shape[1], len(arr), zorder=0, lw=0, **INACTIVE))
        im = ax.imshow(np.ma.masked_array(arr, mask=np.broadcast_to(~active, arr.shape)), aspect="auto", cmap=cm,
                       interpolation="nearest", extent=extent, vmin=0.0, zorder=1)
        ax.set_yticks(range(len(arr)), labels, fontsize=7)
        for tick, t in zip(ax.get_yticklabels(), test):
            if t:
                tick.set_color(TEST_COLOR)
                tick.set_fontweight("bold")
        for i, t in enumerate(test):
            if t:
                ax.add_patch(Rectangle((-0.5, i - 0.5), arr.shape[1], 1, fill=False, ec=TEST_COLOR, lw=1.5,
                                       zorder=2))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set(xlabel="expert slot", ylabel="validation set")
        what = "share of each validation set's tokens per expert (last validation)"
        if any(test):
            what += "; test domain in red"
        ax.set_title(plot_title(info, what, layer, layers), fontsize=9)
        fig.colorbar(im, ax=ax, label="share of tokens")
        hatched = not active.all()
        fig.tight_layout(rect=(0, 0.2 / (1.2 + 0.28 * len(arr)) if hatched else 0, 1, 1))
        if hatched:
            _inactive_legend(fig)
        figs[f"domain_expert_{layer}"] = fig
    return figs


def render_figures(figs: Mapping[str, Figure], dpi: int = PLOT_DPI) -> dict[str, np.ndarray]:
    """Each figure drawn once at ``dpi``: ``{name: uint8 [H, W, 4] RGBA}`` (the PNG's pixels and the
    image the loggers get)."""
    out = {}
    for name, fig in figs.items():
        fig.set_dpi(dpi)
        fig.canvas.draw()
        out[name] = np.asarray(fig.canvas.buffer_rgba()).copy()
    return out


def save_images(images: Mapping[str, np.ndarray], out_dir: str) -> dict[str, str]:
    """``<out_dir>/<name>.png`` for each rendered image (written to a temporary name, then renamed:
    a reader never sees half a PNG); returns ``{name: path}``."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {}
    for name, img in images.items():
        paths[name] = os.path.join(out_dir, f"{name}.png")
        tmp = os.path.join(out_dir, f".{name}.png.tmp")
        Image.fromarray(img, "RGBA").save(tmp, format="PNG", dpi=(PLOT_DPI, PLOT_DPI))
        os.replace(tmp, paths[name])
    return paths


def close_figures(figs: Mapping[str, Figure]) -> None:
    for fig in figs.values():
        plt.close(fig)


def send_to_loggers(loggers: Iterable[Any], images: Mapping[str, np.ndarray], paths: Mapping[str, str],
                    step: int) -> list[str]:
    """Each plot to every image-capable logger, as ``plots/<name>`` at ``step``: a logger with
    ``log_image`` (W&B) gets the PNG file; one whose ``experiment`` has ``add_figure``/``add_image``
    (TensorBoard's SummaryWriter) gets the rendered pixels through ``add_image`` -- what its
    ``add_figure`` does (draw the figure, add the RGB image), without drawing every figure a second
    time. Returns the class names of the loggers that got them."""
    got = []
    for lg in loggers:
        if callable(getattr(lg, "log_image", None)):
            for name in images:
                lg.log_image(key=f"plots/{name}", images=[paths[name]], step=step)
            got.append(type(lg).__name__)
            continue
        if type(lg).__name__ == "CSVLogger":  # no images (and its `experiment` is a CSV writer)
            continue
        exp = getattr(lg, "experiment", None)
        if callable(getattr(exp, "add_figure", None)) and callable(getattr(exp, "add_image", None)):
            for name, img in images.items():
                exp.add_image(f"plots/{name}", img[..., :3], global_step=step, dataformats="HWC")
            if callable(getattr(exp, "flush", None)):
                exp.flush()  # a killed run keeps the figures of its last validation
            got.append(type(lg).__name__)
    return got


def write_routing_plots(history: Mapping[str, Any], out_dir: str, info: Mapping[str, Any] | None = None,
                        dpi: int = PLOT_DPI) -> dict[str, str]:
    """Draw every plot the history supports and write it to ``<out_dir>/<name>.png``; ``{name: path}``."""
    figs = draw_routing_plots(history, info)
    try:
        return save_images(render_figures(figs, dpi), out_dir)
    finally:
        close_figures(figs)
