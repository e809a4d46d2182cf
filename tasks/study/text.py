"""The study report's text pieces: section headings and their anchors, durations, paired
differences and planned-run keys for people."""

from __future__ import annotations

import re
from collections.abc import Sequence

from tasks.results.labels import variant_label
from tasks.results.stats import Paired
from tasks.results.table import md_table

from .power import mde

H_GLUE_BEST = "GLUE dev: best dev epoch (paper protocol)"
H_GLUE_HELD = "GLUE dev: epoch chosen on held-out data"
H_GLUE_PAIRED = "GLUE paired differences"
H_DB_PAIRED = "DomainBed paired differences"
H_STAB = "Routing stability at the end of training"
H_STAB_PAIRED = "Paired stability differences"
H_FIGS = "Figures"
H_FLOORS = "Models that learn: gates, ceilings and floors"
H_CEIL = "GLUE full fine-tune (the ceilings)"
H_FLOOR_TABLE = "Floors"
H_GATES = "GLUE gates: did the dense model learn?"
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
    "comparison what the design can detect beside the paper's claimed gap (2 SE in version 2; the minimum "
    "detectable effect at 80 % power since, above).",
]

#: What changed in the records since study version 2, and why (the settings before and now are added by the
#: report from meta.json). Pilot numbers: ``python docs/pilots/show.py ...`` on the records in docs/pilots.
V3_CHANGES = [
    "*Models that learn.* An audit of the version-2 records found that almost no model had learned (MRPC's runs a "
    "constant guess, RTE at chance, CoLA's dense model below its gate, dense RotatedMNIST 54.2 %). Version 3 is "
    "sized by dense pilot runs whose records are committed in `docs/pilots/`: GLUE trains on the full training "
    "sets for 3 epochs (CoLA's dense pilot: 26.4 at its best epoch against its gate of 22.9; STS-B's: 85.6); "
    "DomainBed trains 1,500 steps on 20,000 digits (dense RotatedMNIST: 87.0 % average test accuracy at step "
    "1,500 of a 2,000-step pilot, floor 85).",
    "*Tasks.* Every method runs on CoLA and STS-B (STS-B is not in the paper's table: the backbone is a "
    "sentence-similarity model and learns it quickly) and on RotatedMNIST. Where no verdict can be drawn only "
    "the dense model runs, so the gate table shows the miss from study records: MRPC (at version 2's setting "
    "the dense model was a constant guess; a setting that closes its gate is the full fine-tune, whose cost "
    "is below) and ColoredMNIST (its dense pilot reached 61.5 % / 63.8 % on +90 % / +80 % after 2,000 steps, "
    "floor 65). RTE stays only in the ceiling: its full fine-tune does not learn it.",
    "*The paper's MoE row as released.* The MoE baseline is the released GLUE scripts' cosine router "
    "(`moe=moe_cosine`, E = 8, k = 2), not the textbook top-k router.",
    "*Degenerate runs are recorded, not reconstructed.* Every GLUE evaluation records its prediction spread "
    "(`pred_top_share`, for regression `pred_std`).",
]

#: What changed in the report (not the records) since study version 2, and why: an audit recomputed every
#: figure from the records and found that almost no model learned and that the power was overstated.
REPORT_CHANGES = [
    "*Gates.* Version 2 checked the dense models against 90 % of the full fine-tune's score: MRPC's floor (74.9) "
    "sat at its constant answer's score (74.8), RTE's (49.7) below chance, which a constant predictor passes, "
    "and CoLA stayed in the verdicts though it missed. Now every GLUE table shows the dev set's "
    "constant-prediction score beside the dense row, flags "
    "degenerate runs (≥ 98 % of the dev predictions one class, reconstructed from the recorded metrics), and a "
    "task enters a verdict only when its dense model beats the constant score by 3 of the dev set's SEs and "
    "recovers 80 % of the full fine-tune's gain; the stability claim uses only the cells that passed, and the "
    "DomainBed datasets only when their dense floors hold.",
    "*Power.* Version 2 called 2 SE \"the smallest difference the design can detect\" and wrote that a gap of "
    "the paper's size would have shown; 2 SE is the significance threshold, at which a true effect is found about "
    "half the time. Each comparison now shows its minimum detectable effect at 80 % power (t-based, its own n), "
    "and \"would have shown\" is said only where that is below the paper's gap.",
    "*Multiplicity.* Version 2 judged each comparison alone by |mean| > 2 SE; each claim's comparisons are now "
    "paired t-tests with Holm's correction over the claim, and the number of comparisons each claim rests on is "
    "stated.",
    "*Costs.* The cost of a missed floor used the fastest ceiling job and the dense job time for every method; it "
    "now uses the mean of the ceiling's jobs and each method's own measured job-time ratio (GLUE) or seconds per "
    "step (DomainBed).",
]


def paired_table(labels: Sequence[str], rows: list[Sequence[str]], power: bool = False) -> list[str]:
    """A paired-differences table: three label columns, then mean diff, SE, n, (``power``: the
    minimum detectable effect at 80 % power and the paper's gap,) and the verdict."""
    if not rows:
        return ["No paired runs yet."]
    if power:
        return md_table([*labels, "mean diff", "SE", "n", "MDE (80 % power)", "paper", "verdict"], rows,
                        "lllrrrrrl")
    return md_table([*labels, "mean diff", "SE", "n", "verdict"], rows, "lllrrrl")


def fmt_power(p: Paired, gap: float | None, scale: float = 100.0) -> tuple[str, str]:
    """``("1.49", "+1.79")``: the minimum detectable effect at 80 % power, two-sided α = 0.05, of the
    paired difference (:func:`tasks.study.power.mde`, x ``scale``) and the paper's gap (points); ``—``
    where undefined or not in the paper."""
    d = mde(p)
    return "—" if d is None else f"{scale * d:.2f}", "—" if gap is None else f"{gap:+.2f}"


def power_sentence(p: Paired, gap: float | None, unit: str = "points") -> str:
    """``"MDE at 80 % power 1.49 points, paper +1.79"`` (n < 2: no SE, nothing detectable)."""
    det, paper = fmt_power(p, gap)
    det = "no SE (n < 2)" if det == "—" else f"MDE at 80 % power {det} {unit}"
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
