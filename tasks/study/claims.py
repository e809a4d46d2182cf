"""The paper's claims, each with a verdict from paired differences over seeds.

A comparison *holds* when its paired difference (method − baseline) lies more than 2 SE from zero in
the claimed direction (:func:`tasks.results.stats.direction_verdict`), is *against* beyond 2 SE the
other way, else *within noise*; a claim holds when all its comparisons hold, does not hold when any
is against, and otherwise cannot be told at this scale.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tasks.results.labels import bench_label, glue_task_label, sort_glue_tasks
from tasks.results.selection import IIDAccuracySelectionMethod
from tasks.results.stats import direction_verdict

from .data import ABLATIONS, DB_COMPARISONS, GLUE_COMPARISONS, db_paired
from .text import H_DB_PAIRED, H_FIGS, H_GLUE_BEST, H_GLUE_PAIRED, H_STAB, H_STAB_PAIRED, diff_sentence, link

if TYPE_CHECKING:
    from .report import Report


@dataclass
class Comparison:
    text: str
    verdict: str  # holds | against | within noise | no data


def join_comparisons(comps: Sequence[Comparison]) -> str:
    """``"A − B = +1.20 ± 0.40 points (n = 9): holds; ..."`` (comparisons without data: just their text)."""
    parts = [c.text if c.verdict == "no data" else f"{c.text}: {c.verdict}" for c in comps]
    return "; ".join(parts) or "no paired runs"


def claim_verdict(comps: Sequence[Comparison]) -> str:
    vs = [c.verdict for c in comps]
    if not vs or all(v == "no data" for v in vs):
        return "cannot tell at this scale (no paired runs)"
    if any(v == "against" for v in vs):
        return "does not hold"
    if all(v == "holds" for v in vs):
        return "holds"
    k = sum(v == "holds" for v in vs)
    return f"cannot tell at this scale ({k} of {len(vs)} comparisons beyond noise in the claimed direction)"


def claims_section(self: Report) -> list[str]:
    rule = ("Rule used for every verdict: a comparison *holds* when its paired difference (method − baseline, "
            "over seeds paired by seed) lies more than 2 SE from zero in the claimed direction, is *against* "
            "when it lies more than 2 SE from zero the other way, and is *within noise* otherwise. A claim "
            "**holds** when all of its comparisons hold, **does not hold** when any comparison is against, "
            "and otherwise we **cannot tell at this scale**. With three seeds the 2-SE rule is a lenient "
            "screen, not a significance test.")
    lines = ["## The paper's claims at this scale", "", rule, ""]
    if self.superseded:
        return ["## The paper's claims at this scale", "", "Withheld: the records below were made with the "
                "superseded methods (see the note at the top).", ""]

    # 1. GLUE
    comps = [Comparison(diff_sentence(a, b, p, "points"), direction_verdict(p))
             for a, b, p, _ in self.glue_comparisons("best_dev", GLUE_COMPARISONS[::-1])]
    held = [diff_sentence(a, b, p, "points") + f" ({direction_verdict(p)})"
            for a, b, p, _ in self.glue_comparisons("heldout", GLUE_COMPARISONS[::-1]) if p.n]
    extra = ("With the epoch chosen on held-out data instead (not used for the verdict): "
             + "; ".join(held) + ". ") if held else ""
    lines += ["**1. RMoE beats the top-k MoE baseline and DynMoE on GLUE dev (paper: on every task).** "
              "Paired over (task, seed), best dev epoch, each method at its kept learning rate: "
              + join_comparisons(comps) + ". " + extra
              + f"Verdict: **{claim_verdict(comps)}** (see {link(H_GLUE_PAIRED)}, {link(H_GLUE_BEST)}).", ""]
    # 2. DomainBed
    comps = []
    for a, b in DB_COMPARISONS:
        _, pooled = db_paired(self.db_records, IIDAccuracySelectionMethod, a, b, self.db_datasets, self.db_envs)
        comps.append(Comparison(diff_sentence(a, b, pooled, "points"), direction_verdict(pooled)))
    datasets = ", ".join(self.db_datasets) or "no dataset"
    lines += [f"**2. RMoE beats GMoE and DynMoE on DomainBed (paper: PACS, VLCS, OfficeHome, DomainNet; here "
              f"{datasets}).** Test-domain accuracy under training-domain validation, mean over test domains "
              "per trial seed, paired over (dataset, trial seed): "
              + join_comparisons(comps) + f". Verdict: **{claim_verdict(comps)}** (see {link(H_DB_PAIRED)}).", ""]
    # 3. stability
    comps = []
    for b, base, _key, label, p in self.stability_pairs():
        if p.n == 0:
            continue
        same = " (identical in every pair)" if p.mean == 0 and p.se == 0 else ""
        comps.append(Comparison(f"{bench_label(b)} {label} "
                                + diff_sentence("rmoe", base, p, "", scale=1.0, digits=4) + same,
                                direction_verdict(p, -1)))
    lines += ["**3. Regulation makes routing more stable: lower routing fluctuation, fewer dead experts, "
              "more balanced load than the baselines.** End-of-training values, RMoE − baseline paired by run "
              "condition (lower = more stable): "
              + join_comparisons(comps)
              + f". Verdict: **{claim_verdict(comps)}** (see {link(H_STAB_PAIRED)}, {link(H_STAB)} and the "
              f"probe flip-rate figure under {link(H_FIGS)}).", ""]
    # 4. ablations
    ablations = self.glue_comparisons("best_dev", ABLATIONS)
    comps = [Comparison(diff_sentence(a, b, p, "points"), direction_verdict(p)) for a, b, p, _ in ablations]
    abl_tasks = [glue_task_label(t) for t in sort_glue_tasks({t for _, _, _, per in ablations
                                                              for t, q in per.items() if q.n > 0})]
    lines += ["**4. Both mechanisms contribute (the paper calls Phased Curriculum and Stateful Fusion "
              "synergistic): full RMoE beats RMoE without Stateful Fusion and RMoE without the curriculum.** "
              f"GLUE dev, best dev epoch, paired over (task, seed) on {', '.join(abl_tasks) or 'no task'}: "
              + join_comparisons([c for c in comps if c.verdict != "no data"])
              + f". Verdict: **{claim_verdict(comps)}** (see {link(H_GLUE_PAIRED)}).", ""]
    return lines
