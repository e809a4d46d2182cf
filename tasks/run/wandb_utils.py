"""Weights & Biases helpers for ``tasks.train``: offline mode when W&B cannot be used, and the
``wandb sync`` command for an offline run.

:func:`auto_offline` runs before the loggers are instantiated. For every W&B logger in
``cfg.logger`` whose mode is not chosen explicitly (``WANDB_MODE`` unset, ``logger.<name>.mode``
null and ``logger.<name>.offline`` false) it sets ``mode: offline`` when

* there is no API key: neither ``WANDB_API_KEY`` / ``WANDB_IDENTITY_TOKEN_FILE`` nor a netrc entry
  (``$NETRC``, ``~/.netrc``, ``~/_netrc``) for the W&B host, or
* the W&B host (``WANDB_BASE_URL``, default ``https://api.wandb.ai``) does not accept a TCP
  connection within ~2 s (through the ``https_proxy``/``http_proxy`` with ``CONNECT`` when one
  applies),

and logs one warning line saying why. After the run is finished, :func:`print_sync_command` prints
``wandb sync <offline run dir>``.

Run names and groups (``conf/logger/wandb.yaml``, resolvers ``rmoe_wandb_name`` / ``rmoe_wandb_group``):
a run is named ``<variant>-seed<seed>`` (a multirun job: ``-job<n>`` appended, its number in the sweep) and
grouped by ``task_name`` (a multirun: ``<task_name>/<sweep folder name>``, so each sweep is one group in the UI).
"""

from __future__ import annotations

import logging
import netrc
import os
import socket
import threading
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from omegaconf import DictConfig, open_dict

from tasks.run.hydra_runtime import hydra_mode, hydra_runtime

log = logging.getLogger(__name__)

DEFAULT_BASE_URL = "https://api.wandb.ai"
CONNECT_TIMEOUT_S = 2.0


def base_url() -> str:
    return os.environ.get("WANDB_BASE_URL") or DEFAULT_BASE_URL


def _netrc_path() -> Path | None:
    if os.environ.get("NETRC"):
        return Path(os.environ["NETRC"]).expanduser()
    for name in ("~/.netrc", "~/_netrc"):
        p = Path(name).expanduser()
        if p.exists():
            return p
    return None


def api_key_source(url: str | None = None) -> str | None:
    """Where a W&B credential for ``url`` comes from (an env variable name or the netrc path), or None."""
    for var in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE"):
        if os.environ.get(var):
            return var
    path = _netrc_path()
    if path is None or not path.is_file():
        return None
    try:
        entry = netrc.netrc(str(path)).authenticators(urlsplit(url or base_url()).netloc)
    except (netrc.NetrcParseError, OSError) as e:
        log.warning("W&B: cannot read %s (%s); treating it as no API key", path, e)
        return None
    return str(path) if entry and entry[2] else None


def _proxy_for(url: str) -> str | None:
    parts = urlsplit(url)
    if urllib.request.proxy_bypass(parts.hostname or ""):
        return None
    return urllib.request.getproxies().get(parts.scheme)


def host_reachable(url: str | None = None, timeout: float = CONNECT_TIMEOUT_S) -> bool:
    """True if ``url``'s host accepts a TCP connection within ``timeout`` seconds (name resolution
    included); through the proxy (HTTP ``CONNECT`` answered with 200) when one applies to ``url``."""
    parts = urlsplit(url or base_url())
    host, port = parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)
    if not host:
        return False
    proxy = _proxy_for(parts.geturl())
    result: list[bool] = []

    def probe() -> None:
        try:
            if proxy:
                p = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
                with socket.create_connection((p.hostname, p.port or 80), timeout=timeout) as s:
                    s.sendall(f"CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
                    status = s.recv(64).split(b"\r\n", 1)[0].split()
                    result.append(len(status) >= 2 and status[1] == b"200")
            else:
                with socket.create_connection((host, port), timeout=timeout):
                    result.append(True)
        except OSError:
            result.append(False)

    # a thread bounds the whole probe, name resolution (which ignores socket timeouts) included
    t = threading.Thread(target=probe, name="wandb-host-probe", daemon=True)
    t.start()
    t.join(timeout + 0.5)
    return bool(result and result[0])


def offline_reason() -> str | None:
    """Why W&B cannot be used online from here (no API key / host unreachable), or None."""
    url = base_url()
    if api_key_source(url) is None:
        return f"no W&B API key (WANDB_API_KEY or a netrc entry for {urlsplit(url).netloc})"
    if not host_reachable(url):
        return f"{url} is not reachable (no connection within {CONNECT_TIMEOUT_S:g} s)"
    return None


def _is_wandb_logger(node: Any) -> bool:
    return isinstance(node, DictConfig) and str(node.get("_target_", "")).endswith("WandbLogger")


def auto_offline(cfg: DictConfig) -> str | None:
    """Set ``mode: offline`` on the W&B logger entries of ``cfg.logger`` when W&B cannot be used
    online and no mode was chosen explicitly; returns the reason, or None when nothing changed."""
    group = cfg.get("logger")
    if not isinstance(group, DictConfig):
        return None
    nodes = [node for node in group.values() if _is_wandb_logger(node)]
    if not nodes or os.environ.get("WANDB_MODE"):
        return None  # no W&B logger, or the mode is chosen by the environment
    nodes = [n for n in nodes if n.get("mode") is None and not n.get("offline", False)]
    if not nodes:
        return None  # logger.<name>.mode / offline chosen in the config
    reason = offline_reason()
    if reason is None:
        return None
    for node in nodes:
        with open_dict(node):
            node.mode = "offline"
    save_dir = nodes[0].get("save_dir") or nodes[0].get("dir") or "."
    log.warning("W&B offline: %s; the run is written to %s/wandb/offline-run-*; upload it later with "
                "`wandb sync` (set WANDB_MODE or logger.wandb.mode to choose yourself)", reason, save_dir)
    return reason


def offline_run_dir(run: Any) -> str | None:
    """The folder of an offline run (what ``wandb sync`` takes), or None for an online run."""
    settings = getattr(run, "settings", None)
    offline = getattr(run, "offline", None)
    if offline is None:
        offline = getattr(settings, "mode", None) in ("offline", "dryrun")
    return getattr(settings, "sync_dir", None) if offline else None


def print_sync_command(run_dir: str | None) -> str | None:
    """Print (and return) ``wandb sync <run_dir>`` for an offline run."""
    if not run_dir:
        return None
    cmd = f"wandb sync {run_dir}"
    print(f"W&B offline run saved; upload it with: {cmd}", flush=True)
    return cmd


def _hydra_multirun() -> Any:
    """Hydra's config of the running multirun job, or None (a single run, or no Hydra: ``train(cfg)`` in tests)."""
    hc = hydra_runtime()
    return hc if hydra_mode(hc) == "MULTIRUN" else None


def wandb_run_name(variant: Any, seed: Any) -> str:
    """``<variant>-seed<seed>``, ``-job<n>`` appended in a multirun (module docstring)."""
    hc = _hydra_multirun()
    name = f"{variant}-seed{seed}"
    return f"{name}-job{hc.job.num}" if hc is not None and hc.job.get("num") is not None else name


def wandb_group(task_name: Any) -> str:
    """``task_name``; in a multirun ``<task_name>/<sweep folder name>`` (module docstring)."""
    hc = _hydra_multirun()
    return f"{task_name}/{Path(str(hc.sweep.dir)).name}" if hc is not None else str(task_name)
