"""The one run-record reader: a run folder -> :class:`RunRecord`; a tree of them -> :class:`Scan`.

What a run folder holds is :mod:`callbacks.records` (the schema the writers use too). A folder is a
*run* when it holds ``summary.json`` or ``results.jsonl``; it is *complete* when it also holds
``done`` (:func:`scan` leaves the others out and lists them) -- in a folder ``rmoe-train`` ran
(it holds ``attempts.jsonl``) only a ``done`` holding its record (JSON with ``metrics``) counts: an empty
or unreadable one does not (DomainBed's own folders write an empty ``done``, which counts there). A
complete run whose ``done`` records skipped batches (``callbacks.numerics.on_fault=skip``) is left out
and listed unless ``include_skipped``. A complete run is a *debug run* --
left out of every table and listed -- when its ``task_name`` starts with ``debug`` or it was composed
with a ``debug`` group option (Hydra's runtime choice in ``.hydra/hydra.yaml``, or a ``debug=...``
override in ``.hydra/overrides.yaml`` / ``summary.json``).

Method identity (:attr:`RunRecord.variant`): ``summary.json``'s ``variant`` (the ``variant`` config
key, default ``moe.name``), else its ``method``, else a ``variant=`` override, else the DomainBed
records' ``args.algorithm``. DomainBed records (:attr:`RunRecord.records`) are returned with
``args.algorithm`` set to the variant, so an ablation that shares its ``moe`` gets its own row.

Study version (:attr:`RunRecord.study_version`, :func:`folder_study_version`): the reproduction
study marks the records of a rerun with the Hydra override ``++study_version=N``
(``.hydra/overrides.yaml``; a record without it is version 1); ``<bench>/meta.json``'s
``study_version`` is the study's current version, and records of an older version are superseded
(:mod:`tasks.study.driver`, :mod:`tasks.study.data`).

Also here: ``meta.json`` of a study (:func:`read_metas`), a run's ``.hydra/config.yaml``
(:func:`read_config`) and ``metrics.csv`` (:func:`read_metrics`).
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import yaml

from callbacks.records import (
    ATTEMPTS_FILE,
    CONFIG_FILE,
    DONE_FILE,
    HYDRA_FILE,
    METRICS_FILE,
    OVERRIDES_FILE,
    RESULTS_FILE,
    SUMMARY_FILE,
    read_done,
    read_jsonl,
)

META_FILE = "meta.json"
VERSION_KEY = "study_version"
_NULL = (None, "", "null", "None", "none")


def _read_yaml(path: str) -> Any:
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return yaml.safe_load(f)


def parse_overrides(lines: Any) -> dict[str, str]:
    """``["moe=rmoe", "+x.y=1", "~z"]`` -> ``{"moe": "rmoe", "x.y": "1"}`` (deletions left out; a
    later override of a key wins, as in Hydra)."""
    out: dict[str, str] = {}
    for line in lines or []:
        line = str(line).strip()
        if not line or line.startswith("~") or "=" not in line:
            continue
        key, value = line.split("=", 1)
        out[key.lstrip("+").strip()] = value.strip()
    return out


@dataclass
class RunRecord:
    """One run folder as read from disk."""

    path: str  # the folder as found
    rel: str  # relative to the scanned root, "/" separators
    complete: bool  # holds a done file
    done: dict[str, Any] | None  # the done record ({} when empty), None when absent
    summary: dict[str, Any] | None
    raw_records: list[dict[str, Any]] = field(default_factory=list)  # results.jsonl as written
    overrides: list[str] = field(default_factory=list)
    choices: dict[str, Any] = field(default_factory=dict)  # Hydra's runtime group choices (hydra.yaml)

    # -- identity --------------------------------------------------------------------------------
    @cached_property
    def override_dict(self) -> dict[str, str]:
        return parse_overrides(self.overrides)

    @property
    def benchmark(self) -> str:
        if self.summary and self.summary.get("benchmark"):
            return str(self.summary["benchmark"])
        return "domainbed" if self.raw_records else "?"

    @property
    def variant(self) -> str:
        s = self.summary or {}
        v = s.get("variant") or s.get("method") or self.override_dict.get("variant")
        if v in _NULL and self.raw_records:
            v = self.raw_records[0]["args"]["algorithm"]
        return str(v)

    @property
    def task(self) -> str:
        if self.summary and self.summary.get("task") is not None:
            return str(self.summary["task"])
        return str(self.raw_records[0]["args"]["dataset"]) if self.raw_records else "?"

    @property
    def task_name(self) -> str | None:
        if self.summary and self.summary.get("task_name"):
            return str(self.summary["task_name"])
        for r in self.raw_records[:1]:
            if r.get("args", {}).get("task_name"):
                return str(r["args"]["task_name"])
        return None

    @property
    def debug(self) -> str | None:
        """Why this is a debug run (``"debug=fdr"``, ``"task_name=debug/..."``), or None."""
        tn = self.task_name
        if tn and tn.startswith("debug"):
            return f"task_name={tn}"
        for source in (self.choices, self.override_dict, parse_overrides((self.summary or {}).get("overrides"))):
            value = source.get("debug")
            if value not in _NULL:
                return f"debug={value}"
        return None

    @property
    def study_version(self) -> int:
        """The ``study_version=N`` override the run was launched with (1 without one)."""
        return version_of(self.override_dict)

    @cached_property
    def records(self) -> list[dict[str, Any]]:
        """DomainBed records with ``args.algorithm`` = :attr:`variant`."""
        if not self.raw_records:
            return []
        v = self.variant
        return [dict(r, args=dict(r["args"], algorithm=v)) for r in self.raw_records]

    def get(self, key: str, default: Any = None) -> Any:
        """A ``summary.json`` field, else the first DomainBed record's ``args`` field."""
        if self.summary and self.summary.get(key) is not None:
            return self.summary[key]
        if self.raw_records:
            return self.raw_records[0].get("args", {}).get(key, default)
        return default


