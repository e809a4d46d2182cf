"""Hugging Face hub access, checked before anything is built (:func:`preflight`, from the config checks).

A config that names a hub model or dataset (``backbone.pretrained`` / ``backbone.tokenizer`` such as
``google-bert/bert-base-uncased``, ``data.glue_dir=hub``, a timm backbone with ``pretrained: true`` and no
``weights_path``) would otherwise reach the hub deep inside the first ``from_pretrained``, and on a machine
without network the hub client retries for minutes (printing each warning twice). Here, unless
``HF_HUB_OFFLINE`` is set, the hub's host (``HF_ENDPOINT``, or the HTTPS proxy when one is set) gets one TCP
connection attempt of :data:`PROBE_TIMEOUT_S` seconds. Unreachable: with every named repository in the local
cache the run goes on offline (``HF_HUB_OFFLINE=1`` for this process, one log line); otherwise it stops with one
line naming the key, the repository, the endpoint and what is allowed. Local folders and ``pkg:`` backbones
never touch the hub.
"""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from huggingface_hub import constants as hub_constants  # 14 ms (python -X importtime); the hub client is lazy
from omegaconf import OmegaConf

log = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 3.0
DEFAULT_ENDPOINT = "https://huggingface.co"


class HubUnreachable(ValueError):
    """The hub is needed, unreachable, and the named repositories are not cached."""


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def is_hub_name(name: Any) -> bool:
    """``org/name`` or ``name`` of a hub repository (not ``pkg:``, not an existing path, not a path-like)."""
    if not isinstance(name, str) or not name or name.startswith(("pkg:", "/", ".", "~")):
        return False
    return not Path(name).expanduser().exists() and name.count("/") <= 1


def hub_needs(cfg: Any) -> list[tuple[str, str | None, str]]:
    """``(key, repository or None, kind)`` for every hub download the config implies (kind: model|dataset)."""
    def get(key: str) -> Any:
        return OmegaConf.select(cfg, key, default=None, throw_on_missing=False)

    out: list[tuple[str, str | None, str]] = []
    for key in ("backbone.pretrained", "backbone.tokenizer"):
        value = get(key)
        if get("backbone.arch") is None and is_hub_name(value) and all(r != value for _, r, _ in out):
            out.append((key, value, "model"))
    if get("backbone.arch") is not None and get("backbone.pretrained") is True and not get("backbone.weights_path"):
        out.append(("backbone.pretrained", None, "model"))  # timm's weights, repository chosen by timm
    if str(get("data.glue_dir")) == "hub":
        out.append(("data.glue_dir", "nyu-mll/glue", "dataset"))
    return out


def endpoint() -> str:
    return os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT


def reachable(url: str, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """One TCP connection to the host of ``url`` (or of the HTTPS proxy when one is set)."""
    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy") or os.environ.get("ALL_PROXY")
    parts = urlsplit(proxy or url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((parts.hostname or "", port), timeout=timeout):
            return True
    except OSError:
        return False


def cached(repo: str | None, kind: str) -> bool:
    """Whether the local hub cache holds a snapshot of ``repo``."""
    if repo is None:
        return False
    folder = _cache_folder(repo, kind) / "snapshots"
    return folder.is_dir() and any(folder.iterdir())


def _cache_folder(repo: str, kind: str) -> Path:
    """``repo``'s folder in the local hub cache (``<HF_HUB_CACHE>/<kind>s--<org>--<name>``)."""
    return Path(hub_constants.HF_HUB_CACHE) / f"{kind}s--{repo.replace('/', '--')}"


def cached_file(repo: str, filename: str, kind: str = "model") -> Path | None:
    """``filename`` of ``repo``'s snapshot in the local hub cache (the revision ``refs/main`` names, else any
    snapshot that has it), or None; never downloads."""
    base = _cache_folder(repo, kind)
    ref = base / "refs" / "main"
    snapshots = [base / "snapshots" / ref.read_text().strip()] if ref.is_file() else []
    snapshots += sorted((base / "snapshots").glob("*")) if (base / "snapshots").is_dir() else []
    return next((s / filename for s in snapshots if (s / filename).is_file()), None)


def go_offline() -> None:
    """``HF_HUB_OFFLINE=1`` for this process (and for hub clients already imported)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    hub_constants.HF_HUB_OFFLINE = True


def preflight(cfg: Any) -> None:
    """Raise :class:`HubUnreachable` (module docstring) or return; never downloads anything."""
    if _offline():
        return
    needs = hub_needs(cfg)
    if not needs:
        return
    url = endpoint()
    if reachable(url):
        return
    missing = [(k, r, kind) for k, r, kind in needs if not cached(r, kind)]
    if not missing:
        log.warning("the Hugging Face hub (%s) is unreachable: using the cached %s offline (HF_HUB_OFFLINE=1)",
                    url, ", ".join(r for _, r, _ in needs))
        go_offline()
        return
    key, repo, kind = missing[0]
    what = f"{kind} {repo!r}" if repo else "timm's pretrained weights"
    raise HubUnreachable(
        f"{key}={_value_repr(cfg, key)}: the {what} comes from the Hugging Face hub, which is unreachable "
        f"({url}, no connection within {PROBE_TIMEOUT_S:g} s) and not in the local cache; allowed: network access "
        "(once fills the cache), HF_HUB_OFFLINE=1 with a cached copy, a local folder (backbone.pretrained=<dir>), "
        "or an offline option (backbone=minilm_l6 or backbone=tiny_bert; data.glue_dir=$RMOE_DATA_DIR/glue)")


def _value_repr(cfg: Any, key: str) -> str:
    return repr(OmegaConf.select(cfg, key, default=None, throw_on_missing=False))
