"""The reproduction study: ``python -m tasks.reproduce {glue,domainbed,small,ceiling,report}``
(= ``python -m tasks.study.driver``; ``make reproduce-<what>``).

``small`` = ``glue`` + ``domainbed`` (the study); ``ceiling`` = the GLUE full-fine-tune ceilings
(``sweeps/glue_ceiling.yaml``, outside the study's budget); ``report`` = only step 3. For each
benchmark:

1. **What is done.** A planned job is done when its exported record
   ``docs/results/<bench>/<job>/`` (``done`` + ``summary.json``) *or* its job folder
   ``<log_dir>/<bench>/<job>/`` (``done`` + ``summary.json``) is of the study's current version
   (:data:`STUDY_VERSION`: the ``study_version=N`` override a record was launched with, see
   :func:`tasks.results.records.folder_study_version`; none = 1). So committed records are enough to
   resume on a fresh clone, and records of a superseded study never count as done.
2. **Only the pending jobs run**, piece by piece in plan order (:func:`glue_plan`: seed-major -- all
   GLUE cells of seed 0, then 1, 2, 3, 4, then each ablation; :func:`domainbed_plan`: trial-seed-major),
   so a run stopped part-way leaves complete comparisons. Within a piece the pending jobs are grouped
   into the fewest Hydra multiruns whose grids hold exactly them (:func:`group`; Hydra's basic
   sweeper takes a grid, not a list of combinations): ``rmoe-train -m -cd sweeps -cn <sweep>
   key=a,b ...`` (joblib, ``--jobs`` in parallel, ``cores / jobs`` threads each). Job folders are
   named by their parameters and the sweeps set ``skip_if_done=true``; a done job folder of an older
   study version is first moved to ``<log_dir>/superseded/<bench>/``. ``--budget-min N``: no
   multirun starts after N minutes (counted from the start of the command).
3. **After each multirun** the small records of every finished job (``summary.json``,
   ``results.jsonl``, ``.hydra/overrides.yaml``, ``done`` last; no checkpoints) are copied to
   ``docs/results/<bench>/<job>/`` (replacing a superseded record there) and
   ``docs/results/<bench>/meta.json`` is updated (command, each invocation's start, end, wall time,
   commit and jobs run, the planned jobs, ``study_version``, the settings; a superseded study's
   provenance moves to ``previous``), so a killed invocation keeps what finished.
4. ``docs/RESULTS.md`` is regenerated from ``docs/results/`` alone (:mod:`tasks.study.report`).

A failing multirun does not stop the others; the command exits non-zero at the end if any job
failed. SIGTERM or SIGINT (Ctrl-C) stops the running multirun (its process group), exports the jobs
that finished, records the invocation (``stopped_by_signal``), writes RESULTS.md and exits 143: the
next command goes on with the jobs not done. ``--dry-run`` prints the multiruns that would start and changes nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from callbacks.records import DONE_FILE, OVERRIDES_FILE, RESULTS_FILE, SUMMARY_FILE
from callbacks.records import git_commit as commit
from tasks.results.records import META_FILE, VERSION_KEY, folder_study_version
from tasks.run import jobs

from .parallel import DEFAULT_JOBS
from .report import main as study_main  # scipy and matplotlib (2.5 s): the report command

log = logging.getLogger("tasks.study.driver")

ROOT = Path(__file__).resolve().parents[2]

#: The study version of each benchmark's records: bump it when a change makes earlier records void
#: (they stay in docs/results, are left out of the report and are rerun). Version 2: the study after
#: the fidelity fixes (see RESULTS.md, "What changed since the superseded study"). Version 3: models that
#: learn (the full training sets, 3 epochs; DomainBed 1,500 steps on 20,000 digits, sized by docs/pilots),
#: the paper's MoE row as released (moe_cosine), the data order seeded by the run's seed.
STUDY_VERSION = {"glue": 3, "domainbed": 3, "ceiling": 1}
#: Why each benchmark's records of an older version were superseded (meta.json ``previous.superseded``).
SUPERSEDED_WHY = {
    "glue": {2: "its models did not learn: MRPC's runs were a constant guess, RTE stayed at chance and CoLA's dense "
                "model missed its gate (3,000 / 500 training rows, 2 epochs); version 3 trains on the full training "
                "sets for 3 epochs, keeps the tasks whose dense pilot passed its gate, and runs the paper's MoE row as "
                "released (moe_cosine)"},
    "domainbed": {2: "its models did not learn: dense RotatedMNIST 54.2 % against the floor 85 after 200 steps on "
                     "10,000 digits; version 3 trains 1,500 steps on 20,000 digits (sized by docs/pilots), and the "
                     "data order follows the run's seed (data.data_seed = seed since version 2's records)"},
}

def sweep_grid(config: str) -> dict[str, list[str]]:
    """``hydra.sweeper.params`` of ``sweeps/<config>.yaml``: each swept key and its values (Hydra's comma
    list, split). The study's grids have one home, the sweep files; the plan below reads them."""
    data = yaml.safe_load((ROOT / "sweeps" / f"{config}.yaml").read_text(encoding="utf-8"))
    params = ((data.get("hydra") or {}).get("sweeper") or {}).get("params") or {}
    # a value is a list literal ("[0],[1]") or a plain token; commas between them separate the values
    return {k: [x.strip() for x in re.findall(r"\[[^\]]*\]|[^,]+", str(v))] for k, v in params.items()}


