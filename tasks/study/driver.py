"""The reproduction study: ``python -m tasks.reproduce {glue,domainbed,small,report}``
(= ``python -m tasks.study.driver``).

``make reproduce-glue`` / ``make reproduce-domainbed`` / ``make reproduce-small`` (both) run, for
each benchmark:

1. the Hydra multiruns of ``sweeps/reproduce_<bench>.yaml`` (joblib, 2 jobs in parallel, one
   thread each) -- unless every planned job folder already has its ``done`` file. Job folders are
   named by their parameters under ``<log_dir>/<bench>/`` and the sweeps set ``skip_if_done=true``,
   so a rerun skips finished jobs and redoes killed ones (:mod:`tasks.run.jobs`);
2. the export of each finished job's small records (``summary.json``, ``results.jsonl``, ``done``,
   ``.hydra/overrides.yaml``; no checkpoints) to ``docs/results/<bench>/<job>/``, and of
   ``docs/results/<bench>/meta.json`` (command, wall time of each invocation that trained something,
   commit, planned jobs, what is shortened relative to the paper);
3. ``docs/RESULTS.md`` regenerated from ``docs/results/`` alone (:mod:`tasks.study.report`; the
   ``report`` sub-command does only this step).

A failing multirun does not stop the others; the command exits non-zero at the end if any job failed.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from callbacks.records import DONE_FILE, OVERRIDES_FILE, RESULTS_FILE, SUMMARY_FILE
from tasks.run import jobs

log = logging.getLogger("tasks.study.driver")

ROOT = Path(__file__).resolve().parents[2]
SEEDS = (0, 1, 2)

GLUE_TASKS = ("cola", "mrpc", "rte")
GLUE_METHODS = ("dense", "moe_topk", "dynmoe", "rmoe")
GLUE_ABLATIONS = {  # variant -> overrides (on MRPC and RTE)
    "rmoe_nofusion": ["moe=rmoe", "variant=rmoe_nofusion", "moe.fusion=null"],
    "rmoe_nocurriculum": ["moe=rmoe", "variant=rmoe_nocurriculum", "curriculum=constant"],
}
GLUE_ABLATION_TASKS = ("mrpc", "rte")

DOMAINBED = {"RotatedMNIST": ("rotated_mnist", 6), "ColoredMNIST": ("colored_mnist", 3)}
DOMAINBED_METHODS = ("dense", "gmoe", "dynmoe", "rmoe")

SHORTENED = {
    "glue": [
        "backbone all-MiniLM-L6-v2 (6 layers, width 384) instead of bert-large-cased; one MoE layer at encoder "
        "layer 2 (of 6) instead of layer 10 (of 24), experts upcycled from its FFN",
        "embeddings and encoder layers 0-1 frozen (not trained)",
        "640 training rows per task (a fixed data_seed=0 subset) instead of the full training set; 128 further "
        "training rows held out for epoch selection",
        "3 epochs instead of 10; max sequence length 64 instead of 128; lr 3e-4 (one value, higher for the "
        "short run) instead of the grid {2e-5, 3e-5, 5e-5}",
        "3 seeds (0, 1, 2) as the paper; dev sets complete",
    ],
    "domainbed": [
        "RotatedMNIST and ColoredMNIST (MNIST files) instead of PACS/VLCS/OfficeHome/DomainNet (no images offline)",
        "a ViT trained from scratch (4 blocks, width 64, 4 heads, MLP 2x, 7x7 patches = 16 tokens) instead of "
        "DeiT-S/16; MoE at blocks 2 and 3 instead of 8 and 10",
        "6,000 of the 70,000 MNIST digits (a fixed seeded subsample, dealt to the domains as DomainBed does)",
        "200 steps instead of 5,001, evaluation after updates 1, 101 and 200 instead of every 300; "
        "batch 32 per domain; "
        "Adam lr 1e-3 (DomainBed's small-image default)",
        "each method per conf/protocol/domainbed/<method>.yaml (RMoE as in the paper's released vision runs: "
        "exponential lambda decay, no Stateful Fusion)",
    ],
}


@dataclass
class Multirun:
    """One ``rmoe-train -m -cd sweeps -cn <config> <overrides>`` and the job folders it makes."""

    config: str
    overrides: list[str]
    jobs: list[dict] = field(default_factory=list)  # {"name": folder, **cell}


def glue_plan() -> list[Multirun]:
    main = Multirun("reproduce_glue", [])
    for task in GLUE_TASKS:
        for method in GLUE_METHODS:
            for seed in SEEDS:
                main.jobs.append({"name": f"{task}_{method}_s{seed}", "task": task, "variant": method, "seed": seed})
    runs = [main]
    for variant, overrides in GLUE_ABLATIONS.items():
        mr = Multirun("reproduce_glue", ["task=" + ",".join(f"glue/{t}" for t in GLUE_ABLATION_TASKS), *overrides])
        for task in GLUE_ABLATION_TASKS:
            for seed in SEEDS:
                mr.jobs.append({"name": f"{task}_{variant}_s{seed}", "task": task, "variant": variant, "seed": seed})
        runs.append(mr)
    return runs


def domainbed_plan() -> list[Multirun]:
    runs = []
    for dataset, (stem, n_envs) in DOMAINBED.items():
        exps = ",".join(f"domainbed/{stem}_{m}" for m in DOMAINBED_METHODS)
        envs = ",".join(f"[{e}]" for e in range(n_envs))
        mr = Multirun("reproduce_domainbed", [f"experiment={exps}", f"data.test_envs={envs}",
                                              "data.trial_seed=" + ",".join(map(str, SEEDS))])
        for method in DOMAINBED_METHODS:
            for env in range(n_envs):
                for t in SEEDS:
                    mr.jobs.append({"name": f"{dataset}_{method}_env{env}_t{t}", "task": dataset, "variant": method,
                                    "test_env": env, "trial_seed": t})
        runs.append(mr)
    return runs


PLANS = {"glue": glue_plan, "domainbed": domainbed_plan}
COMMANDS = {"glue": "make reproduce-glue", "domainbed": "make reproduce-domainbed"}
EXPORTED = (SUMMARY_FILE, RESULTS_FILE, DONE_FILE, OVERRIDES_FILE)


def git_commit() -> str | None:
    from callbacks.run_summary import git_commit as commit

    return commit(str(ROOT))


def pending(mr: Multirun, bench_dir: Path) -> list[dict]:
    return [j for j in mr.jobs if not jobs.is_done(bench_dir / j["name"])]


def launch(mr: Multirun, log_dir: Path, n_jobs: int, extra: list[str]) -> int:
    cmd = [sys.executable, "-m", "tasks.train", "-m", "-cd", str(ROOT / "sweeps"), "-cn", mr.config,
           *mr.overrides, f"paths.log_dir={log_dir}", f"hydra.launcher.n_jobs={n_jobs}", *extra]
    env = dict(os.environ)
    # one intra-op thread per job (n_jobs jobs share the cores); set before torch is imported in the workers
    for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env.setdefault(k, "1")
    log.info("launching %d jobs: %s", len(mr.jobs), " ".join(cmd))
    return subprocess.call(cmd, cwd=str(ROOT), env=env)


def export(bench: str, plan: list[Multirun], bench_dir: Path, results_dir: Path) -> int:
    """Copy the small records of every finished job to ``results_dir/<bench>/<job>/``."""
    n = 0
    for mr in plan:
        for j in mr.jobs:
            src = bench_dir / j["name"]
            if not jobs.is_done(src):
                continue
            dst = results_dir / bench / j["name"]
            for rel in EXPORTED:
                if (src / rel).is_file():
                    (dst / rel).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(src / rel, dst / rel)
            n += 1
    return n


def write_meta(bench: str, plan: list[Multirun], results_dir: Path, invocation: dict | None) -> Path:
    path = results_dir / bench / "meta.json"
    meta = json.loads(path.read_text()) if path.is_file() else {}
    invocations = list(meta.get("invocations", []))
    if invocation is not None:
        invocations.append(invocation)
    expected = [{k: v for k, v in j.items() if k != "name"} for mr in plan for j in mr.jobs]
    meta = {"benchmark": bench, "command": COMMANDS[bench], "invocations": invocations, "expected": expected,
            "shortened": SHORTENED[bench]}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
    return path


def run_bench(bench: str, log_dir: Path, results_dir: Path, n_jobs: int, extra: list[str], dry_run: bool) -> int:
    plan = PLANS[bench]()
    bench_dir = log_dir / bench
    waiting = [(mr, len(pending(mr, bench_dir))) for mr in plan]
    todo = [mr for mr, n in waiting if n]
    total = sum(len(mr.jobs) for mr in plan)
    left = sum(n for _, n in waiting)
    log.info("%s: %d planned jobs, %d done, %d to run", bench, total, total - left, left)
    failures = 0
    invocation = None
    if todo and not dry_run:
        t0, started = time.perf_counter(), time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        for mr in todo:
            if launch(mr, log_dir, n_jobs, extra) != 0:
                failures += 1
                log.error("%s: a multirun reported failed jobs (see %s/*/train.log); the others went on",
                          bench, bench_dir)
        still = sum(len(pending(mr, bench_dir)) for mr in plan)
        invocation = {"started_utc": started, "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                      "wall_time_s": round(time.perf_counter() - t0, 1), "commit": git_commit(),
                      "jobs_run": left - still, "jobs_failed_or_unfinished": still}
        log.info("%s: %d jobs finished in %.1f s; %d unfinished", bench, left - still, invocation["wall_time_s"], still)
    if dry_run:
        for mr, n in waiting:
            if n:
                log.info("would run: rmoe-train -m -cd sweeps -cn %s %s (%d pending)", mr.config,
                         " ".join(mr.overrides), n)
        return 0
    n = export(bench, plan, bench_dir, results_dir)
    write_meta(bench, plan, results_dir, invocation)
    log.info("%s: exported %d finished jobs to %s", bench, n, results_dir / bench)
    return failures


def report(results_dir: Path, output: Path) -> None:
    from tasks.study.report import main as study_main

    study_main([str(results_dir), "--output", str(output)])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("what", choices=("glue", "domainbed", "small", "report"))
    p.add_argument("--log_dir", default="logs/reproduce", help="job folders (checkpoint-free, ~MBs)")
    p.add_argument("--results_dir", default="docs/results", help="exported records")
    p.add_argument("--output", default="docs/RESULTS.md")
    p.add_argument("--jobs", type=int, default=2, help="jobs in parallel (one thread each)")
    p.add_argument("--dry-run", action="store_true", help="print what would run")
    p.add_argument("overrides", nargs="*", help="extra Hydra overrides for every job (changes results!)")
    a = p.parse_intermixed_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s] %(message)s")
    log_dir, results_dir = Path(a.log_dir).resolve(), Path(a.results_dir)
    benches = {"small": ["glue", "domainbed"], "report": []}.get(a.what, [a.what])
    failures = 0
    for bench in benches:
        failures += run_bench(bench, log_dir, results_dir, a.jobs, a.overrides, a.dry_run)
    if not a.dry_run:
        report(results_dir, Path(a.output))
        log.info("wrote %s", a.output)
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
