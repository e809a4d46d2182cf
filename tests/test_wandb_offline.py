"""W&B with the real ``wandb`` package in offline mode (no network here).

* Mode detection (``tasks.run.wandb_utils``): no API key, a key but an unreachable host, a netrc entry and a
  reachable host (a real local TCP server), a proxy answering ``CONNECT``, explicit choices respected.
* One tiny real ``train(cfg)`` (GLUE CoLA, tiny_bert, RMoE, 4 steps, ``logger=csv_wandb``) with
  ``WANDB_MODE`` unset, no API key and an unreachable host: it goes offline by itself, prints the
  ``wandb sync`` command, and its ``.wandb`` file (read back record by record) holds the
  ``routing/moe0/*`` metrics and ``curriculum/lambda`` (equal to ``metrics.csv``) against
  ``trainer/global_step``, the resolved config, and the routing plots as images under ``files/media``.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import os
import socket
import struct
import threading
import time
from pathlib import Path

import matplotlib.image as mpimg
import pytest
from omegaconf import OmegaConf

from tasks.job import train
from tasks.run import wandb_utils

wandb = pytest.importorskip("wandb")

AUTH_VARS = ("WANDB_MODE", "WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL", "NETRC",
             "https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY", "no_proxy", "NO_PROXY")


# --- reading an offline run back ---------------------------------------------------------------
def read_wandb_records(path: str | Path) -> list:
    """Every record of a ``.wandb`` file: W&B's header (``:W&B``, magic 0xBEE1, version 0), then
    LevelDB-log framing (32 KiB blocks; each chunk = crc32 u32, length u16, type u8 with 1 full,
    2 first, 3 middle, 4 last; a block tail shorter than a chunk header is zero padding)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    if data[:4] != b":W&B" or struct.unpack("<H", data[4:6])[0] != 0xBEE1:
        raise ValueError(f"{path}: not a W&B transaction log (header {data[:7]!r})")
    block, hdr = 32768, 7
    pos, chunks, pending = 7, [], b""
    while pos + hdr <= len(data):
        left = block - pos % block
        if left < hdr:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + hdr])
        if pos + hdr + length > len(data):
            break  # still being written
        if kind == 0 and length == 0:  # zero padding up to the block end
            pos += left
            continue
        chunk = data[pos + hdr:pos + hdr + length]
        pos += hdr + length
        if kind == 1:
            chunks.append(chunk)
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        elif kind == 4:
            chunks.append(pending + chunk)
            pending = b""
        else:
            raise ValueError(f"{path}: bad chunk type {kind} at byte {pos}")
    records = []
    for c in chunks:
        r = pb.Record()
        r.ParseFromString(c)
        records.append(r)
    return records


def read_finished_run(path: str | Path, timeout: float = 60.0) -> list:
    """The records of a finished run. ``wandb.finish()`` can return while wandb-core is still
    writing the offline file, so wait until its last record is the run's ``exit``."""
    deadline = time.monotonic() + timeout
    while True:
        records = read_wandb_records(path)
        if records and records[-1].WhichOneof("record_type") == "exit":
            return records
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path}: no exit record {timeout:g} s after wandb.finish()")
        time.sleep(0.1)


def history_rows(records) -> list[dict]:
    rows = []
    for r in records:
        if r.WhichOneof("record_type") == "history":
            row: dict = {}
            for item in r.history.item:
                keys = list(item.nested_key) or [item.key]
                d = row
                for k in keys[:-1]:
                    d = d.setdefault(k, {})
                d[keys[-1]] = json.loads(item.value_json)
            rows.append(row)
    return rows


def config_updates(records) -> dict:
    out = {}
    for r in records:
        if r.WhichOneof("record_type") == "config":
            for u in r.config.update:
                out[u.key] = json.loads(u.value_json)
    return out