_GLUE = sweep_grid("reproduce_glue")
_DOMAINBED = sweep_grid("reproduce_domainbed")
_CEILING = sweep_grid("glue_ceiling")

#: CoLA (the paper's table) and STS-B (not in it; the backbone is a sentence-similarity model): the tasks
#: whose dense pilots passed their gates at an affordable cost (docs/pilots). From sweeps/reproduce_glue.yaml.
GLUE_TASKS = tuple(t.split("/", 1)[1] for t in _GLUE["task"])
GLUE_METHODS = tuple(_GLUE["moe"])
GLUE_SEEDS = tuple(int(s) for s in _GLUE["seed"])
GLUE_ABLATIONS = {  # variant -> overrides (on every GLUE task)
    "rmoe_nofusion": ["moe=rmoe", "variant=rmoe_nofusion", "moe.fusion=null"],
    "rmoe_nocurriculum": ["moe=rmoe", "variant=rmoe_nocurriculum", "curriculum=constant"],
}
GLUE_ABLATION_TASKS = GLUE_TASKS
ABLATION_SEEDS = (0, 1, 2)
#: Tasks whose dense pilot missed the gate: only their dense model is planned (5 seeds, after everything
#: else), so the report's gate table shows the miss from study records; no method runs where no verdict can be.
GLUE_GATE_ONLY_TASKS = ("mrpc",)

#: dataset -> (experiment stem, test domains); the swept datasets, methods, domains and trial seeds come from
#: sweeps/reproduce_domainbed.yaml (experiment=domainbed/<stem>_<method>); ColoredMNIST is a gate-only dataset.
_DB_STEMS = {"rotated_mnist": "RotatedMNIST", "colored_mnist": "ColoredMNIST"}
DOMAINBED_METHODS = tuple(dict.fromkeys(e.rsplit("_", 1)[1] for e in _DOMAINBED["experiment"]))
DOMAINBED = {_DB_STEMS[stem]: (stem, len(_DOMAINBED["data.test_envs"]))
             for stem in dict.fromkeys(e.split("/", 1)[1].rsplit("_", 1)[0] for e in _DOMAINBED["experiment"])}
DOMAINBED["ColoredMNIST"] = ("colored_mnist", 3)
TRIAL_SEEDS = tuple(int(t) for t in _DOMAINBED["data.trial_seed"])
#: Datasets whose dense pilot missed a floor (docs/pilots): dense only, after every other dataset's jobs.
DOMAINBED_GATE_ONLY = ("ColoredMNIST",)

CEILING_TASKS = tuple(t.split("/", 1)[1] for t in _CEILING["task"])
CEILING_LRS = tuple(float(lr) for lr in _CEILING["module.lr"])

