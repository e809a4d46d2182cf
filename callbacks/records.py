"""The run-folder record schema: file names and fields shared by the writers and the one reader.

Writers: :class:`callbacks.run_summary.RunSummaryCallback` (``summary.json``),
:class:`callbacks.domainbed_results.DomainBedResultsCallback` (``results.jsonl``) and ``rmoe-train``
(``done``, via :func:`write_json_atomic`). Reader: :mod:`tasks.results.records`. Both sides take
the names below from here, so a renamed file or field changes in one place. (``callbacks/`` never
imports ``tasks/``; this module imports nothing from either.)

A run folder::

    .hydra/{config,hydra,overrides}.yaml   the composed config, Hydra's runtime (group choices), the overrides
    metrics.csv                            every logged metric (CSV logger)
    results.jsonl                          DomainBed: one JSON object per evaluation (RESULTS_ARGS_KEYS in "args")
    summary.json                           SUMMARY_KEYS (schema SUMMARY_SCHEMA)
    done                                   written last, when the run succeeded: DONE_KEYS
"""

from __future__ import annotations

import json
import os
import subprocess
import warnings
from pathlib import Path
from typing import Any

DONE_FILE = "done"
SUMMARY_FILE = "summary.json"
RESULTS_FILE = "results.jsonl"
METRICS_FILE = "metrics.csv"
HYDRA_DIR = ".hydra"
OVERRIDES_FILE = f"{HYDRA_DIR}/overrides.yaml"
CONFIG_FILE = f"{HYDRA_DIR}/config.yaml"
HYDRA_FILE = f"{HYDRA_DIR}/hydra.yaml"

SUMMARY_SCHEMA = 1
#: The fields of ``summary.json``, in the order the writer emits them.
SUMMARY_KEYS = ("schema", "done", "benchmark", "task_name", "task", "method", "variant", "seed", "lr",
                "headline", "test_envs", "trial_seed", "epochs", "stability", "series", "global_step",
                "wall_time_s", "overrides", "commit")
#: The fields of the ``done`` file (DomainBed writes an empty one: read as ``{}``). ``skipped_batches``: the
#: batches ``callbacks.numerics.on_fault=skip`` dropped (a run with any is left out of the tables unless asked for).
DONE_KEYS = ("finished_utc", "commit", "metrics", "skipped_batches")
#: ``rmoe-train``'s list of a run folder's attempts (one JSON object per line; tasks.run.run_folder)
ATTEMPTS_FILE = "attempts.jsonl"
#: The fields of a ``results.jsonl`` record's ``args`` that model selection and the tables read.
RESULTS_ARGS_KEYS = ("dataset", "algorithm", "test_envs", "trial_seed", "hparams_seed", "seed", "task_name")


def git_commit(path: str | None = None) -> str | None:
    """Short commit of the code (``git rev-parse --short HEAD`` in this package's folder), or None."""
    here = path or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        out = subprocess.run(["git", "-C", here, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             timeout=10, check=True)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def summary_record(**fields: Any) -> dict[str, Any]:
    """A ``summary.json`` object with exactly :data:`SUMMARY_KEYS` (missing ones None); an unknown
    field is an error naming it."""
    unknown = sorted(set(fields) - set(SUMMARY_KEYS))
    if unknown:
        raise KeyError(f"summary.json: unknown field(s) {unknown}; allowed: {list(SUMMARY_KEYS)}")
    return {k: fields.get(k) for k in SUMMARY_KEYS}


def write_json_atomic(path: str | os.PathLike, obj: Any) -> Path:
    """``obj`` as indented, key-sorted JSON: written to ``<path>.tmp``, then renamed over ``path``
    (a reader never sees a half-written file; file and folder are fsync'ed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:  # the content reaches the disk before the name does: never an empty file
        f.write(json.dumps(obj, indent=1, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    try:
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass
    return path


def read_done(run_dir: str | os.PathLike) -> dict[str, Any]:
    """The ``done`` record (``{}`` if it is empty or not JSON -- DomainBed writes an empty file)."""
    try:
        text = (Path(run_dir) / DONE_FILE).read_text()
        out = json.loads(text) if text.strip() else {}
        return out if isinstance(out, dict) else {}
    except (OSError, json.JSONDecodeError):
        return {}


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The JSON objects of ``path``, one per line ([] if it does not exist). A half-written last line
    (a run killed while appending it) is dropped with a warning naming the file; a malformed line
    elsewhere fails naming the file and the line."""
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = f.read().split("\n")
    while lines and not lines[-1].strip():
        lines.pop()
    out = []
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            if not isinstance(rec, dict):
                raise ValueError(f"a JSON {type(rec).__name__}, not an object")
        except ValueError as e:
            if i == len(lines):
                warnings.warn(f"{path}:{i}: dropped a half-written last line ({len(line)} characters; a run "
                              f"killed while appending it): {e}", stacklevel=2)
                continue
            raise ValueError(f"{path}:{i}: malformed record ({e}); allowed: one JSON object per line") from e
        out.append(rec)
    return out
