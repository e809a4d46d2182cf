"""The end of ``rmoe-train -m``: one line per job (its swept overrides, status, ``optimized_metric``, folder).

A Hydra callback (``hydra.callbacks.multirun_summary`` in ``conf/train.yaml``) that reads the jobs' folders under
``hydra.sweep.dir`` after the last job, so it works for every launcher (jobs in other processes or on other
hosts included): ``done`` (written when a job succeeds, with its metrics), otherwise the last event of
``attempts.jsonl`` (``failed`` with the error, or ``start`` with no end: killed). The overrides shown are the
ones that differ between jobs.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from callbacks.records import read_done, read_jsonl


def _job_dirs(sweep_dir: Path) -> list[Path]:
    dirs = [p.parent.parent for p in sweep_dir.glob("*/.hydra/overrides.yaml")]
    return sorted(dirs, key=lambda p: (0, int(p.name), "") if p.name.isdigit() else (1, 0, p.name))


def job_rows(sweep_dir: str | Path, metric: str | None) -> list[dict[str, Any]]:
    """``{"job", "overrides", "status", "value", "error", "folder"}`` per job folder of ``sweep_dir``."""
    rows = []
    for d in _job_dirs(Path(sweep_dir)):
        overrides = [str(o) for o in OmegaConf.load(d / ".hydra" / "overrides.yaml")]
        row: dict[str, Any] = {"job": d.name, "overrides": overrides, "value": None, "error": None, "folder": str(d)}
        if (d / "done").is_file():
            row["status"] = "done"
            value = read_done(d).get("metrics", {}).get(metric) if metric else None
            row["value"] = value
        else:
            events = read_jsonl(d / "attempts.jsonl")
            last = events[-1] if events else {}
            row["status"] = {"failed": "failed", "start": "killed"}.get(last.get("event"), "no record")
            row["error"] = last.get("error")
        rows.append(row)
    return rows


def summary_lines(rows: list[dict[str, Any]], metric: str | None, sweep_dir: str | Path) -> list[str]:
    common = set.intersection(*(set(r["overrides"]) for r in rows)) if rows else set()
    swept = [" ".join(o for o in r["overrides"] if o not in common) or "(no override)" for r in rows]
    counts = {s: sum(r["status"] == s for r in rows) for s in ("done", "failed", "killed", "no record")}
    head = ", ".join(f"{n} {s}" for s, n in counts.items() if n)
    lines = [f"multirun: {len(rows)} jobs in {sweep_dir}: {head}"]
    width = max((len(s) for s in swept), default=9)
    name = metric or "metric"
    lines.append(f"  {'job':>3}  {'overrides':<{width}}  {'status':<7}  {name}")
    for r, s in zip(rows, swept):
        if r["status"] == "done":
            value = "not logged" if r["value"] is None else f"{float(r['value']):.4f}"
        else:
            value = re.sub(r"\s+", " ", str(r["error"] or ""))[:100]
        lines.append(f"  {r['job']:>3}  {s:<{width}}  {r['status']:<7}  {value}")
    done = [r for r in rows if r["status"] == "done" and r["value"] is not None]
    if done and metric:
        best = max(done, key=lambda r: float(r["value"]))
        lines.append(f"best {metric}: {float(best['value']):.4f} (job {best['job']}, {best['folder']})")
    return lines


class MultirunSummary(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        metric = config.get("optimized_metric")
        rows = job_rows(sweep_dir, metric)
        if not rows:
            return
        text = "\n".join(summary_lines(rows, metric, sweep_dir))
        print(text, flush=True)
        (sweep_dir / "multirun_summary.txt").write_text(text + "\n")
        (sweep_dir / "multirun_summary.json").write_text(json.dumps(rows, indent=1) + "\n")