SHORTENED = {
    "glue": [
        "CoLA and STS-B (STS-B is not in the paper's table) with every method; MRPC only its dense model, as a gate "
        "check (its version-2 runs were a constant guess; the one setting known to pass is the full fine-tune); RTE "
        "only in the ceiling (the full fine-tune does not learn it)",
        "backbone all-MiniLM-L6-v2 (6 layers, width 384) instead of bert-large-cased; one MoE layer at encoder "
        "layer 2 (of 6) instead of layer 10 (of 24), experts upcycled from its FFN",
        "embeddings and encoder layers 0-1 frozen (not trained, no dropout; their output computed once per example "
        "and reused: module.cache_frozen)",
        "the full training set less 128 rows held out for epoch selection (a fixed data_seed=0 split)",
        "3 epochs instead of 10; max sequence length 64 instead of 128; batches grouped by length; lr 1e-4 (one "
        "value) instead of the grid {2e-5, 3e-5, 5e-5}",
        "the paper's MoE row as released: the cosine router (moe=moe_cosine, E=8, k=2)",
        "5 seeds (0-4) per method, 3 (0-2) per ablation; dev sets complete",
    ],
    "domainbed": [
        "RotatedMNIST and ColoredMNIST (MNIST files) instead of PACS/VLCS/OfficeHome/DomainNet (no images offline); "
        "ColoredMNIST only its dense model (its dense pilot missed the floors, docs/pilots)",
        "a ViT trained from scratch (4 blocks, width 64, 4 heads, MLP 2x, 7x7 patches = 16 tokens) instead of "
        "DeiT-S/16; MoE at blocks 2 and 3 instead of 8 and 10",
        "20,000 of the 70,000 MNIST digits (a fixed seeded subsample, dealt to the domains as DomainBed does)",
        "1,500 steps instead of 5,001, evaluation after updates 1, 500, 1,000 and 1,500 instead of every 300; "
        "batch 32 per domain; "
        "Adam lr 2e-3 (DomainBed's small-image default is 1e-3)",
        "each method per conf/protocol/domainbed/<method>.yaml (RMoE as in the paper's released vision runs: "
        "exponential lambda decay, no Stateful Fusion)",
    ],
}

#: The ceiling's setting (meta.json ``shortened``): sweeps/glue_ceiling.yaml.
CEILING_SETTING = [
    "the study's backbone (all-MiniLM-L6-v2), dense, every layer trained, the full training set, 3 epochs, "
    "max length 128, batch 32, AdamW with linear decay, no warm-up, lr in {5e-5, 1e-4, 2e-4} (one seed each); "
    "the ceiling of a task = the dev score after the last epoch of its best lr",
]
SETTINGS = {**SHORTENED, "ceiling": CEILING_SETTING}
COMMANDS = {"glue": "make reproduce-glue", "domainbed": "make reproduce-domainbed", "ceiling": "make reproduce-ceiling"}
EXPORTED = (SUMMARY_FILE, RESULTS_FILE, OVERRIDES_FILE, DONE_FILE)  # done last: a copy killed mid-way is not done


@dataclass(frozen=True)
class Job:
    """One planned run: its folder name (= Hydra's ``hydra.sweep.subdir``), the planned cell
    (meta.json's ``expected`` entry), and how a multirun makes it: sweep config, overrides fixed for
    its family, ``(key, value)`` of each swept axis, and the piece of the plan it belongs to."""

    name: str
    cell: tuple[tuple[str, Any], ...]
    config: str
    fixed: tuple[str, ...]
    axes: tuple[tuple[str, str], ...]
    piece: str

    @property
    def expected(self) -> dict[str, Any]:
        return dict(self.cell)

    @property
    def family(self) -> tuple:
        return (self.config, self.fixed, tuple(k for k, _ in self.axes))


@dataclass
class Multirun:
    """One ``rmoe-train -m -cd sweeps -cn <config> <overrides>`` and the planned jobs its grid makes."""

    config: str
    overrides: list[str]
    jobs: list[Job] = field(default_factory=list)
    piece: str = ""

    def command(self) -> str:
        return f"rmoe-train -m -cd sweeps -cn {self.config} " + " ".join(self.overrides)


def _versioned(bench: str, fixed: Sequence[str]) -> tuple[str, ...]:
    v = STUDY_VERSION[bench]
    return (*fixed, f"++{VERSION_KEY}={v}") if v > 1 else tuple(fixed)


def _cell(**kw: Any) -> tuple[tuple[str, Any], ...]:
    return tuple(sorted(kw.items()))


