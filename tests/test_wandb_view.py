"""The W&B routing view built in code, offline (tasks/run/wandb_view.py; README "Weights & Biases")."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from tasks.run import wandb_view

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_routing_keys() -> set[str]:
    """The ``routing/<layer>/<key>`` keys of the README's table "Routing stability: what is measured"."""
    lines = README.read_text().splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("| key `routing/<layer>/…`"))
    keys: set[str] = set()
    for ln in lines[start + 2:]:
        if not ln.startswith("|"):
            break
        keys |= set(re.findall(r"`([a-z0-9_]+)`", ln.split("|")[1]))
    return keys


def test_the_view_builds_offline_with_a_panel_per_routing_key():
    pytest.importorskip("wandb_workspaces", reason="the workspaces extra is not installed (make install installs it)")
    view = wandb_view.routing_workspace("my-team", "rmoe")
    assert (view.entity, view.project, view.name) == ("my-team", "rmoe", "rmoe routing")
    assert view.settings.x_axis == "trainer/global_step"
    panels = [p for s in view.sections for p in s.panels]
    assert all(p.x == "trainer/global_step" for p in panels)
    regexes = {p.metric_regex for p in panels if p.metric_regex}
    keys = readme_routing_keys()
    assert len(keys) == 20 and "load_cv" in keys and "domain_js" in keys
    # every key of the README's table, drawn for every layer, and nothing the table does not list
    assert regexes == {f"routing/.*/{k}" for k in keys}
    plain = {y for p in panels if not p.metric_regex for y in p.y}
    assert {"curriculum/lambda", "curriculum/phase", "val/score"} <= plain
    # W&B's own spec of the view (what .save() uploads) is built from it without a connection
    spec = view._to_model().model_dump(by_alias=True, exclude_none=True)
    sections = spec["spec"]["section"]["panelBankConfig"]["sections"]
    assert [s["name"] for s in sections] == [title for title, _ in wandb_view.SECTIONS]
    configs = [p["config"] for s in sections for p in s["panels"]]
    assert {"chartTitle": "routing/<layer>/load_cv", "xAxis": "trainer/global_step", "metrics": [],
            "metricRegex": "routing/.*/load_cv", "useMetricRegex": True} in configs
    assert any(c.get("metrics") == ["curriculum/lambda"] for c in configs)


def test_print_lists_the_panels(capsys):
    pytest.importorskip("wandb_workspaces", reason="the workspaces extra is not installed (make install installs it)")
    assert wandb_view.main(["--entity", "my-team", "--print"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "rmoe routing (my-team/rmoe), x-axis trainer/global_step"
    assert "    routing/<layer>/top1_flip_rate: routing/.*/top1_flip_rate" in out
    assert "    curriculum/lambda: curriculum/lambda" in out


def test_without_the_package_one_line_says_how_to_install_it(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb_workspaces", None)  # an absent package: its import fails
    monkeypatch.setitem(sys.modules, "wandb_workspaces.workspaces", None)
    monkeypatch.setitem(sys.modules, "wandb_workspaces.reports.v2", None)
    assert wandb_view.main(["--entity", "my-team", "--print"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: the W&B routing view needs the wandb-workspaces package")
    assert "pip install -e '.[workspaces]'" in err[0]
