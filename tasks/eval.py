"""``rmoe-eval ckpt_path=<run>/checkpoints/<file>.ckpt [key=value ...]``: evaluate, predict, export a checkpoint.

This module is the command line: a command without ``ckpt_path`` is refused here at once; the evaluation itself
(Hydra over ``conf/eval.yaml``, the run's saved config, the checks, the record) is :mod:`tasks.evaluation`, whose
docstring says what it runs and writes.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence


def missing_ckpt_path(argv: Sequence[str]) -> bool:
    """True when a command line that would run an evaluation gives no ``ckpt_path=``."""
    info = ("--cfg", "-c", "--info", "--help", "-h", "--hydra-help", "--shell-completion", "-sc", "-m", "--multirun")
    if any(a.split("=")[0] in info for a in argv):
        return False
    return not any(a.lstrip("+").startswith("ckpt_path=") and a.split("=", 1)[1].strip("'\"") not in ("", "null")
                   for a in argv)


def main() -> None:
    """``rmoe-eval``: evaluate a checkpoint (module docstring)."""
    if missing_ckpt_path(sys.argv[1:]):
        print("rmoe-eval: error: ckpt_path is mandatory (conf/eval.yaml: ckpt_path: ???); allowed: the path of a "
              "checkpoint file, e.g. rmoe-eval ckpt_path=<run>/checkpoints/best_epoch002.ckpt", file=sys.stderr)
        sys.exit(2)
    from tasks.evaluation import run  # Hydra, torch, Lightning: a checkpoint is named

    run()


if __name__ == "__main__":
    main()
