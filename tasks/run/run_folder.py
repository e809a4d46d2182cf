"""A run folder belongs to one run: its lock, continuation in place, and records that are only appended.

* **Lock.** ``<run>/.rmoe.lock`` (JSON: pid, host, process start time, when) is created with
  ``O_CREAT | O_EXCL`` before anything is written. A second run into the folder fails at once with
  :class:`RunFolderBusyError` naming the holder; a lock whose process is gone (same host, pid dead or
  reused) is stale and taken over with a warning. The lock is re-entrant within one process and
  removed when the run ends. ``rmoe-train`` takes it before Hydra writes ``.hydra/`` when the run
  folder is known from the command line (``hydra.run.dir=`` or a ``ckpt_path`` inside a run folder).
* **Staging.** Hydra writes a job's ``.hydra/`` and log at job start, before any check ran:
  ``rmoe-train`` points them at ``<run>/.rmoe-staging/<pid>-<ns>/`` (:func:`staging_overrides`). When
  the attempt has passed every check (config, run folder, continuation config, checkpoint file, fit
  and identity, data), :func:`promote_staging` moves them into place; a refused attempt
  (:func:`discard_staging`) leaves the folder exactly as it was, and a folder it created empty is removed.
* **Continuation in place.** ``rmoe-train ckpt_path=<run>/checkpoints/last.ckpt`` (no
  ``hydra.run.dir``) continues in ``<run>`` with the run's own config (:mod:`tasks.run.continuation`).
  Once the continuation passed its checks, ``done`` is removed (and written again only when it
  succeeds); the attempts that passed their checks are listed in ``<run>/attempts.jsonl``
  (start/end time, pid, host, overrides, ckpt_path, status, allowed changes). A checkpoint of
  *another* run folder cannot be resumed into this one (the records would be split over two folders); a fresh run (no
  ``ckpt_path``) into a folder that already holds records is refused unless ``skip_if_done=true``
  (which clears an unfinished folder).
* **Step and metrics.csv**: :mod:`tasks.run.metrics_csv` (rows at ``trainer.global_step``; a resumed run keeps the
  rows logged up to its checkpoint). Orphan
  ``.tmp-*.ckpt`` files of a save killed mid-way are removed at start
  (:func:`tasks.run.checkpoint_io.remove_orphan_temporaries`).
"""

from __future__ import annotations

import json
import logging
import logging as _logging
import os
import shutil
import socket
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from callbacks.records import ATTEMPTS_FILE, DONE_FILE, METRICS_FILE, RESULTS_FILE, SUMMARY_FILE
from tasks.run.hydra_runtime import hydra_runtime

log = logging.getLogger(__name__)

LOCK = ".rmoe.lock"
ATTEMPTS = ATTEMPTS_FILE
# where a new attempt's Hydra records (.hydra/, train.log) wait until the attempt passed every check
STAGING = ".rmoe-staging"
# files/folders that are records of a run (a fresh run must not mix its own into them)
RECORDS = (DONE_FILE, METRICS_FILE, RESULTS_FILE, SUMMARY_FILE, "checkpoints")

_held: dict[str, int] = {}  # realpath of a lock file -> re-entrance depth (this process)


class RunFolderError(RuntimeError):
    """The run folder cannot be used by this run; the message names the folder and why."""


class RunFolderBusyError(RunFolderError):
    """Another live process holds the run folder's lock."""


# --------------------------------------------------------------------------------------------
# lock
# --------------------------------------------------------------------------------------------
def _proc_start(pid: int) -> str | None:
    """The process start time (clock ticks since boot, /proc/<pid>/stat field 22), or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    now = _proc_start(pid)
    return not (start is not None and now is not None and now != start)  # pid reused by another process


def lock_holder(run_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The lock record of ``run_dir`` (``{}`` when unreadable), or None when there is no lock."""
    path = Path(run_dir) / LOCK
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError:
        return {}
    try:
        rec = json.loads(text)
        return rec if isinstance(rec, dict) else {}
    except json.JSONDecodeError:
        return {}


def _is_stale(rec: dict[str, Any]) -> bool:
    if not rec or rec.get("host") != socket.gethostname():
        return not rec  # an unreadable lock (killed while writing it) is stale; another host: cannot tell
    try:
        return not _alive(int(rec["pid"]), rec.get("start"))
    except (KeyError, TypeError, ValueError):
        return True