def version_of(overrides: Mapping[str, str]) -> int:
    """``int(overrides["study_version"])``; 1 when absent or not an integer."""
    try:
        return int(overrides.get(VERSION_KEY, 1))
    except (TypeError, ValueError):
        return 1


def folder_study_version(path: str | os.PathLike) -> int:
    """The study version of the run folder ``path`` from its ``.hydra/overrides.yaml`` (else the
    overrides ``summary.json`` recorded); 1 when neither names one. Reads no other file."""
    path = os.fspath(path)
    overrides = _read_yaml(os.path.join(path, OVERRIDES_FILE))
    if overrides is None:
        sp = os.path.join(path, SUMMARY_FILE)
        if os.path.isfile(sp):
            with open(sp) as f:
                summary = json.load(f)
            overrides = summary.get("overrides") if isinstance(summary, dict) else None
    return version_of(parse_overrides(overrides))


def read_run(path: str, root: str | None = None) -> RunRecord:
    """Read the run folder ``path`` (``rel`` relative to ``root``, default the folder's name)."""
    rel = os.path.relpath(path, root).replace(os.sep, "/") if root is not None else os.path.basename(path)
    complete = os.path.isfile(os.path.join(path, DONE_FILE))
    summary = None
    sp = os.path.join(path, SUMMARY_FILE)
    if os.path.isfile(sp):
        with open(sp) as f:
            summary = json.load(f)
        if not isinstance(summary, dict):
            summary = None
    raw = read_jsonl(os.path.join(path, RESULTS_FILE))
    overrides = _read_yaml(os.path.join(path, OVERRIDES_FILE))
    if overrides is None and summary:
        overrides = summary.get("overrides")
    hydra = _read_yaml(os.path.join(path, HYDRA_FILE)) or {}
    choices = ((hydra.get("hydra") or {}).get("runtime") or {}).get("choices") or {}
    return RunRecord(path=path, rel=rel, complete=complete, done=read_done(path) if complete else None,
                     summary=summary, raw_records=raw, overrides=[str(o) for o in overrides or []],
                     choices=dict(choices))


