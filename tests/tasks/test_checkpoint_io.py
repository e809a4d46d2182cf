"""A checkpoint save killed with SIGKILL leaves the previous checkpoint intact (never truncated)."""

import os
import signal
import subprocess
import sys
import time

import torch

from tasks.checkpoint_io import AtomicCheckpointIO

WRITER = r"""
import sys, torch
from tasks.checkpoint_io import AtomicCheckpointIO
io = AtomicCheckpointIO()
big = {"w": torch.ones(8_000_000), "tag": "new"}   # 32 MB: the save takes a while
print("saving", flush=True)
while True:
    io.save_checkpoint(big, sys.argv[1])
"""


def test_kill_during_save_leaves_old_or_new_checkpoint(tmp_path):
    path = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"w": torch.zeros(3), "tag": "old"}, path)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, cwd=root)
    assert proc.stdout.readline().strip() == b"saving"
    time.sleep(0.4)  # inside a save
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    state = torch.load(path, weights_only=False)  # never a truncated file
    assert state["tag"] in ("old", "new")
    if state["tag"] == "new":
        assert state["w"].shape == (8_000_000,)
    # leftover temp files are hidden and never taken for checkpoints
    assert [p.name for p in tmp_path.iterdir() if not p.name.startswith(".tmp-")] == ["last.ckpt"]


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