def acquire_lock(run_dir: str | os.PathLike) -> Path:
    """Take ``<run_dir>/.rmoe.lock`` for this process (re-entrant); see the module docstring."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK
    key = os.path.realpath(path)
    if key in _held:
        _held[key] += 1
        return path
    me = {"pid": os.getpid(), "host": socket.gethostname(), "start": _proc_start(os.getpid()),
          "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            fd = None
        if fd is not None:
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(me) + "\n")
                f.flush()
                os.fsync(f.fileno())
            break
        rec = lock_holder(run_dir)
        if rec is None:
            continue  # released in between: try again
        if rec.get("pid") == me["pid"] and rec.get("host") == me["host"] and rec.get("start") == me["start"]:
            break  # this very process took it
        if not _is_stale(rec):
            raise RunFolderBusyError(
                f"run folder {str(run_dir)!r} is in use by another run: pid {rec.get('pid')} on host "
                f"{rec.get('host')!r} since {rec.get('since')} (lock file {path}); allowed: a folder no "
                "other run is using (e.g. another hydra.run.dir), or wait for that run to end. If that "
                "process is gone on another host, remove the lock file by hand.")
        log.warning("run folder %s: taking over the stale lock of pid %s on %s (since %s; the process is "
                    "gone)", run_dir, rec.get("pid"), rec.get("host"), rec.get("since"))
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
    else:
        raise RunFolderBusyError(f"run folder {str(run_dir)!r}: could not take the lock {path} (contended)")
    _held[key] = 1
    return path


def release_lock(run_dir: str | os.PathLike) -> None:
    """Undo one :func:`acquire_lock`; the file is removed when the outermost holder releases it."""
    path = Path(run_dir) / LOCK
    key = os.path.realpath(path)
    if key not in _held:
        return
    _held[key] -= 1
    if _held[key] > 0:
        return
    del _held[key]
    rec = lock_holder(run_dir)
    if rec and rec.get("pid") == os.getpid() and rec.get("host") == socket.gethostname():
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


# --------------------------------------------------------------------------------------------
# staging: a new attempt's .hydra/ and train.log wait beside the run's until every check passed
# --------------------------------------------------------------------------------------------
def staging_overrides(tag: str, log_file: bool = True) -> list[str]:
    """Hydra overrides that make a job write its ``.hydra/`` and (``log_file``: with Hydra's default job
    logging) ``train.log`` into ``<run>/.rmoe-staging/<tag>/`` (``rmoe-train`` adds them;
    :func:`promote_staging` moves them into place)."""
    out = [f"hydra.output_subdir={STAGING}/{tag}/.hydra"]
    if log_file:  # opened at its first line (the staging folder does not exist when Hydra configures logging)
        out += [f"hydra.job_logging.handlers.file.filename=${{hydra.runtime.output_dir}}/{STAGING}/{tag}/"
                "${hydra.job.name}.log", "++hydra.job_logging.handlers.file.delay=true"]
    return out


def is_staging_override(arg: str) -> bool:
    """Whether ``arg`` is one of :func:`staging_overrides` (a DDP rank > 0 drops them: rank 0 owns the folder)."""
    if arg == "++hydra.job_logging.handlers.file.delay=true":
        return True
    return arg.startswith(("hydra.output_subdir=", "hydra.job_logging.handlers.file.filename=")) and \
        f"{STAGING}/" in arg


def staging_dir(run_dir: str | os.PathLike) -> Path | None:
    """This job's staging folder (from Hydra's ``output_subdir``), or None when Hydra writes in place."""
    hc = hydra_runtime()
    sub = hc.output_subdir if hc is not None else None
    if not sub or Path(sub).parts[0] != STAGING:
        return None
    return Path(run_dir) / Path(sub).parent


def _staged_file_handlers(staging: Path) -> list[Any]:
    root = os.path.realpath(staging)
    return [h for h in _logging.getLogger().handlers if isinstance(h, _logging.FileHandler)
            and os.path.realpath(h.baseFilename).startswith(root + os.sep)]


def promote_staging(run_dir: str | os.PathLike, staging: Path | None) -> None:
    """The attempt passed every check: its ``.hydra/`` replaces the run's, its log so far is appended
    to ``<run>/<job>.log`` and the log handler writes there from now on; stale staging folders of
    attempts killed before their checks passed are removed."""
    run_dir = Path(run_dir)
    if staging is None:
        return
    if staging.is_dir():
        new_hydra = staging / ".hydra"
        if new_hydra.is_dir():
            old = run_dir / ".hydra"
            if old.is_dir():
                os.replace(old, staging / ".hydra-replaced")
            os.replace(new_hydra, old)
        for h in _staged_file_handlers(staging):
            final = run_dir / os.path.basename(h.baseFilename)
            h.acquire()
            try:
                if h.stream is not None:
                    h.stream.flush()
                    h.stream.close()
                    h.stream = None
                staged = Path(h.baseFilename)
                if staged.is_file():
                    with open(final, "a") as out:
                        out.write(staged.read_text())
                h.baseFilename = os.fspath(final.resolve())
            finally:
                h.release()
    remove_staging(run_dir, keep=None)


def discard_staging(run_dir: str | os.PathLike, staging: Path | None) -> None:
    """The attempt was refused: remove what Hydra wrote for it (its staging folder; its log handler is
    closed and detached) and leave the run folder as it was; a folder left empty is removed."""
    if staging is None:
        return
    for h in _staged_file_handlers(staging):
        _logging.getLogger().removeHandler(h)
        h.close()
    shutil.rmtree(staging, ignore_errors=True)
    try:
        os.rmdir(Path(run_dir) / STAGING)
    except OSError:
        pass


def remove_staging(run_dir: str | os.PathLike, keep: Path | None) -> None:
    """Remove ``<run>/.rmoe-staging/`` but ``keep`` (the folder is locked: no other attempt is staging)."""
    root = Path(run_dir) / STAGING
    if not root.is_dir():
        return
    for p in root.iterdir():
        if keep is None or os.path.realpath(p) != os.path.realpath(keep):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    try:
        os.rmdir(root)
    except OSError:
        pass


def remove_if_empty(run_dir: str | os.PathLike | None) -> None:
    """Remove ``run_dir`` when a refused run left it empty (it created it)."""
    if run_dir:
        try:
            os.rmdir(run_dir)
        except OSError:
            pass


# --------------------------------------------------------------------------------------------
# command line (before Hydra writes into the folder)
# --------------------------------------------------------------------------------------------
def _value(argv: Sequence[str], key: str) -> str | None:
    out = None
    for a in argv:
        for prefix in (f"{key}=", f"+{key}=", f"++{key}="):
            if a.startswith(prefix):
                out = a[len(prefix):]
    if out is not None and out.strip("'\"") in ("", "null", "None"):
        return None
    return out.strip("'\"") if out is not None else None


def run_folder_of_checkpoint(ckpt_path: str | os.PathLike) -> Path | None:
    """``<run>`` for ``<run>/checkpoints/<file>.ckpt`` when ``<run>/.hydra`` exists, else None."""
    p = Path(ckpt_path).expanduser()
    run = p.parent.parent
    if p.parent.name == "checkpoints" and (run / ".hydra").is_dir():
        return run
    return None


def plan_from_argv(argv: Sequence[str]) -> tuple[list[str], str | None]:
    """``(argv, run_dir)``: the command line with ``hydra.run.dir=<run>`` added when ``ckpt_path`` lies
    inside a run folder and no run folder is given (continue in place), and the single-run folder
    when it is known from the command line (None for multiruns or a timestamped folder)."""
    argv = list(argv)
    if any(a in ("-m", "--multirun") for a in argv) or any(a.startswith(("--cfg", "--info", "--help", "-h",
                                                                          "--hydra-help")) for a in argv):
        return argv, None
    run_dir = _value(argv, "hydra.run.dir")
    ckpt = _value(argv, "ckpt_path")
    if run_dir is None and ckpt is not None and _value(argv, "init_from") is None:
        found = run_folder_of_checkpoint(ckpt)
        if found is not None:
            run_dir = str(found)
            argv.append(f"hydra.run.dir={run_dir}")
            log.info("ckpt_path=%s: continuing its run in place, in %s", ckpt, run_dir)
    return argv, run_dir


# --------------------------------------------------------------------------------------------
# records
# --------------------------------------------------------------------------------------------
def records_in(run_dir: str | os.PathLike) -> list[str]:
    """The run records present in ``run_dir`` (an empty ``checkpoints/`` does not count)."""
    run_dir = Path(run_dir)
    out = []
    for name in RECORDS:
        p = run_dir / name
        if p.is_dir():
            if any(p.iterdir()):
                out.append(name)
        elif p.exists():
            out.append(name)
    return out


def append_attempt(run_dir: str | os.PathLike, record: dict[str, Any]) -> None:
    """One JSON line in ``<run>/attempts.jsonl`` (appended, fsync'ed)."""
    path = Path(run_dir) / ATTEMPTS
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(record, sort_keys=True, default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())


def check_records_before_start(run_dir: str | os.PathLike, ckpt_path: str | None, skip_if_done: bool) -> None:
    """Refuse a run that would mix its records with another run's (see the module docstring)."""
    run_dir = Path(run_dir)
    if ckpt_path:
        found = run_folder_of_checkpoint(ckpt_path)
        if found is not None and os.path.realpath(found) != os.path.realpath(run_dir):
            raise RunFolderError(
                f"ckpt_path={str(ckpt_path)!r} belongs to the run folder {str(found)!r}, but this run writes to "
                f"{str(run_dir)!r}: the run's records would be split over two folders; allowed: omit "
                "hydra.run.dir to continue that run in place, or +init_from=<ckpt> to start a new run from "
                "its weights")
        return
    if skip_if_done:
        return  # tasks.run.jobs clears an unfinished folder / skips a finished one
    found = records_in(run_dir)
    if found:
        raise RunFolderError(
            f"run folder {str(run_dir)!r} already holds the records of another run ({', '.join(found)}); "
            f"allowed: a new folder (another hydra.run.dir), ckpt_path={run_dir}/checkpoints/last.ckpt to "
            "continue that run, or skip_if_done=true to skip it when done / clear and redo it otherwise")


# --------------------------------------------------------------------------------------------
# CSV history
# --------------------------------------------------------------------------------------------
