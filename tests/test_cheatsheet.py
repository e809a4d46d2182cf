"""Every ``rmoe-train`` / ``rmoe-eval`` command of the README's bash blocks and of ``rmoe-train --help``'s examples
composes as written (what ``--cfg job`` does: the same config dirs, names and overrides, each of a multirun's
sweeps at its first and last values) and passes the config checks that ``rmoe-train`` runs before training."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from tasks.run.checks import ConfigError, check_config, check_overrides
from tasks.train import CONF_DIR

ROOT = Path(__file__).resolve().parents[1]
PLACEHOLDERS = {"<run>": "/nonexistent/run", "<dir>": "/nonexistent/export", "<time>": "2026-01-01_00-00-00",
                "<team>": "team", "$t": "rte"}


def _commands_in(text: str) -> list[str]:
    text = text.replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        code = re.split(r"(?:^|\s)#", line)[0]  # a comment may mention a command: not one
        m = re.search(r"\b(rmoe-(?:train|eval))\b(.*)", code)
        if not m or "`" in code:
            continue
        prog, rest = m.group(1), m.group(2).split(";")[0]
        for alt in rest.split(" | "):
            out.append(f"{prog} {alt.strip()}".strip())
    return out


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    return [c for b in blocks for c in _commands_in(b)]


def help_commands() -> list[str]:
    footer = OmegaConf.load(Path(CONF_DIR) / "train.yaml").hydra.help.footer
    return _commands_in(footer.split("Examples:", 1)[1].split("Sweeps", 1)[0])


def _expand(overrides: list[str]) -> list[list[str]]:
    """A multirun's overrides at the first and at the last value of every sweep."""
    parsed = OverridesParser.create().parse_overrides(overrides)
    firsts, lasts = [], []
    for o in parsed:
        if o.is_sweep_override():
            values = list(o.sweep_string_iterator())
            firsts.append(f"{o.get_key_element()}={values[0]}")
            lasts.append(f"{o.get_key_element()}={values[-1]}")
        else:
            firsts.append(o.input_line)
            lasts.append(o.input_line)
    return [firsts] if firsts == lasts else [firsts, lasts]


@pytest.fixture(scope="session")
def compose_command(compose_cfg):
    def compose_command_(command: str) -> list:
        for k, v in PLACEHOLDERS.items():
            command = command.replace(k, v)
        command = os.path.expandvars(command)
        prog, *args = shlex.split(command)
        config_dir, config_name, overrides = CONF_DIR, "train" if prog == "rmoe-train" else "eval", []
        it = iter(args)
        for a in it:
            if a in ("-m", "--multirun", "..."):
                continue
            if a == "-cd":  # rmoe-train's own config dir stays on the search path (train.yaml)
                config_dir = str(ROOT / next(it))  # (compose_cfg keeps conf/ on the search path)
            elif a == "-cn":
                config_name = next(it)
            elif a in ("--cfg", "--info"):
                assert next(it) in ("job", "defaults", "all", "hydra")
            else:
                assert "=" in a, f"{command!r}: {a!r} is no override"
                overrides.append(a)
        cfgs = []
        for ov in _expand(overrides):
            cfg = compose_cfg(ov, config_name=config_name, config_dir=config_dir)
            check_config(cfg)
            check_overrides(cfg, ov)
            cfgs.append(cfg)
        return cfgs
    return compose_command_


def test_the_extractor_finds_the_commands():
    readme, helps = readme_commands(), help_commands()
    assert len(readme) >= 25 and len(helps) >= 8
    assert "rmoe-train --info defaults" in readme and "rmoe-train experiment=glue/cola_rmoe" in helps
    assert any("glue_methods task=glue/$t" in c for c in readme)


@pytest.mark.parametrize("command", sorted(set(readme_commands() + help_commands())))
def test_every_documented_command_composes_and_passes_the_checks(compose_command, monkeypatch, command):
    monkeypatch.setenv("RMOE_DATA_DIR", os.environ.get("RMOE_DATA_DIR") or "/nonexistent/data")
    assert compose_command(command)


def test_fusion_decay_line_sets_it_on_a_protocol_with_fusion(compose_command):
    line = next(c for c in readme_commands() if "moe.fusion.ema_decay=0.9" in c)
    (cfg,) = compose_command(line)
    assert cfg.moe.fusion.ema_decay == 0.9 and cfg.curriculum.lambda_min == 1e-4 and cfg.moe.fusion.update_in_eval


def test_plus_fusion_decay_on_a_protocol_without_fusion_is_refused(compose_cfg):
    cfg = compose_cfg(["moe=rmoe", "+moe.fusion.ema_decay=0.9"])
    assert cfg.moe.fusion == {"ema_decay": 0.9}  # Hydra's hint composes: fusion on with the decay only
    with pytest.raises(ConfigError, match=r"moe.fusion=\{'ema_decay': 0.9\} \(missing agg, update_in_eval, mix_al"):
        check_config(cfg)
    full = compose_cfg(["moe=rmoe", "variant=rmoe_fusion",
                        "moe.fusion={ema_decay: 0.9, agg: sum, update_in_eval: false, mix_alpha: 1.0}"])
    check_config(full)


def test_the_fusion_line_runs_through_the_cli_with_cfg_job():
    line = next(c for c in readme_commands() if "moe.fusion.ema_decay=0.9" in c)
    args = shlex.split(line)[1:]
    r = subprocess.run([sys.executable, "-m", "tasks.train", *args, "--cfg", "job"], cwd=ROOT, capture_output=True,
                       text=True, timeout=120, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "ema_decay: 0.9" in r.stdout