def glue_plan() -> list[Job]:
    """Seed-major: the five methods on every task for seed 0, then 1, ..., 4 (one piece per seed),
    then each ablation on every task for seeds 0-2 (one piece per ablation), then the dense model of
    each gate-only task for seeds 0-4 (one piece)."""
    out = []
    for seed in GLUE_SEEDS:
        for task in GLUE_TASKS:
            for method in GLUE_METHODS:
                out.append(Job(f"{task}_{method}_s{seed}", _cell(task=task, variant=method, seed=seed),
                               "reproduce_glue", _versioned("glue", []),
                               (("task", f"glue/{task}"), ("moe", method), ("seed", str(seed))), f"seed {seed}"))
    for variant, overrides in GLUE_ABLATIONS.items():
        for seed in ABLATION_SEEDS:
            for task in GLUE_ABLATION_TASKS:
                out.append(Job(f"{task}_{variant}_s{seed}", _cell(task=task, variant=variant, seed=seed),
                               "reproduce_glue", _versioned("glue", overrides),
                               (("task", f"glue/{task}"), ("seed", str(seed))), f"ablation {variant}"))
    for task in GLUE_GATE_ONLY_TASKS:
        for seed in GLUE_SEEDS:
            out.append(Job(f"{task}_dense_s{seed}", _cell(task=task, variant="dense", seed=seed),
                           "reproduce_glue", _versioned("glue", []),
                           (("task", f"glue/{task}"), ("moe", "dense"), ("seed", str(seed))), "gate only"))
    return out


def domainbed_plan() -> list[Job]:
    """Trial-seed-major: every method x test domain of each dataset for trial seed 0 (one piece), then
    1, then 2; then the dense model of each gate-only dataset, trial seeds 0-2 (one piece)."""
    out = []
    for t in TRIAL_SEEDS:
        for dataset, (stem, n_envs) in DOMAINBED.items():
            if dataset in DOMAINBED_GATE_ONLY:
                continue
            for method in DOMAINBED_METHODS:
                for env in range(n_envs):
                    out.append(Job(f"{dataset}_{method}_env{env}_t{t}",
                                   _cell(task=dataset, variant=method, test_env=env, trial_seed=t),
                                   "reproduce_domainbed", _versioned("domainbed", []),
                                   (("experiment", f"domainbed/{stem}_{method}"), ("data.test_envs", f"[{env}]"),
                                    ("data.trial_seed", str(t))), f"trial seed {t}"))
    for dataset in DOMAINBED_GATE_ONLY:
        stem, n_envs = DOMAINBED[dataset]
        for t in TRIAL_SEEDS:
            for env in range(n_envs):
                out.append(Job(f"{dataset}_dense_env{env}_t{t}",
                               _cell(task=dataset, variant="dense", test_env=env, trial_seed=t),
                               "reproduce_domainbed", _versioned("domainbed", []),
                               (("experiment", f"domainbed/{stem}_dense"), ("data.test_envs", f"[{env}]"),
                                ("data.trial_seed", str(t))), "gate only"))
    return out


def lr_text(lr: float) -> str:
    """How Hydra renders ``${module.lr}`` in a folder name (``str`` of the float): 5e-05, 0.0001."""
    return str(float(lr))


def ceiling_plan() -> list[Job]:
    """sweeps/glue_ceiling.yaml's grid: task x lr, folders ``<task>_lr<lr>`` (e.g. ``cola_lr5e-05``)."""
    return [Job(f"{task}_lr{lr_text(lr)}", _cell(task=task, lr=lr), "glue_ceiling", _versioned("ceiling", []),
                (("task", f"glue/{task}"), ("module.lr", lr_text(lr))), "ceiling")
            for task in CEILING_TASKS for lr in CEILING_LRS]


PLANS: dict[str, Callable[[], list[Job]]] = {"glue": glue_plan, "domainbed": domainbed_plan, "ceiling": ceiling_plan}


