"""The routing panels as a W&B workspace view, built in code (``wandb-workspaces``, W&B's workspace API).

``python -m tasks.run.wandb_view --entity <team> --project rmoe`` saves a new view named ``rmoe routing`` in the
project's workspace and prints its URL (it needs the API key ``wandb login`` stores); ``--print`` lists the
sections and panels instead, offline. The view, :func:`routing_workspace`:

* x-axis ``trainer/global_step`` (what Lightning's W&B logger steps every metric by: the updates completed);
* one section per group of :data:`SECTIONS`; a panel per ``routing/<layer>/<key>`` key draws every MoE layer
  of every run (``metric_regex`` ``routing/.*/<key>``: ``moe0``, ``moe1``, ... whatever the model has), the
  other panels one metric each (``curriculum/lambda``, ``val/score``, ...).

``wandb-workspaces`` is the ``workspaces`` extra (``pip install -e '.[workspaces]'``; ``make install`` installs
it); it is imported only here, when a view is built, and its absence is one line saying how to install it.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

VIEW_NAME = "rmoe routing"
X_AXIS = "trainer/global_step"
INSTALL_HINT = ("the W&B routing view needs the wandb-workspaces package (W&B's workspace API): "
                "pip install -e '.[workspaces]' (make install installs it)")

#: (section title, panel keys): a ``routing/`` key is a per-layer key (every layer drawn), the others are metrics
SECTIONS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("routing: load balance", ("routing/load_cv", "routing/max_vio", "routing/load_entropy",
                               "routing/dead_experts", "routing/active_experts", "routing/experts_per_token",
                               "routing/no_expert_share", "routing/dropped_rate")),
    ("routing: router", ("routing/router_entropy", "routing/router_confidence", "routing/aux_loss",
                         "routing/z_loss", "routing/fusion_entropy")),
    ("routing: stability (probe batch)", ("routing/top1_flip_rate", "routing/jaccard_churn",
                                          "routing/last_fluctuation_step", "routing/fusion_drift")),
    ("routing: validation", ("routing/val_load_cv", "routing/val_dead_experts", "routing/domain_js")),
    ("curriculum", ("curriculum/lambda", "curriculum/phase")),
    ("scores", ("val/score", "val/score_best", "train/loss", "train/aux_loss")),
)


def _api() -> tuple[Any, Any]:
    """``(wandb_workspaces.workspaces, wandb_workspaces.reports.v2)``; ImportError with :data:`INSTALL_HINT`."""
    try:
        import wandb_workspaces.reports.v2 as wr
        import wandb_workspaces.workspaces as ws
    except ImportError as e:
        raise ImportError(f"{INSTALL_HINT} ({e})") from e
    return ws, wr


def panel_spec(key: str) -> dict[str, Any]:
    """What a panel of ``key`` draws: ``{"title", "metric_regex"}`` for a per-layer ``routing/<key>``,
    ``{"title", "y"}`` for a plain metric."""
    if key.startswith("routing/"):
        name = key.removeprefix("routing/")
        return {"title": f"routing/<layer>/{name}", "metric_regex": f"routing/.*/{name}"}
    return {"title": key, "y": [key]}


def routing_workspace(entity: str, project: str, name: str = VIEW_NAME) -> Any:
    """The view as a ``wandb_workspaces.workspaces.Workspace`` (nothing sent to W&B: ``.save()`` does that)."""
    ws, wr = _api()
    sections = [ws.Section(name=title, is_open=True,
                           panels=[wr.LinePlot(x=X_AXIS, **panel_spec(k)) for k in keys])
                for title, keys in SECTIONS]
    return ws.Workspace(name=name, entity=entity, project=project, sections=sections,
                        settings=ws.WorkspaceSettings(x_axis=X_AXIS))


def describe(workspace: Any) -> list[str]:
    """The view in plain lines: its name and x-axis, then per section its panels (regex or metrics)."""
    lines = [f"{workspace.name} ({workspace.entity}/{workspace.project}), x-axis {workspace.settings.x_axis}"]
    for s in workspace.sections:
        lines.append(f"  {s.name}")
        lines += [f"    {p.title}: {p.metric_regex or ', '.join(p.y)}" for p in s.panels]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tasks.run.wandb_view", description=__doc__.split("\n\n")[0])
    parser.add_argument("--entity", required=True, help="the W&B team or user (logger.wandb.entity)")
    parser.add_argument("--project", default="rmoe", help="the W&B project (logger.wandb.project; default rmoe)")
    parser.add_argument("--name", default=VIEW_NAME, help=f"the view's name (default {VIEW_NAME!r})")
    parser.add_argument("--print", action="store_true", help="list the view's panels instead of saving it")
    args = parser.parse_args(argv)
    try:
        workspace = routing_workspace(args.entity, args.project, args.name)
    except ImportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.print:
        print("\n".join(describe(workspace)))
        return 0
    workspace.save_as_new_view()
    print(f"saved the view {args.name!r}: {workspace.url}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
