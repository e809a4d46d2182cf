"""A checkpoint save killed with SIGKILL leaves the previous checkpoint intact (never truncated)."""

import errno
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from tasks.run.checkpoint_io import AtomicCheckpointIO, CheckpointWriteError, remove_orphan_temporaries

WRITER = r"""
import sys, torch
from tasks.run.checkpoint_io import AtomicCheckpointIO
io = AtomicCheckpointIO()
big = {"w": torch.ones(8_000_000), "tag": "new"}   # 32 MB: the save takes a while
print("saving", flush=True)
while True:
    io.save_checkpoint(big, sys.argv[1])
"""


def test_kill_during_save_leaves_old_or_new_checkpoint(tmp_path):
    path = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"w": torch.zeros(3), "tag": "old"}, path)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, cwd=root)
    assert proc.stdout.readline().strip() == b"saving"
    time.sleep(0.4)  # inside a save
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    state = torch.load(path, weights_only=False)  # never a truncated file
    assert state["tag"] in ("old", "new")
    if state["tag"] == "new":
        assert state["w"].shape == (8_000_000,)
    # leftover temp files are hidden and never taken for checkpoints; the next run removes them
    assert [p.name for p in tmp_path.iterdir() if not p.name.startswith(".tmp-")] == ["last.ckpt"]
    remove_orphan_temporaries(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_plain_torch_save_would_truncate(tmp_path):
    """The failure the plugin prevents: a kill during a plain torch.save leaves a broken file."""
    path = tmp_path / "plain.ckpt"
    code = ("import sys, torch\nbig = torch.ones(8_000_000)\nprint('saving', flush=True)\n"
            "while True:\n    torch.save(big, sys.argv[1])\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE)
    assert proc.stdout.readline().strip() == b"saving"
    broken = False
    for _ in range(40):
        time.sleep(0.05)
        size = path.stat().st_size if path.exists() else 0
        if 0 < size < 32_000_000:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            try:
                torch.load(path)
            except Exception:
                broken = True
            break
    else:
        proc.kill()
        proc.wait()
    assert broken


def test_orphan_temporaries_are_removed_and_nothing_else(tmp_path):
    for name in (".tmp-a1b2.ckpt", ".tmp-zz.ckpt", "last.ckpt", "best_epoch000.ckpt", ".tmp-notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    assert [os.path.basename(p) for p in remove_orphan_temporaries(tmp_path)] == [".tmp-a1b2.ckpt", ".tmp-zz.ckpt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".tmp-notes.txt", "best_epoch000.ckpt", "last.ckpt"]
    assert remove_orphan_temporaries(tmp_path / "no_such_folder") == []


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 1 MiB tmpfs (needs root and mount rights; skipped otherwise)."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("a disk-full test mounts a small tmpfs: needs root")
    mnt = tmp_path / "small"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_disk_full_is_reported_as_such_with_the_path_and_the_previous_checkpoint_intact(small_tmpfs):
    path = small_tmpfs / "checkpoints" / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"w": torch.zeros(1000), "tag": "old"}, path)  # 4 kB: fits
    with pytest.raises(CheckpointWriteError) as e:
        io.save_checkpoint({"w": torch.ones(1_000_000), "tag": "new"}, path)  # 4 MB: does not
    msg = str(e.value)
    assert msg.startswith(f"cannot write checkpoint {path}: no space left on device"), msg
    assert msg.endswith(f"the previous checkpoint {path} is intact")
    assert "inline_container" not in msg and e.value.errno == errno.ENOSPC
    assert torch.load(path, weights_only=False)["tag"] == "old"
    assert os.listdir(path.parent) == ["last.ckpt"]  # no temporary file left behind


def test_permission_denied_is_reported_as_such(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only folders")
    folder = tmp_path / "ro"
    folder.mkdir()
    os.chmod(folder, 0o500)
    try:
        with pytest.raises(CheckpointWriteError, match=rf"cannot write checkpoint {folder / 'last.ckpt'}: "
                                                       "permission denied"):
            AtomicCheckpointIO().save_checkpoint({"w": torch.zeros(3)}, folder / "last.ckpt")
    finally:
        os.chmod(folder, 0o700)
