"""Command-line conveniences of ``rmoe-train`` that Hydra does not provide.

* Shell completion of the nested config groups. Hydra completes ``moe=`` but not ``task=`` or
  ``experiment=``, whose options live in sub-folders (``task/glue/rte.yaml``): it lists a group's own
  files only. :func:`complete_nested` answers Hydra's completion query (``-sc query=bash``, with the
  line in ``COMP_LINE``) for those groups and leaves every other query to Hydra. Install the
  completion once with ``eval "$(rmoe-train -sc install=bash)"``.
"""

from __future__ import annotations

import os
from pathlib import Path

NESTED_GROUPS = ("task", "experiment")


def group_options(conf_dir: str | os.PathLike, group: str) -> list[str]:
    """Every option of ``group`` under ``conf_dir``, nested ones as ``sub/name`` (files starting
    with ``_`` are shared parts, not options)."""
    root = Path(conf_dir) / group
    return sorted(str(p.relative_to(root))[: -len(".yaml")] for p in root.rglob("*.yaml") if not p.name.startswith("_"))


def nested_candidates(conf_dir: str | os.PathLike, word: str) -> list[str] | None:
    """Completions of the word being typed when it is ``[+]<nested group>=<prefix>``, else None."""
    key, sep, prefix = word.partition("=")
    group = key.lstrip("+")
    if not sep or group not in NESTED_GROUPS:
        return None
    return [f"{key}={o}" for o in group_options(conf_dir, group) if o.startswith(prefix)]


def complete_nested(argv: list[str], conf_dir: str | os.PathLike, environ: dict | None = None) -> bool:
    """If ``argv`` is Hydra's bash completion query and the word being completed is a nested group,
    print the candidates (space-separated, as Hydra does) and return True."""
    env = os.environ if environ is None else environ
    query = any(a.startswith("query=") for a in argv) and any(a in ("-sc", "--shell-completion") for a in argv)
    line = env.get("COMP_LINE")
    if not query or line is None:
        return False
    words = line.split(" ")
    candidates = nested_candidates(conf_dir, words[-1] if words else "")
    if candidates is None:
        return False
    print(" ".join(candidates))
    return True