def test_reader_reads_a_run_spanning_many_blocks(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = wandb.init(project="reader", mode="offline", dir=str(tmp_path))
    for i in range(1500):
        run.log({"x": i, "s": "pad" * 8})
    path = Path(run.settings.sync_file)
    wandb.finish()
    assert path.stat().st_size > 3 * 32768
    records = read_finished_run(path)
    assert [r["x"] for r in history_rows(records)] == list(range(1500))
    assert [r.WhichOneof("record_type") for r in records].count("exit") == 1


# --- local servers (real sockets) ---------------------------------------------------------------
def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def tcp_server(reply: bytes | None = None):
    """A local TCP server on 127.0.0.1; answers every connection with ``reply`` (if any)."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    srv.settimeout(0.2)
    stop = threading.Event()
    seen: list[bytes] = []

    def serve():
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except OSError:
                continue
            with conn:
                conn.settimeout(1.0)
                if reply is not None:
                    with contextlib.suppress(OSError):
                        seen.append(conn.recv(1024))
                        conn.sendall(reply)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        yield srv.getsockname()[1], seen
    finally:
        stop.set()
        t.join(2)
        srv.close()


@pytest.fixture
def no_auth_env(monkeypatch, tmp_path):
    """WANDB_MODE unset, no API key, an empty netrc, no proxy."""
    for var in AUTH_VARS:
        monkeypatch.delenv(var, raising=False)
    netrc = tmp_path / "netrc"
    netrc.write_text("")
    monkeypatch.setenv("NETRC", str(netrc))
    return netrc


@pytest.fixture(scope="session")
def wandb_cfg(compose_cfg):
    def wandb_cfg_(tmp_path, logger="wandb", *overrides):
        cfg = compose_cfg(["task=glue/cola", f"logger={logger}", *overrides], output_dir=tmp_path)
        return cfg
    return wandb_cfg_


# --- mode detection -----------------------------------------------------------------------------
def test_no_api_key_goes_offline_with_one_warning_line(wandb_cfg, tmp_path, no_auth_env, caplog):
    cfg = wandb_cfg(tmp_path)
    assert cfg.logger.wandb.mode is None
    with caplog.at_level(logging.WARNING, logger="tasks.run.wandb_utils"):
        reason = wandb_utils.auto_offline(cfg)
    assert reason is not None and "no W&B API key" in reason
    assert cfg.logger.wandb.mode == "offline"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "\n" not in warnings[0]
    assert "W&B offline" in warnings[0] and "wandb sync" in warnings[0] and str(tmp_path) in warnings[0]


def test_api_key_but_unreachable_host_goes_offline(wandb_cfg, tmp_path, no_auth_env, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{_closed_port()}")
    cfg = wandb_cfg(tmp_path, "csv_wandb")
    t0 = time.monotonic()
    reason = wandb_utils.auto_offline(cfg)
    assert time.monotonic() - t0 < 3
    assert reason is not None and "not reachable" in reason
    assert cfg.logger.wandb.mode == "offline"
    assert "mode" not in cfg.logger.csv  # only the W&B logger is touched


def test_unresolvable_host_is_unreachable_within_the_timeout(no_auth_env):
    t0 = time.monotonic()
    assert not wandb_utils.host_reachable("https://no-such-host.invalid", timeout=1.0)
    assert time.monotonic() - t0 < 2.0


def test_netrc_entry_and_reachable_host_stay_online(wandb_cfg, tmp_path, no_auth_env, monkeypatch):
    with tcp_server() as (port, _):
        url = f"http://127.0.0.1:{port}"
        monkeypatch.setenv("WANDB_BASE_URL", url)
        assert wandb_utils.api_key_source(url) is None
        no_auth_env.write_text(f"machine 127.0.0.1:{port}\n  login user\n  password {'k' * 40}\n")
        assert wandb_utils.api_key_source(url) == str(no_auth_env)
        assert wandb_utils.host_reachable(url)
        cfg = wandb_cfg(tmp_path)
        assert wandb_utils.auto_offline(cfg) is None
        assert cfg.logger.wandb.mode is None  # left to wandb (online)
    # the same server gone: unreachable -> offline
    cfg = wandb_cfg(tmp_path)
    assert "not reachable" in wandb_utils.auto_offline(cfg)
    assert cfg.logger.wandb.mode == "offline"


@pytest.mark.parametrize("status,reachable", [(b"200 Connection established", True), (b"403 Forbidden", False)])
def test_through_a_proxy_the_connect_answer_decides(no_auth_env, monkeypatch, status, reachable):
    with tcp_server(b"HTTP/1.1 " + status + b"\r\n\r\n") as (port, seen):
        monkeypatch.setenv("https_proxy", f"http://127.0.0.1:{port}")
        assert wandb_utils.host_reachable("https://api.wandb.ai") is reachable
    assert seen and seen[0].startswith(b"CONNECT api.wandb.ai:443 HTTP/1.1")


@pytest.mark.parametrize("how", ["env", "mode", "offline"])
def test_an_explicit_choice_is_respected(wandb_cfg, tmp_path, no_auth_env, monkeypatch, how):
    overrides = {"env": [], "mode": ["logger.wandb.mode=online"], "offline": ["logger.wandb.offline=true"]}[how]
    if how == "env":
        monkeypatch.setenv("WANDB_MODE", "online")
    cfg = wandb_cfg(tmp_path, "wandb", *overrides)
    before = OmegaConf.to_container(cfg.logger)
    assert wandb_utils.auto_offline(cfg) is None
    assert OmegaConf.to_container(cfg.logger) == before


def test_without_a_wandb_logger_nothing_happens(wandb_cfg, tmp_path, no_auth_env):
    cfg = wandb_cfg(tmp_path, "csv")
    assert wandb_utils.auto_offline(cfg) is None
    assert "mode" not in cfg.logger.csv


# --- one tiny real run, offline by auto-detection ------------------------------------------------
@pytest.fixture(scope="module")
def offline_run(wandb_cfg, tmp_path_factory):
    root = os.environ.get("RMOE_DATA_DIR")
    if not root or not os.path.isdir(root):
        pytest.skip("RMOE_DATA_DIR is not set to the offline data folder")
    tmp = tmp_path_factory.mktemp("wandb_run")
    (tmp / "netrc").write_text("")
    out, logs = io.StringIO(), []
    handler = logging.Handler()
    handler.emit = lambda record: logs.append(record.getMessage())
    wlog = logging.getLogger("tasks.run.wandb_utils")
    with pytest.MonkeyPatch.context() as mp:
        for var in AUTH_VARS:
            mp.delenv(var, raising=False)
        mp.setenv("NETRC", str(tmp / "netrc"))
        mp.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{_closed_port()}")
        mp.setenv("WANDB_DIR", str(tmp))
        mp.setenv("WANDB_SILENT", "true")
        cfg = wandb_cfg(tmp / "run", "csv_wandb", "backbone=tiny_bert", "debug=fast", "moe=rmoe",
                        "callbacks.routing_stability.probe_every_n_steps=1", "tags=[offline_test]")
        wlog.addHandler(handler)
        try:
            t0 = time.monotonic()
            with contextlib.redirect_stdout(out):
                metrics, obj = train(cfg)
            seconds = time.monotonic() - t0
        finally:
            wlog.removeHandler(handler)
    run_dirs = sorted((tmp / "run" / "wandb").glob("offline-run-*"))
    assert len(run_dirs) == 1, run_dirs
    files = list(run_dirs[0].glob("*.wandb"))
    assert len(files) == 1, files
    return {"cfg": cfg, "obj": obj, "stdout": out.getvalue(), "logs": logs, "dir": run_dirs[0],
            "out_dir": tmp / "run", "records": read_finished_run(files[0]), "seconds": seconds}


def test_auto_offline_run_prints_the_sync_command(offline_run):
    assert offline_run["cfg"].logger.wandb.mode == "offline"
    assert any("no W&B API key" in m for m in offline_run["logs"]), offline_run["logs"]
    assert wandb.run is None  # finished
    lines = [ln for ln in offline_run["stdout"].splitlines() if "wandb sync" in ln]
    assert lines == [f"W&B offline run saved; upload it with: wandb sync {offline_run['dir']}"]


def test_history_has_routing_metrics_and_lambda_against_global_step(offline_run):
    rows = history_rows(offline_run["records"])
    keys = set().union(*rows)
    for k in ("load_cv", "max_vio", "load_entropy", "dead_experts", "active_experts", "experts_per_token",
              "router_entropy", "router_confidence", "aux_loss", "z_loss", "top1_flip_rate", "jaccard_churn",
              "fusion_drift", "fusion_entropy", "val_load_cv", "val_dead_experts"):
        assert f"routing/moe0/{k}" in keys, k
    assert "curriculum/lambda" in keys
    assert all("trainer/global_step" in r for r in rows if any(k.startswith("routing/") for k in r))
    # the same λ per step as the CSV logger wrote next to it
    wb = {r["trainer/global_step"]: r["curriculum/lambda"] for r in rows if "curriculum/lambda" in r}
    with open(offline_run["out_dir"] / "metrics.csv", newline="") as f:
        csv_lam = {int(r["step"]): float(r["curriculum/lambda"]) for r in csv.DictReader(f) if r["curriculum/lambda"]}
    assert len(wb) == 4 and wb == pytest.approx(csv_lam)
    # x-axis: Lightning's define_metric
    metrics = [r.metric for r in offline_run["records"] if r.WhichOneof("record_type") == "metric"]
    assert any(m.name == "trainer/global_step" for m in metrics)
    assert any(m.glob_name == "*" and m.step_metric == "trainer/global_step" for m in metrics)


def test_plots_are_logged_as_images(offline_run):
    plots = {p.stem for p in (offline_run["out_dir"] / "plots").glob("*.png")}
    assert {"load_heatmap_moe0", "lambda", "fluctuation_moe0", "fusion_pi_moe0"} <= plots
    rows = history_rows(offline_run["records"])
    logged = {k.removeprefix("plots/"): v for r in rows for k, v in r.items() if k.startswith("plots/")}
    assert set(logged) == plots
    for name, img in logged.items():
        assert img["_type"] == "images/separated" and img["count"] == 1
        path = offline_run["dir"] / "files" / img["filenames"][0]
        assert path.name.startswith(f"{name}_")
        assert path.parent == offline_run["dir"] / "files" / "media" / "images" / "plots"
        assert mpimg.imread(path).shape[:2] == (img["height"], img["width"])


def test_run_carries_project_group_tags_and_the_resolved_config(offline_run):
    run = [r.run for r in offline_run["records"] if r.WhichOneof("record_type") == "run"][0]
    # a debug=fast run: task_name (and so the W&B group) is debug/<task>
    assert (run.project, run.run_group, run.job_type) == ("rmoe", "debug/cola", "train")
    assert run.display_name == "rmoe-seed0"  # <variant>-seed<seed>, not W&B's random name
    assert list(run.tags) == ["offline_test"]
    config = config_updates(offline_run["records"])
    assert config["task_name"] == "debug/cola"
    assert config["moe"]["router"] == "topany" and config["logger"]["wandb"]["mode"] == "offline"
    assert config["paths"]["output_dir"] == str(offline_run["out_dir"])  # resolved, no ${...}
    assert "${" not in json.dumps(config)
    exits = [r.exit for r in offline_run["records"] if r.WhichOneof("record_type") == "exit"]
    assert len(exits) == 1 and exits[0].exit_code == 0


def test_multirun_jobs_are_named_by_variant_seed_and_job_and_grouped_by_sweep(compose_cfg, tmp_path):
    """In a multirun job (Hydra's config of the job set as Hydra sets it), the W&B name and group resolve from
    the variant, the seed, the job number and the sweep folder; a single run keeps task_name as its group."""
    from hydra.core.hydra_config import HydraConfig

    sweep = tmp_path / "logs" / "glue" / "rte" / "multiruns" / "2026-12-07_21-00-00_000001"
    cfg = compose_cfg(["task=glue/rte", "logger=wandb", "variant=rmoe_nofusion", "moe.fusion=null", "seed=2",
                       "hydra.mode=MULTIRUN", "hydra.job.num=5", f"hydra.sweep.dir={sweep}"], hydra=True)
    HydraConfig.instance().set_config(cfg)
    try:
        assert cfg.logger.wandb.name == "rmoe_nofusion-seed2-job5"
        assert cfg.logger.wandb.group == "glue/rte/2026-12-07_21-00-00_000001"
    finally:
        HydraConfig.instance().cfg = None
    assert not HydraConfig.initialized()
    assert cfg.logger.wandb.name == "rmoe_nofusion-seed2" and cfg.logger.wandb.group == "glue/rte"