# --- grouping pending jobs into multiruns -------------------------------------------------------
def group(pending_jobs: Sequence[Job]) -> list[Multirun]:
    """The multiruns that run exactly ``pending_jobs``: per piece (in plan order) and family (same
    sweep, fixed overrides and axes), each job starts as a one-point grid and two grids that differ
    in one axis only merge (their union is again a grid) until none do; values keep plan order."""
    out = []
    pieces = list(dict.fromkeys(j.piece for j in pending_jobs))
    for piece in pieces:
        in_piece = [j for j in pending_jobs if j.piece == piece]
        for fam in dict.fromkeys(j.family for j in in_piece):
            fj = [j for j in in_piece if j.family == fam]
            keys = fam[2]
            rank = [{v: i for i, v in enumerate(dict.fromkeys(j.axes[a][1] for j in fj))} for a in range(len(keys))]
            boxes = [tuple(frozenset({v}) for _, v in j.axes) for j in fj]
            changed = True
            while changed:
                changed = False
                for a in range(len(keys)):
                    merged: dict[tuple, set] = {}
                    for b in boxes:
                        merged.setdefault(b[:a] + b[a + 1:], set()).update(b[a])
                    if len(merged) < len(boxes):
                        changed = True
                    boxes = [rest[:a] + (frozenset(vals),) + rest[a:] for rest, vals in merged.items()]
            config, fixed, _ = fam
            for b in boxes:
                vals = [sorted(b[a], key=rank[a].__getitem__) for a in range(len(keys))]
                members = [j for j in fj if all(j.axes[a][1] in b[a] for a in range(len(keys)))]
                assert len(members) == math.prod(len(v) for v in vals), (piece, vals)
                out.append(Multirun(config, [*fixed, *(f"{k}={','.join(v)}" for k, v in zip(keys, vals))], members,
                                    piece))
    return out


# --- done detection -----------------------------------------------------------------------------
def finished(folder: Path, version: int) -> bool:
    """``folder`` holds a complete record (``done`` + ``summary.json``) of study version ``version``."""
    return jobs.is_done(folder) and (folder / SUMMARY_FILE).is_file() and folder_study_version(folder) == version


def is_done(bench: str, job: Job, log_dir: Path, results_dir: Path) -> bool:
    v = STUDY_VERSION[bench]
    return finished(results_dir / bench / job.name, v) or finished(log_dir / bench / job.name, v)


def pending(bench: str, plan: Sequence[Job], log_dir: Path, results_dir: Path) -> list[Job]:
    return [j for j in plan if not is_done(bench, j, log_dir, results_dir)]


def set_aside_stale(bench: str, todo: Sequence[Job], log_dir: Path) -> list[Path]:
    """Move the job folders of ``todo`` that are done but of another study version (``skip_if_done``
    would skip them) to ``<log_dir>/superseded/<bench>/<job>[.k]``; returns where they went."""
    moved = []
    for j in todo:
        src = log_dir / bench / j.name
        if not jobs.is_done(src):
            continue
        dst = log_dir / "superseded" / bench / j.name
        k = 0
        while dst.exists():
            k += 1
            dst = dst.with_name(f"{j.name}.{k}")
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(src), str(dst))
        log.warning("%s: a done job folder of another study version (%d) moved to %s", src,
                    folder_study_version(dst), dst)
        moved.append(dst)
    return moved


# --- running ------------------------------------------------------------------------------------
def git_commit() -> str | None:
    return commit(str(ROOT))


class Stopped(Exception):
    """SIGTERM / SIGINT reached the driver: the running multirun is stopped, what finished is exported."""


def _stop(signum: int, frame: Any) -> None:
    raise Stopped(signal.Signals(signum).name)


