"""The study report's text pieces: section headings and their anchors, durations, paired
differences and planned-run keys for people."""

from __future__ import annotations

import re
from collections.abc import Sequence

from tasks.results.labels import variant_label
from tasks.results.stats import Paired
from tasks.results.table import md_table

H_GLUE_BEST = "GLUE dev: best dev epoch (paper protocol)"
H_GLUE_HELD = "GLUE dev: epoch chosen on held-out data"
H_GLUE_PAIRED = "GLUE paired differences"
H_DB_PAIRED = "DomainBed paired differences"
H_STAB = "Routing stability at the end of training"
H_STAB_PAIRED = "Paired stability differences"
H_FIGS = "Figures"
H_FLOORS = "Models that learn: full-fine-tune ceilings and floors"
H_CEIL = "GLUE full fine-tune (the ceilings)"
H_FLOOR_TABLE = "Floors"
H_FLOOR_COST = "What a missed floor would take"
H_CHANGED = "What changed since the superseded study, and why"
H_CLAIMS = "The paper's claims at this scale"

#: Why the study was rerun (the fidelity fixes and the models that learn); the records' own reasons
#: (``meta.json`` ``superseded``) and settings (``shortened``, before and now) are added by the report.
CHANGES = [
    "**Stateful Fusion is fed the router's dispatch scores.** It was fed the wrong scores (the top-any "
    "router's sigmoid scores instead of its binary activations), so the fused routing weights did not "
    "follow the dispatch and RMoE behaved as DynMoE: the superseded study could not tell them apart by "
    "construction (SPEC §4).",
    "**The top-any router's gradient flows through its normaliser** (it was detached, SPEC §1).",
    "**Each baseline uses its paper protocol's λ**: a constant λ = 0.01 for the top-k MoE, DynMoE and the "
    "loss-free baseline on GLUE (only RMoE ramps it, SPEC §5); on DomainBed each method per "
    "`conf/protocol/domainbed/<method>.yaml`.",
    "**Models that learn.** The superseded study's models barely learned, so *within noise* said nothing "
    "about the methods. The training settings were changed "
    "identically for every method (below, before and now) and are checked against the floors in "
    "FLOORS_LINK: a full fine-tune of the same backbone gives each GLUE task's ceiling.",
    "**Power.** The plan has five seeds per GLUE cell (three for the ablations, now on every task), three trial seeds "
    "per DomainBed cell, the auxiliary-loss-free baseline (DeepSeek-V3) beside the paper's, and for each "
    "comparison the smallest difference the design can detect (2 SE) beside the paper's claimed gap.",
]


def paired_table(labels: Sequence[str], rows: list[Sequence[str]], power: bool = False) -> list[str]:
    """A paired-differences table: three label columns, then mean diff, SE, n, (``power``: the
    smallest detectable difference 2 SE and the paper's gap,) and the verdict."""
    if not rows:
        return ["No paired runs yet."]
    if power:
        return md_table([*labels, "mean diff", "SE", "n", "detectable (2 SE)", "paper", "verdict"], rows,
                        "lllrrrrrl")
    return md_table([*labels, "mean diff", "SE", "n", "verdict"], rows, "lllrrrl")


def fmt_power(p: Paired, gap: float | None, scale: float = 100.0) -> tuple[str, str]:
    """``("0.80", "+1.49")``: 2 SE of the paired difference (x ``scale``) and the paper's gap (points);
    ``—`` where undefined or not in the paper."""
    two_se = "—" if p.se is None or p.n < 2 else f"{2 * scale * p.se:.2f}"
    return two_se, "—" if gap is None else f"{gap:+.2f}"


def power_sentence(p: Paired, gap: float | None, unit: str = "points") -> str:
    """``"detectable ≥ 0.80 points, paper +1.49"`` (n < 2: no SE, nothing detectable)."""
    two_se, paper = fmt_power(p, gap)
    det = "no SE (n < 2)" if two_se == "—" else f"detectable ≥ {two_se} {unit}"
    return det + (", paper: no number" if gap is None else f", paper {paper}")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces -> '-'."""
    s = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return s.replace(" ", "-")


def link(heading: str) -> str:
    return f"[{heading}](#{slug(heading)})"


def fmt_duration(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    s = int(round(float(seconds)))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h} h {m:02d} min {sec:02d} s" if h else f"{m} min {sec:02d} s"


def fmt_diff(p: Paired, scale: float = 100.0, digits: int = 2) -> tuple[str, str, str]:
    if p.mean is None:
        return "—", "—", "0"
    mean = f"{scale * p.mean:+.{digits}f}"
    se = "—" if p.se is None else f"{scale * p.se:.{digits}f}"
    return mean, se, str(p.n)


def fmt_key(bench: str, key: tuple) -> str:
    """A planned-run key for people: ``cola/rmoe/seed 2``, ``RotatedMNIST/gmoe/test env 1/trial seed 0``."""
    if bench == "ceiling":
        return f"{key[0]}/lr {key[1]}"
    if bench == "glue":
        return f"{key[0]}/{key[1]}/seed {key[2]}"
    if len(key) == 4:
        return f"{key[0]}/{key[1]}/test env {key[2]}/trial seed {key[3]}"
    return "/".join(str(x) for x in key)


def diff_sentence(a: str, b: str, p: Paired, unit: str, scale: float = 100.0, digits: int = 2) -> str:
    mean, se, n = fmt_diff(p, scale, digits)
    if p.mean is None:
        return f"{variant_label(a)} − {variant_label(b)}: no paired runs"
    se_text = "" if p.se is None else f" ± {se}"
    unit = f" {unit}" if unit else ""
    return f"{variant_label(a)} − {variant_label(b)} = {mean}{se_text}{unit} (n = {n})"
