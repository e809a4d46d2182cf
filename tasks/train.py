"""``rmoe-train``: the command line (shell completion, ``--help``, the run folder's lock and staging, a continuation's
overrides), Hydra over ``conf/train.yaml``, and each job's config checks -- before torch and Lightning are imported,
so a config error is one line in a second. A job that passed its checks goes on in :mod:`tasks.job` (which builds
and trains it: ``train(cfg)`` is there)."""

from __future__ import annotations

import os
import sys
import time

from omegaconf import DictConfig

from tasks.run import jobs
from tasks.run.checks import ConfigError, check_config, check_overrides, check_stages
from tasks.run.cli import StderrTail, complete_nested, did_you_mean, fast_help, wants_fast_help
from tasks.run.common import CONF_DIR
from tasks.run.continuation import continuation_argv
from tasks.run.hydra_runtime import hydra_mode, hydra_runtime
from tasks.run.run_folder import (
    RunFolderError,
    _value,
    acquire_lock,
    discard_staging,
    is_staging_override,
    plan_from_argv,
    release_lock,
    remove_if_empty,
    run_folder_of_checkpoint,
    staging_dir,
    staging_overrides,
)


def _job(cfg: DictConfig) -> float | None:
    """One job of ``rmoe-train``: train one configuration; returns ``cfg.optimized_metric`` for sweepers.

    Rank 0 locks the run folder (:mod:`tasks.run.run_folder`). Hydra's records of the job (``.hydra/``,
    the log) wait in ``<run>/.rmoe-staging/`` until every check passed (config, run folder, a
    continuation's config against the run's (:mod:`tasks.run.continuation`), checkpoint, data); a refused
    attempt removes them and leaves the folder as it was. On success rank 0 writes ``<run>/done``
    (:mod:`tasks.run.jobs`); ``skip_if_done=true`` skips a job whose folder already has it and clears an
    unfinished one first. Each attempt that passed its checks is listed in ``<run>/attempts.jsonl``.
    The config checks run here, before torch and Lightning are imported; the rest is :func:`tasks.job.run_job`."""
    out_dir = cfg.get("paths", {}).get("output_dir")
    owner = bool(out_dir) and jobs.is_rank_zero()
    staging = staging_dir(out_dir) if owner else None
    try:
        try:  # before the run folder is touched, and before torch/Lightning are imported
            check_config(cfg)
            check_overrides(cfg, list(hydra_runtime().overrides.task))
        except ConfigError as e:
            if hydra_mode(hydra_runtime()) != "RUN":
                raise  # a multirun records the failed job and goes on
            print(f"rmoe-train: error: {e}", file=sys.stderr)
            sys.exit(2)
    except BaseException:
        if owner:  # refused: what Hydra staged for this attempt goes
            discard_staging(out_dir, staging)
            remove_if_empty(out_dir)
        raise
    from tasks.job import run_job  # torch, Lightning, the run's callbacks: the config passed its checks

    return run_job(cfg, out_dir, cfg.get("optimized_metric"), owner, staging)


def main() -> None:
    """``rmoe-train``. A ``ckpt_path`` inside a run folder continues that run in place (adds
    ``hydra.run.dir=<run>``); a single run whose folder is known from the command line locks it
    before Hydra writes ``.hydra/`` into it, so a second run into a busy folder changes nothing."""
    if complete_nested(sys.argv[1:], CONF_DIR):  # shell completion of task= / experiment=
        return
    if wants_fast_help(sys.argv[1:]):  # Hydra's help page, without its seconds of group listing
        print(fast_help(CONF_DIR))
        return
    stage = {a.split("=", 1)[0].lstrip("+"): a.split("=", 1)[1].strip("'\"") for a in sys.argv[1:]
             if a.lstrip("+").startswith(("train=", "ckpt_path="))}
    if "-m" not in sys.argv[1:] and "--multirun" not in sys.argv[1:]:
        try:  # before the run folder is locked or Hydra writes into it
            check_stages(stage.get("train", True), stage.get("ckpt_path"))
        except ValueError as e:
            print(f"rmoe-train: error: {e}", file=sys.stderr)
            sys.exit(2)
    argv, run_dir = plan_from_argv(sys.argv[1:])
    ckpt, continued = _value(argv, "ckpt_path"), None
    if run_dir and ckpt and _value(argv, "init_from") is None:
        continued = run_folder_of_checkpoint(ckpt)
        if continued is not None and os.path.realpath(continued) == os.path.realpath(run_dir):
            argv = continuation_argv(argv, continued)  # the run's own overrides, then the command line's
    if not jobs.is_rank_zero():  # a DDP rank Lightning started with rank 0's command line: its log goes in place
        argv = [a for a in argv if not is_staging_override(a)]
    elif not any(a.startswith(("--cfg", "--info", "--help", "-h", "--hydra-help", "-sc", "--shell-completion"))
                 for a in argv):
        own_logging = any(a.lstrip("+").startswith(("hydra/job_logging=", "hydra.job_logging")) for a in argv)
        argv += staging_overrides(f"{os.getpid()}-{time.time_ns()}", log_file=not own_logging)  # wait there
    sys.argv[1:] = argv
    held = run_dir if run_dir and "${" not in run_dir and jobs.is_rank_zero() else None
    if held:
        try:
            acquire_lock(held)
        except RunFolderError as e:
            print(f"rmoe-train: error: {e}", file=sys.stderr)
            sys.exit(1)
    import hydra  # not before: --help and completion answer without it

    from tasks.resolvers import register_resolvers  # Hydra's ConfigStore: not for --help and completion

    register_resolvers()
    tail = StderrTail.install()
    try:
        hydra.main(config_path=CONF_DIR, config_name="train", version_base="1.3")(_job)()
    except SystemExit as e:
        if e.code == 1:
            hint = did_you_mean(tail.text(), sys.argv[1:], CONF_DIR, hydra)
            if hint:
                print(hint, file=sys.stderr)
        raise
    finally:
        tail.uninstall()
        if held:
            release_lock(held)
            remove_if_empty(held)  # a refused run into a new folder leaves no folder behind


if __name__ == "__main__":
    main()