def launch(mr: Multirun, log_dir: Path, n_jobs: int, extra: Sequence[str]) -> int:
    cmd = [sys.executable, "-m", "tasks.train", "-m", "-cd", str(ROOT / "sweeps"), "-cn", mr.config,
           *mr.overrides, f"paths.log_dir={log_dir}", f"hydra.launcher.n_jobs={n_jobs}", *extra]
    env = dict(os.environ)
    # cores / n_jobs intra-op threads per job (the jobs share the cores); set before torch is imported in the workers
    threads = str(max(1, (os.cpu_count() or 1) // max(1, n_jobs)))
    for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env.setdefault(k, threads)
    log.info("launching %d jobs (%s): %s", len(mr.jobs), mr.piece, " ".join(cmd))
    proc = subprocess.Popen(cmd, cwd=str(ROOT), env=env, start_new_session=True)
    try:
        return proc.wait()
    except BaseException:  # Stopped or KeyboardInterrupt: stop the multirun and its workers, then go on stopping
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        raise


def export(bench: str, plan: Sequence[Job], log_dir: Path, results_dir: Path) -> int:
    """Copy the small records of every job finished in ``log_dir`` (current version) to
    ``results_dir/<bench>/<job>/`` unless a current record is there already (a superseded one is
    replaced); returns how many were copied."""
    v = STUDY_VERSION[bench]
    n = 0
    for j in plan:
        src, dst = log_dir / bench / j.name, results_dir / bench / j.name
        if not finished(src, v) or finished(dst, v):
            continue
        if dst.exists():
            shutil.rmtree(dst)
        for rel in EXPORTED:
            if (src / rel).is_file():
                (dst / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src / rel, dst / rel)
        n += 1
    return n


def write_meta(bench: str, plan: Sequence[Job], results_dir: Path, invocation: dict | None,
               replace_last: bool = False) -> Path:
    """Write ``<results_dir>/<bench>/meta.json``; ``invocation`` is appended (``replace_last``: it
    replaces the last one, the same invocation after a further multirun). A meta.json of another
    study version is kept under ``previous`` (its invocations, settings and why it was superseded)."""
    path = results_dir / bench / META_FILE
    old = json.loads(path.read_text()) if path.is_file() else {}
    version = STUDY_VERSION[bench]
    if old and int(old.get(VERSION_KEY, 1)) != version:
        previous = {k: old[k] for k in ("command", "invocations", "shortened", "superseded") if k in old}
        previous[VERSION_KEY] = int(old.get(VERSION_KEY, 1))
        invocations = []
    else:
        previous = old.get("previous")
        invocations = list(old.get("invocations", []))
    why = SUPERSEDED_WHY.get(bench, {}).get(int((previous or {}).get(VERSION_KEY, 0)))
    if why and previous.get("superseded") != why:  # the reason this version's records were superseded
        previous = {**previous, "superseded": why}
    if invocation is not None:
        if replace_last and invocations:
            invocations[-1] = invocation
        else:
            invocations.append(invocation)
    meta = {"benchmark": bench, "command": COMMANDS[bench], VERSION_KEY: version, "invocations": invocations,
            "expected": [j.expected for j in plan], "shortened": SETTINGS[bench]}
    if previous:
        meta["previous"] = previous
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(meta, indent=1, sort_keys=True) + "\n"
    if not path.is_file() or path.read_text() != text:
        path.write_text(text)
    return path


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


_clock = time.monotonic  # the budget's clock (tests replace it)


@dataclass
class Options:
    log_dir: Path
    results_dir: Path
    n_jobs: int | None = None
    extra: Sequence[str] = ()
    dry_run: bool = False
    budget_s: float | None = None
    start: float = field(default_factory=lambda: _clock())
    stopped: bool = False  # the budget stopped a bench
    stopped_by: str | None = None  # a signal stopped the command
    invocation: tuple[dict | None, float] = (None, 0.0)  # the running bench's invocation record and its start
    launched: list = field(default_factory=list)  # the running bench's jobs launched so far
    meta_written: bool = False  # the running bench's invocation is in its meta.json


def run_bench(bench: str, o: Options) -> int:
    """Run the pending jobs of ``bench`` (see the module doc); returns the number of failed multiruns."""
    plan = PLANS[bench]()
    todo = pending(bench, plan, o.log_dir, o.results_dir)
    runs = group(todo)
    n_jobs = o.n_jobs or DEFAULT_JOBS[bench]
    log.info("%s: %d planned jobs, %d done, %d to run in %d multirun(s)", bench, len(plan), len(plan) - len(todo),
             len(todo), len(runs))
    if o.dry_run:
        for mr in runs:
            log.info("would run (%s, %d jobs): %s", mr.piece, len(mr.jobs), mr.command())
        return 0
    failures, invocation, t0 = 0, None, 0.0
    try:
        failures, invocation, t0 = _run_multiruns(bench, plan, runs, n_jobs, o)
    except Stopped as e:
        o.stopped_by = str(e)
        invocation, t0 = o.invocation
        if invocation is not None:
            invocation.update(finished_utc=_now(), wall_time_s=round(_clock() - t0, 1), stopped_by_signal=str(e))
            launched = o.launched
            still = len(pending(bench, launched, o.log_dir, o.results_dir))
            invocation.update(jobs_run=len(launched) - still, jobs_failed_or_unfinished=still)
        log.warning("%s: stopped by %s: exporting what finished", bench, e)
    n = export(bench, plan, o.log_dir, o.results_dir)
    # the invocation is in meta.json once a multirun has finished: replace it there, else append it
    write_meta(bench, plan, o.results_dir, invocation, replace_last=o.meta_written)
    left = len(pending(bench, plan, o.log_dir, o.results_dir))
    log.info("%s: %d of %d planned jobs done%s", bench, len(plan) - left, len(plan),
             f" ({n} more records exported)" if n else "")
    return failures


def _run_multiruns(bench: str, plan: Sequence[Job], runs: Sequence[Multirun], n_jobs: int, o: Options
                   ) -> tuple[int, dict | None, float]:
    failures, invocation, t0 = 0, None, 0.0
    o.invocation, o.launched, o.meta_written = (None, 0.0), [], False
    for i, mr in enumerate(runs):
        if o.budget_s is not None and _clock() - o.start >= o.budget_s:
            left = sum(len(m.jobs) for m in runs[i:])
            log.warning("%s: the budget (%.0f min) is spent: %d multirun(s) with %d jobs not started", bench,
                        o.budget_s / 60, len(runs) - i, left)
            o.stopped = True
            if invocation is not None:
                invocation["stopped_by_budget"] = True
                invocation["jobs_not_started"] = left
            break
        if invocation is None:
            t0 = _clock()
            invocation = {"started_utc": _now(), "commit": git_commit()}
            o.invocation = (invocation, t0)
        set_aside_stale(bench, mr.jobs, o.log_dir)
        o.launched = [j for m in runs[:i + 1] for j in m.jobs]
        if launch(mr, o.log_dir, n_jobs, o.extra) != 0:
            failures += 1
            log.error("%s: a multirun reported failed jobs (see %s/*/train.log); the others go on", bench,
                      o.log_dir / bench)
        n = export(bench, plan, o.log_dir, o.results_dir)
        launched = [j for m in runs[:i + 1] for j in m.jobs]
        still = len(pending(bench, launched, o.log_dir, o.results_dir))
        invocation.update(finished_utc=_now(), wall_time_s=round(_clock() - t0, 1), jobs_run=len(launched) - still,
                          jobs_failed_or_unfinished=still)
        write_meta(bench, plan, o.results_dir, invocation, replace_last=o.meta_written)
        o.meta_written = True
        log.info("%s: multirun %d/%d done; %d records exported; %d of %d launched jobs finished", bench, i + 1,
                 len(runs), n, len(launched) - still, len(launched))
    return failures, invocation, t0


def report(results_dir: Path, output: Path) -> None:
    study_main([str(results_dir), "--output", str(output)])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("what", choices=("glue", "domainbed", "small", "ceiling", "report"),
                   help="small = glue + domainbed (the study); ceiling = the GLUE full-fine-tune ceilings")
    p.add_argument("--log_dir", default="logs/reproduce", help="job folders (checkpoint-free, ~MBs)")
    p.add_argument("--results_dir", default="docs/results", help="exported records")
    p.add_argument("--output", default="docs/RESULTS.md")
    p.add_argument("--jobs", type=int, default=None,
                   help="jobs in parallel (default: 2 for glue/domainbed, 1 for ceiling)")
    p.add_argument("--budget-min", "--budget_min", dest="budget_min", type=float, default=None,
                   help="start no multirun after this many minutes (what finished is exported)")
    p.add_argument("--dry-run", action="store_true", help="print the multiruns that would start")
    p.add_argument("overrides", nargs="*", help="extra Hydra overrides for every job (changes results!)")
    a = p.parse_intermixed_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s] %(message)s")
    o = Options(Path(a.log_dir).resolve(), Path(a.results_dir), a.jobs, a.overrides, a.dry_run,
                None if a.budget_min is None else 60.0 * a.budget_min)
    benches = {"small": ["glue", "domainbed"], "report": []}.get(a.what, [a.what])
    failures = 0
    old = {sig: signal.signal(sig, _stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        for bench in benches:
            failures += run_bench(bench, o)
            if o.stopped_by:
                break
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
    if not a.dry_run:
        report(o.results_dir, Path(a.output))
        log.info("wrote %s", a.output)
    if o.stopped:
        log.warning("stopped by --budget-min %g: run the same command again to go on", a.budget_min)
    if o.stopped_by:
        log.warning("stopped by %s: what finished is exported; run the same command again to go on", o.stopped_by)
        return 143
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