@dataclass
class Scan:
    """The runs below a folder: ``runs`` (complete, not debug; sorted by folder), ``incomplete``
    (folders without a valid ``done``), ``debug`` (complete debug runs, left out) and ``skipped_batches``
    (complete runs that dropped batches, left out unless asked for), as relative paths."""

    root: str
    runs: list[RunRecord]
    incomplete: list[str]
    debug: list[str]
    skipped_batches: list[str] = field(default_factory=list)

    def bench(self, benchmark: str) -> list[RunRecord]:
        return [r for r in self.runs if r.benchmark == benchmark]


def _done_is_valid(dirpath: str, files: list[str]) -> bool:
    if DONE_FILE not in files:
        return False
    if ATTEMPTS_FILE not in files:
        return True  # DomainBed's own output folders: an empty done
    return isinstance(read_done(dirpath).get("metrics"), dict)


def scan(root: str, include_debug: bool = False, include_skipped: bool = False) -> Scan:
    """Every run folder below ``root`` (any depth; Hydra multirun folders nest)."""
    runs, incomplete, debug, skipped = [], [], [], []
    for dirpath, dirs, files in os.walk(root, followlinks=True):
        dirs.sort()
        if SUMMARY_FILE not in files and RESULTS_FILE not in files:
            continue
        rel = os.path.relpath(dirpath, root).replace(os.sep, "/")
        if not _done_is_valid(dirpath, files):
            incomplete.append(rel)
            continue
        run = read_run(dirpath, root)
        if run.summary is None and not run.raw_records:
            continue
        if run.debug and not include_debug:
            debug.append(rel)
            continue
        if int((run.done or {}).get("skipped_batches") or 0) > 0 and not include_skipped:
            skipped.append(rel)
            continue
        runs.append(run)
    return Scan(root, sorted(runs, key=lambda r: r.rel), sorted(incomplete), sorted(debug), sorted(skipped))


def load_summaries(input_dir: str, benchmark: str | None = None) -> tuple[list[dict[str, Any]], list[str]]:
    """``(summaries, incomplete)``: the ``summary.json`` of every complete run below ``input_dir``
    (optionally of ``benchmark``), each with ``run_dir`` set to its folder, and the incomplete folders."""
    s = scan(input_dir)
    out = []
    for r in s.runs:
        if r.summary is None or (benchmark is not None and r.summary.get("benchmark") != benchmark):
            continue
        out.append(dict(r.summary, run_dir=r.path))
    return out, [os.path.join(input_dir, d) for d in s.incomplete]


def read_metas(root: str) -> dict[str, dict[str, Any]]:
    """``{benchmark: meta}`` from ``<root>/meta.json`` and ``<root>/*/meta.json`` (a study's plan and
    provenance, written by :mod:`tasks.study.driver`); the benchmark is the file's ``benchmark``
    field, else its folder's name."""
    out: dict[str, dict[str, Any]] = {}
    if not os.path.isdir(root):
        return out
    paths = [(os.path.basename(os.path.abspath(root)), os.path.join(root, META_FILE))]
    paths += [(d, os.path.join(root, d, META_FILE)) for d in sorted(os.listdir(root))]
    for name, path in paths:
        if os.path.isfile(path):
            with open(path) as f:
                m = json.load(f)
            if isinstance(m, dict):
                out.setdefault(str(m.get("benchmark") or name), m)
    return out


def read_config(run_dir: str) -> dict[str, Any]:
    """The run's composed config (``.hydra/config.yaml``; ``{}`` without one)."""
    cfg = _read_yaml(os.path.join(run_dir, CONFIG_FILE))
    return cfg if isinstance(cfg, Mapping) else {}


def read_metrics(run_dir: str) -> list[dict[str, str]]:
    """The rows of the run's ``metrics.csv`` (CSV logger)."""
    with open(os.path.join(run_dir, METRICS_FILE), newline="") as f:
        return list(csv.DictReader(f))


def metric_column(rows: list[Mapping[str, str]], key: str) -> list[float]:
    """The non-empty values of column ``key``, as floats."""
    return [float(r[key]) for r in rows if r.get(key) not in (None, "")]
