"""Atomic checkpoint writes: a kill during a save never leaves a truncated checkpoint behind.

The checkpoint is written to a temporary file ``.tmp-*.ckpt`` in the same folder, flushed and
fsync'ed, then moved over the target with ``os.replace`` (atomic on POSIX), so a reader sees the
old file or the new one. A write that fails for lack of space or permission raises
:class:`CheckpointWriteError` naming the cause ("no space left on device", "permission denied"),
the path and that the previous checkpoint is intact; the temporary file is removed. A process
killed mid-save leaves its temporary file; :func:`remove_orphan_temporaries` deletes those when the
next run in the folder starts (the folder is locked then, so no live writer owns them).
"""

from __future__ import annotations

import errno
import glob
import logging
import os
import shutil
import tempfile
from typing import Any

import torch
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO

log = logging.getLogger(__name__)

TMP_PREFIX, TMP_SUFFIX = ".tmp-", ".ckpt"


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (disk full, permission, ...); the message names path and cause."""

    def __init__(self, code: int | None, message: str):
        super().__init__(message)
        self.errno = code

    def __str__(self) -> str:
        return str(self.args[0])


class _RecordingFile:
    """A file object that remembers the first ``OSError`` its writes raised (torch's zip writer turns
    it into an opaque ``RuntimeError: ... unexpected pos``)."""

    def __init__(self, f):
        self._f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self._f.write(data)
        except OSError as e:
            self.error = self.error or e
            raise

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)


def _describe(err: BaseException | None, folder: str, written: int) -> tuple[int | None, str]:
    code = getattr(err, "errno", None)
    if code in (errno.ENOSPC, errno.EDQUOT):
        return code, "no space left on device"
    if code in (errno.EACCES, errno.EPERM):
        return code, "permission denied"
    if code == errno.EROFS:
        return code, "read-only file system"
    try:  # torch hid the OSError: judge by the space left
        if shutil.disk_usage(folder).free < max(written, 1) + (1 << 20):
            return errno.ENOSPC, "no space left on device"
    except OSError:
        pass
    return code, f"{type(err).__name__}: {str(err).splitlines()[0] if err and str(err) else ''}"


def atomic_torch_save(obj: Any, path: _PATH) -> None:
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, suffix=TMP_SUFFIX, dir=folder)
    except OSError as e:
        code, why = _describe(e, folder, 0)
        raise CheckpointWriteError(code, f"cannot write checkpoint {path}: {why} (creating a file in {folder}); "
                                         f"{_previous(path)}") from e
    rec = None
    try:
        with os.fdopen(fd, "wb") as f:
            rec = _RecordingFile(f)
            torch.save(obj, rec)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        written = os.path.getsize(tmp) if os.path.exists(tmp) else 0
        _remove(tmp)
        cause = (rec.error if rec is not None and rec.error is not None else e)
        code, why = _describe(cause, folder, written)
        raise CheckpointWriteError(code, f"cannot write checkpoint {path}: {why} (after {written} bytes); "
                                         f"{_previous(path)}") from e
    except BaseException:
        _remove(tmp)
        raise


def _previous(path: str) -> str:
    return (f"the previous checkpoint {path} is intact" if os.path.exists(path)
            else f"no previous checkpoint at {path}")


def _remove(tmp: str) -> None:
    try:
        os.remove(tmp)
    except FileNotFoundError:
        pass


def remove_orphan_temporaries(folder: str | os.PathLike) -> list[str]:
    """Delete ``.tmp-*.ckpt`` files left in ``folder`` by saves that were killed; returns them."""
    found = sorted(glob.glob(os.path.join(os.fspath(folder), f"{TMP_PREFIX}*{TMP_SUFFIX}")))
    for p in found:
        _remove(p)
    if found:
        log.warning("%s: removed %d temporary checkpoint file(s) of interrupted saves: %s", folder, len(found),
                    ", ".join(os.path.basename(p) for p in found))
    return found


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose saves are atomic (temp file + fsync + rename)."""

    def save_checkpoint(self, checkpoint: dict, path: _PATH, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"AtomicCheckpointIO does not take storage_options, got {storage_options!r}")
        atomic_torch_save(checkpoint, path)
