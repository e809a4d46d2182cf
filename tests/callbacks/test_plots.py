"""The routing plots on constructed histories: inactive pool slots are drawn apart from dead experts,
λ is the schedule over the whole run with its phase names, domain rows are named with the test
domain marked, titles name method/variant/seed/layer, π is a heatmap."""

import numpy as np
import pytest

from callbacks.plots import (
    INACTIVE,
    PLOT_DPI,
    TEST_COLOR,
    close_figures,
    draw_routing_plots,
    lambda_curve,
    render_figures,
)
from rmoe.schedules import build_schedule

INFO = {"task": "RotatedDigits", "method": "rmoe", "variant": "rmoe_nofusion", "seed": 3}
PHASES = {"mode": "phased", "units": "fraction",
          "phases": [{"name": "warmup", "end": 0.25, "value": 0.0},
                     {"name": "balance", "end": 0.75, "start_value": 0.01, "end_value": 0.001},
                     {"name": "free", "end": 1.0, "value": 0.0001}]}


def _history(**extra):
    # 4 slots: slot 2 in the pool with no token (dead), slot 3 out of the pool (inactive)
    load = [[0.5, 0.5, 0.0, 0.0], [0.6, 0.4, 0.0, 0.0]]
    active = [[True, True, True, False], [True, True, True, False]]
    h = {"step": [50, 100], "lambda": [0.01, 0.005], "phase": ["balance", "balance"],
         "load": {"moe0": load}, "active": {"moe0": active}, "pi": {"moe0": [[0.5, 0.5, 0.0, 0.0]] * 2},
         "probe": {"moe0": [[50, None, None], [100, 0.25, 0.5]]}, "layers": {"moe0": "blocks.3.mlp.moe"},
         "domain_loads": {"moe0": [[10, 30, 0, 0], [20, 20, 0, 0], [5, 5, 0, 0], [1, 3, 0, 0]]},
         "domain_rows": [{"name": "0", "split": "in", "test": True}, {"name": "15", "split": "in", "test": False},
                         {"name": "0", "split": "out", "test": True}, {"name": "15", "split": "out", "test": False}]}
    h.update(extra)
    return h


@pytest.fixture
def figs():
    f = draw_routing_plots(_history(schedule={**PHASES, "total_steps": 120}), INFO)
    yield f
    close_figures(f)


def _pixel(fig, img, ax, x, y):
    """RGB of the rendered image at data point (x, y) of ``ax``."""
    px, py = ax.transData.transform((x, y))
    return img[int(round(img.shape[0] - py)), int(round(px)), :3].astype(int)


def test_every_plot_is_drawn_and_titled_with_method_variant_seed_and_layer(figs):
    assert set(figs) == {"load_heatmap_moe0", "tokens_hist_moe0", "lambda", "fusion_pi_moe0", "fluctuation_moe0",
                         "domain_expert_moe0"}
    for name, fig in figs.items():
        title = fig.axes[0].get_title()
        assert "rmoe_nofusion (rmoe)" in title and "RotatedDigits" in title and "seed 3" in title, name
        if name != "lambda":
            assert "moe0 (blocks.3.mlp.moe)" in title, name
    img = render_figures({"x": figs["load_heatmap_moe0"]})["x"]
    assert img.shape[:2] == (round(3.4 * PLOT_DPI), 7 * PLOT_DPI)


