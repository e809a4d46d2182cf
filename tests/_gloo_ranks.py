"""Shared by the two-rank gloo test workers (``tests/_ddp_*_worker.py``): fork two ranks after the
imports are done, each joining a world-size-2 gloo group over ``init_file`` and saving ``run(rank, 2)``
to ``<out_dir>/rank<r>.pt``; exit non-zero when a rank fails or hangs."""

from __future__ import annotations

import datetime
import multiprocessing
import os
import sys
from collections.abc import Callable
from typing import Any

import torch


def _rank(run: Callable[[int, int], Any], rank: int, init_file: str, path: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2,
                                         timeout=datetime.timedelta(seconds=120))
    try:
        torch.save(run(rank, 2), path)
    finally:
        torch.distributed.destroy_process_group()


def fork_two_ranks(run: Callable[[int, int], Any], init_file: str, out_dir: str, timeout: float = 240) -> None:
    torch.set_num_threads(1)
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_rank, args=(run, r, init_file, os.path.join(out_dir, f"rank{r}.pt"))) for r in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=timeout)
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    codes = [p.exitcode for p in procs]
    if codes != [0, 0]:
        sys.exit(f"rank exit codes {codes}")
