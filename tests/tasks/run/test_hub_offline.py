"""A hub backbone on a machine that cannot reach the hub: one line in seconds (HF_HUB_OFFLINE unset, the endpoint
a closed local port), or offline use of a cached copy; offline backbones never probe the hub."""

import os
import subprocess
import sys
import time
from pathlib import Path

from tasks.run.hub import hub_needs

ROOT = Path(__file__).resolve().parents[3]


def env_without_hub(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    env.update(HF_ENDPOINT="http://127.0.0.1:9", HF_HUB_CACHE=str(tmp_path / "hub"), HF_HOME=str(tmp_path / "hf"))
    return env


def test_a_hub_backbone_without_the_hub_fails_in_seconds_with_one_line(tmp_path):
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-X", "importtime", "-m", "tasks.train", "experiment=glue/cola_rmoe",
                        f"hydra.run.dir={tmp_path / 'run'}"], cwd=ROOT, env=env_without_hub(tmp_path),
                       capture_output=True, text=True, timeout=120)
    wall = time.perf_counter() - t0
    lines = [ln for ln in r.stderr.splitlines() if ln.strip() and not ln.startswith("import time:")]
    imported = {ln.split("|")[-1].strip() for ln in r.stderr.splitlines() if ln.startswith("import time:")}
    assert r.returncode == 2 and len(lines) == 1, r.stderr[-3000:]
    assert lines[0].startswith("rmoe-train: error: invalid config: backbone.pretrained='google-bert/bert-large-cased'")
    assert "unreachable (http://127.0.0.1:9" in lines[0] and "HF_HUB_OFFLINE=1 with a cached copy" in lines[0]
    assert "torch" not in imported and "transformers" not in imported
    assert wall < 20, wall  # was > 120 s of retries


def test_a_cached_copy_is_used_offline(tmp_path):
    snap = tmp_path / "hub" / "models--google-bert--bert-large-cased" / "snapshots" / "0123"
    snap.mkdir(parents=True)
    code = ("import os; from omegaconf import OmegaConf; from tasks.run.hub import preflight; "
            "preflight(OmegaConf.create({'backbone': {'pretrained': 'google-bert/bert-large-cased', "
            "'tokenizer': 'google-bert/bert-large-cased'}})); print(os.environ.get('HF_HUB_OFFLINE'))")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env_without_hub(tmp_path), capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["1"]


def test_which_configs_need_the_hub(compose_cfg):
    def needs(*overrides):
        return [(k, repo) for k, repo, _ in hub_needs(compose_cfg(list(overrides)))]

    assert needs("task=glue/rte", "backbone=tiny_bert") == []
    assert needs("task=glue/rte", "backbone=minilm_l6") == []  # pkg: a PyPI package
    assert needs("task=glue/rte", "backbone=bert_base_uncased") == [("backbone.pretrained",
                                                                   "google-bert/bert-base-uncased")]
    assert needs("task=glue/rte", "backbone=tiny_bert", "data.glue_dir=hub") == [("data.glue_dir", "nyu-mll/glue")]
    assert needs() == []  # the default run: RotatedDigits, a random-init ViT
    assert needs("experiment=domainbed/pacs_rmoe") == [("backbone.pretrained", None)]  # timm weights


def test_a_hub_backbones_depth_is_read_from_the_cached_config_without_transformers(tmp_path, monkeypatch):
    """The config checks read a hub backbone's layers and positions from the hub cache's config.json (the snapshot
    refs/main names), so a config error about them comes before transformers and torch are imported."""
    import json

    from tasks.run import checks, hub

    repo = tmp_path / "models--org--tiny-encoder"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    for rev, layers in (("abc123", 3), ("0old", 9)):
        (repo / "snapshots" / rev).mkdir(parents=True)
        (repo / "snapshots" / rev / "config.json").write_text(json.dumps(
            {"model_type": "bert", "num_hidden_layers": layers, "max_position_embeddings": 128}))
    monkeypatch.setattr(hub.hub_constants, "HF_HUB_CACHE", str(tmp_path))
    checks._hf_config.cache_clear()
    assert checks.backbone_geometry({"pretrained": "org/tiny-encoder", "tokenizer": "org/tiny-encoder"}) == (3, 128)
    assert checks.backbone_geometry({"pretrained": "org/absent", "tokenizer": "org/absent"}) == (None, None)
    checks._hf_config.cache_clear()