@pytest.mark.parametrize("name", ["load_heatmap_moe0", "fusion_pi_moe0"])
def test_an_inactive_slot_is_hatched_grey_and_a_dead_expert_is_the_colour_maps_zero(figs, name):
    fig = figs[name]
    ax = fig.axes[0]
    img = render_figures({name: fig})[name]
    cmap = ax.collections[0].get_cmap()
    zero = (np.asarray(cmap(0.0)[:3]) * 255).round().astype(int)
    assert np.abs(_pixel(fig, img, ax, 75, 2) - zero).max() <= 2  # dead (load) / π = 0: the colour map's 0
    # the inactive slot: only the hatch's greys (face, lines and their antialiased mix) over the whole cell
    lo, hi = sorted(round(255 * float(INACTIVE[k])) for k in ("facecolor", "edgecolor"))
    cell = [_pixel(fig, img, ax, x, y) for x in np.linspace(35, 110, 16) for y in np.linspace(2.7, 3.3, 5)]
    assert all(p[0] == p[1] == p[2] and lo - 2 <= p[0] <= hi + 2 for p in cell)
    assert {lo, hi} <= {int(p[0]) for p in cell}
    legends = [t.get_text() for lg in fig.legends for t in lg.get_texts()]
    assert legends == ["inactive pool slot (not a dead expert)"]


def test_tokens_histogram_marks_dead_and_inactive_slots(figs):
    ax = figs["tokens_hist_moe0"].axes[0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert sorted(labels) == ["dead (no token)", "inactive pool slot", "share of tokens"]
    assert "3 of 4 slots active" in ax.get_title()


def test_lambda_is_the_schedule_over_the_whole_run_with_its_phase_names(figs):
    ax = figs["lambda"].axes[0]
    curve, logged = ax.lines[0], ax.lines[-1]
    sched = build_schedule("phased", phases=PHASES["phases"], units="fraction")
    xs = curve.get_xdata()
    assert list(xs) == list(range(121))  # every step 0..T, though λ was logged at two steps only
    assert list(curve.get_ydata()) == [sched(int(t), 120)[0] for t in xs]
    assert [t.get_text() for t in ax.texts] == ["warmup", "balance", "free"]
    assert list(logged.get_xdata()) == [49, 99]  # a λ logged after update s was applied at τ = s - 1


def test_a_long_run_samples_the_curve_and_keeps_each_phase_change_exact():
    taus, lam, phases = lambda_curve({**PHASES, "total_steps": 100_001})
    assert len(taus) < 2100 and taus[0] == 0 and taus[-1] == 100_001
    sched = build_schedule("phased", phases=PHASES["phases"], units="fraction")
    for t, v, p in zip(taus, lam, phases):
        assert (v, p) == sched(int(t), 100_001)
    changes = [int(taus[i]) for i in range(1, len(taus)) if phases[i] != phases[i - 1]]
    assert changes == [25_001, 75_001]  # τ/T crosses 0.25 and 0.75 at these steps
    assert phases[list(taus).index(25_000)] == "warmup"


def test_without_a_schedule_the_logged_lambda_is_drawn():
    figs = draw_routing_plots({"step": [1, 2], "lambda": [0.1, 0.2], "load": {}}, INFO)
    try:
        ax = figs["lambda"].axes[0]
        assert [list(line.get_xdata()) for line in ax.lines] == [[0, 1]]
    finally:
        close_figures(figs)


def test_domain_rows_are_named_and_the_test_domain_is_marked(figs):
    ax = figs["domain_expert_moe0"].axes[0]
    ticks = ax.get_yticklabels()
    assert [t.get_text() for t in ticks] == ["0 in (test)", "15 in", "0 out (test)", "15 out"]
    assert [t.get_color() for t in ticks] == [TEST_COLOR, "black", TEST_COLOR, "black"]
    boxes = [p for p in ax.patches if p.get_edgecolor()[:3] != (0, 0, 0) and not p.get_fill()]
    assert sorted(p.get_y() + 0.5 for p in boxes) == [0, 2]  # a box around each test row


def test_unnamed_validation_sets_are_numbered():
    figs = draw_routing_plots({"domain_loads": {"moe0": [[1, 2], [2, 1]]}}, {})
    try:
        assert [t.get_text() for t in figs["domain_expert_moe0"].axes[0].get_yticklabels()] == ["set 0", "set 1"]
    finally:
        close_figures(figs)
