"""Command-line conveniences of ``rmoe-train`` that Hydra does not provide.

* Shell completion of the nested config groups. Hydra completes ``moe=`` but not ``task=`` or
  ``experiment=``, whose options live in sub-folders (``task/glue/rte.yaml``): it lists a group's own
  files only. :func:`complete_nested` answers Hydra's completion query (``-sc query=bash``, with the
  line in ``COMP_LINE``) for those groups and leaves every other query to Hydra. Install the
  completion once with ``eval "$(rmoe-train -sc install=bash)"``.
* A fast ``--help``. Hydra's own help lists the groups by building a config repository per group (about two
  seconds of deep copies here); :func:`fast_help` prints the same page (``hydra.help`` of ``train.yaml``: header,
  groups, footer) from the folder listing, without composing anything and without importing torch.
* "Did you mean": when Hydra refuses an unknown key (``moe.topk=3``) or group option (``moe=rmeo``), its message
  is followed by the closest keys/options (:func:`did_you_mean`, from the last lines Hydra wrote to stderr).
"""

from __future__ import annotations

import difflib
import os
import re
import sys
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

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


def config_groups(conf_dir: str | os.PathLike) -> list[tuple[str, list[str]]]:
    """``(group, options)`` for every folder with options under ``conf_dir`` (``task/glue``: ``cola``, ...),
    as Hydra's help lists them (shared parts starting with ``_`` left out)."""
    root = Path(conf_dir)
    out = []
    for d in sorted(p for p in root.rglob("*") if p.is_dir()):
        options = sorted(f.stem for f in d.glob("*.yaml") if not f.name.startswith("_"))
        if options:
            out.append((str(d.relative_to(root)), options))
    return out


def fast_help(conf_dir: str | os.PathLike, config_name: str = "train") -> str:
    """The ``--help`` page of ``hydra.help`` in ``<conf_dir>/<config_name>.yaml`` (module docstring)."""
    hc = OmegaConf.load(Path(conf_dir) / f"{config_name}.yaml").hydra.help
    groups = "\n".join(f"{g}: {', '.join(opts)}" for g, opts in config_groups(conf_dir))
    text = str(hc.template).replace("${hydra.help.header}", str(hc.header))
    text = text.replace("${hydra.help.footer}", str(hc.footer)).replace("$APP_CONFIG_GROUPS", groups)
    return re.sub(r"\$\$", "$", text)


def wants_fast_help(argv: list[str]) -> bool:
    """``--help``/``-h`` on the packaged config (no ``-cd``/``-cn``/``--config-*`` choosing another one)."""
    other = ("-cd", "-cn", "-cp", "--config-dir", "--config-name", "--config-path", "--hydra-help")
    return any(a in ("--help", "-h") for a in argv) and not any(a.split("=")[0] in other for a in argv)


class StderrTail:
    """``sys.stderr`` that keeps its last 8 KiB (what Hydra printed before it exited), writing everything on."""

    def __init__(self, stream) -> None:
        self.stream, self.buf = stream, ""

    @classmethod
    def install(cls) -> StderrTail:
        tail = cls(sys.stderr)
        sys.stderr = tail
        return tail

    def uninstall(self) -> None:
        if sys.stderr is self:
            sys.stderr = self.stream

    def write(self, s: str) -> int:
        self.buf = (self.buf + s)[-8192:]
        return self.stream.write(s)

    def text(self) -> str:
        return self.buf

    def __getattr__(self, name: str):
        return getattr(self.stream, name)


def _flat_keys(node, prefix: str = "") -> list[str]:
    out = []
    for k in node.keys() if isinstance(node, DictConfig) else []:
        key = f"{prefix}{k}"
        out.append(key)
        child = node._get_node(k)
        if isinstance(child, DictConfig) and not child._is_none() and not child._is_missing():
            out.extend(_flat_keys(child, key + "."))
    return out


def _compose_keys(hydra: Any, conf_dir: str | os.PathLike, overrides: list[str]) -> list[str]:
    """The keys of ``conf/train.yaml`` composed with ``overrides`` (or fewer of them), through ``hydra`` (the package,
    which ``rmoe-train`` has imported by the time Hydra refused a key: this module answers --help without it)."""
    for attempt in (overrides, [o for o in overrides if "." not in o.split("=")[0]], []):
        try:
            hydra.core.global_hydra.GlobalHydra.instance().clear()
            with hydra.initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
                return _flat_keys(hydra.compose(config_name="train", overrides=attempt))
        except Exception:  # noqa: BLE001 - the hint is best effort; Hydra's own message stands
            continue
    return []


def did_you_mean(hydra_error: str, argv: list[str], conf_dir: str | os.PathLike, hydra: Any) -> str | None:
    """A line naming the closest keys (or group options) to the one Hydra refused in ``hydra_error`` (``hydra``: the
    imported package, to compose the keys there are)."""
    m = re.search(r"Could not override '([^']+)'", hydra_error) or (
        re.search(r"full_key: (\S+)", hydra_error) if "is not in struct" in hydra_error else None)
    if m:
        bad = m.group(1)
        rest = [a for a in argv if "=" in a and not a.startswith("-") and a.split("=")[0].lstrip("+~") != bad
                and "," not in a]
        keys = _compose_keys(hydra, conf_dir, rest)
        parent = bad.rpartition(".")[0]
        siblings = [k for k in keys if k.rpartition(".")[0] == parent]
        close = difflib.get_close_matches(bad, siblings, n=1, cutoff=0.6) or \
            difflib.get_close_matches(bad, keys, n=1, cutoff=0.75)
        return f"rmoe-train: unknown key {bad}; did you mean {close[0]}?" if close and close[0] != bad else None
    m = re.search(r"Could not find '([^'/]+)/([^']+)'", hydra_error)
    if m:
        group, option = m.groups()  # task, glue/rt
        close = difflib.get_close_matches(option, group_options(conf_dir, group), n=1, cutoff=0.5)
        return f"rmoe-train: unknown {group}={option}; did you mean {group}={close[0]}?" if close else None
    return None
