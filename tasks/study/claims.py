"""The paper's claims, each with a verdict from paired differences over seeds, and the minimum
detectable effect at 80 % power (:func:`tasks.study.power.mde`) beside the paper's gap
(:data:`tasks.study.data.PAPER`).

Only comparisons from tasks / datasets that passed their gate enter (:meth:`Report.verdict_tasks`,
:meth:`Report.db_verdict_datasets`). Each comparison is a two-sided paired t-test of method − baseline
(:func:`tasks.study.power.paired_p`); the p-values of one claim's comparisons are Holm-adjusted
(:func:`tasks.study.power.holm`). A comparison *holds* when its adjusted p < 0.05 and the difference
is in the claimed direction, is *against* when adjusted p < 0.05 the other way, else *within noise*; a
claim holds when all its comparisons hold, does not hold when any is against, and otherwise cannot be
told at this scale.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from tasks.results.labels import bench_label, glue_task_label, variant_label
from tasks.results.selection import IIDAccuracySelectionMethod, Record
from tasks.results.stats import Paired, direction_verdict

from .data import ABLATIONS, DB_COMPARISONS, GLUE_COMPARISONS, Study, db_paired, paper_gaps_text
from .power import ALPHA, fmt_p, holm_verdicts, mde
from .text import (
    H_CLAIMS,
    H_DB_PAIRED,
    H_FIGS,
    H_FLOORS,
    H_GLUE_BEST,
    H_GLUE_PAIRED,
    H_STAB,
    H_STAB_PAIRED,
    diff_sentence,
    link,
    power_sentence,
)


class Report(Protocol):
    """What the claims read of :class:`tasks.study.report.Report` (written here: the report imports the claims)."""

    s: Study
    db_records: list[Record]
    db_datasets: list[str]
    db_envs: dict[str, list[int]]

    @property
    def superseded(self) -> list[str]: ...
    def is_superseded(self, bench: str) -> bool: ...
    def glue_tasks(self) -> list[str]: ...
    def verdict_tasks(self) -> list[str]: ...
    def out_of_verdicts(self) -> str: ...
    def db_verdict_datasets(self) -> list[str]: ...
    def glue_comparisons(self, selection: str, pairs: Sequence[tuple[str, str]], tasks: Sequence[str] | None = None
                         ) -> list[tuple[str, str, Paired, dict[str, Paired]]]: ...
    def glue_pooled_gap(self, a: str, b: str, per: dict[str, Paired], tasks: Sequence[str] | None = None
                        ) -> float | None: ...
    def glue_all_tasks(self, selection: str, pairs: Sequence[tuple[str, str]]
                       ) -> list[tuple[str, str, Paired, float | None]]: ...
    def stability_pairs(self, extra: bool = True, gated: bool = False) -> list[tuple[str, str, str, str, Paired]]: ...


@dataclass
class Comparison:
    text: str
    paired: Paired
    sign: int = 1  # the claimed sign of method − baseline
    verdict: str = "no data"  # holds | against | within noise | no data (set by :func:`holm_family`)
    p_adj: float | None = None


def holm_family(comps: Sequence[Comparison]) -> list[Comparison]:
    """Set each comparison's verdict and Holm-adjusted p over the claim's comparisons (in place)."""
    for c, (v, p) in zip(comps, holm_verdicts([(c.paired, c.sign) for c in comps])):
        c.verdict, c.p_adj = v, p
    return list(comps)


def join_comparisons(comps: Sequence[Comparison]) -> str:
    """``"A − B = +1.20 ± 0.40 points (n = 9) [...] (Holm p = 0.020): holds; ..."`` (without data: the text)."""
    if all(c.verdict == "no data" and c.paired.n == 0 for c in comps):
        return "no paired runs"
    parts = [c.text if c.verdict == "no data" else f"{c.text} (Holm p = {fmt_p(c.p_adj)}): {c.verdict}"
             for c in comps]
    return "; ".join(parts) or "no paired runs"


def family_note(comps: Sequence[Comparison]) -> str:
    k = sum(c.verdict != "no data" for c in comps)
    if k == 0:
        return "This claim rests on no comparison with data. "
    return (f"This claim rests on {k} comparison{'s' if k != 1 else ''}; Holm's correction is applied over "
            f"{'them' if k != 1 else 'it (one comparison: none needed)'} (family-wise α = {ALPHA}). ")


def claim_verdict(comps: Sequence[Comparison], empty: str = "no paired runs") -> str:
    vs = [c.verdict for c in comps]
    if not vs or all(v == "no data" for v in vs):
        return f"cannot tell at this scale ({empty})"
    if any(v == "against" for v in vs):
        return "does not hold"
    if all(v == "holds" for v in vs):
        return "holds"
    k = sum(v == "holds" for v in vs)
    return f"cannot tell at this scale ({k} of {len(vs)} comparisons significant in the claimed direction)"


def power_summary(comps: Sequence[tuple[str, str, Paired, float | None]], scale_only: bool = False) -> str:
    """Whether the design could see gaps of the paper's size: each comparison's minimum detectable effect
    at 80 % power against the paper's gap (comparisons without an SE or a paper number are left out);
    ``scale_only``: comparisons that give no verdict, just the count."""
    seen = [100 * d < abs(gap) for _, _, p, gap in comps if (d := mde(p)) is not None and gap is not None]
    if not seen:
        return ""
    if scale_only:
        return f"Pooled so, {sum(seen)} of {len(seen)} MDEs are below the paper's gap. "
    if all(seen):
        return ("Every comparison's MDE at 80 % power is below the paper's gap: a gap of the paper's size would "
                "have shown. ")
    if not any(seen):
        return ("No comparison's MDE at 80 % power is below the paper's gap: this design would likely miss a gap of "
                "the paper's size. ")
    return (f"{sum(seen)} of {len(seen)} comparisons have an MDE at 80 % power below the paper's gap: only those "
            "could have shown a gap of the paper's size. ")


def claims_section(self: Report) -> list[str]:
    rule = ("Rule used for every verdict: only tasks and datasets that passed their gate enter "
            f"(see {link(H_FLOORS)}). Each comparison is a two-sided paired t-test of method − baseline over seeds "
            "paired by seed (t = mean / SE, n − 1 degrees of freedom); the p-values of one claim's comparisons are "
            "adjusted by Holm's step-down method. A comparison *holds* when its adjusted p < 0.05 and the "
            "difference is in the claimed direction, is *against* when adjusted p < 0.05 the other way, and is "
            "*within noise* otherwise. A claim **holds** when all of its comparisons hold, **does not hold** when "
            "any comparison is against, and otherwise we **cannot tell at this scale**. Beside each comparison: its "
            "minimum detectable effect (MDE) at 80 % power and two-sided α = 0.05, (t₀.₉₇₅,ₙ₋₁ + t₀.₈,ₙ₋₁) · SE — "
            "a true difference of that size is found 80 % of the time (2 SE, the significance threshold, only about "
            "half the time) — and the paper's claimed gap (SPEC §5).")
    if self.superseded and all(self.is_superseded(b) for b in self.s.benchmarks()):
        return [f"## {H_CLAIMS}", "", "Withheld: the records below were made with the "
                "superseded methods (see the note at the top).", ""]
    lines = [f"## {H_CLAIMS}", "", rule, ""]
    withheld = "Withheld: the {} records were made with the superseded methods (see the note at the top)."
    tasks = self.verdict_tasks()
    out = self.out_of_verdicts()
    # why a claim has no comparison with data: no task in the verdict, or too few paired seeds in those that are
    no_task = "no GLUE task passed its gate" if not tasks else "fewer than two paired seeds"
    task_note = ("Tasks in the verdict: " + (", ".join(glue_task_label(t) for t in tasks) or "none") + out + ". ")

    # 1. GLUE
    head1 = ("**1. RMoE beats the MoE baseline (the released scripts' cosine router) and DynMoE on GLUE dev "
             "(paper: on every task).** ")
    if self.is_superseded("glue"):
        lines += [head1 + withheld.format("GLUE"), ""]
    else:
        best = self.glue_comparisons("best_dev", GLUE_COMPARISONS[::-1])
        comps = holm_family([Comparison(diff_sentence(a, b, p, "points")
                                        + f" [{power_sentence(p, self.glue_pooled_gap(a, b, per))}]", p)
                             for a, b, p, per in best])
        held = [diff_sentence(a, b, p, "points") + f" ({direction_verdict(p)} by the 2-SE screen)"
                for a, b, p, _ in self.glue_comparisons("heldout", GLUE_COMPARISONS[::-1]) if p.n]
        extra = ("With the epoch chosen on held-out data instead (not used for the verdict): "
                 + "; ".join(held) + ". ") if held else ""
        power = power_summary([(a, b, p, self.glue_pooled_gap(a, b, per)) for a, b, p, per in best])
        if set(tasks) != set(self.glue_tasks()):
            every = self.glue_all_tasks("best_dev", GLUE_COMPARISONS[::-1])
            power += ("For scale only, pooled over every task whatever its gate (no verdict): "
                      + "; ".join(f"{variant_label(a)} − {variant_label(b)} {power_sentence(p, gap)}"
                                  for a, b, p, gap in every) + ". " + power_summary(every, scale_only=True))
        lines += [head1 + task_note + "Paired over (task, seed), best dev epoch, each method at its kept learning "
                  "rate: " + join_comparisons(comps) + ". " + extra + power + family_note(comps)
                  + f"Verdict: **{claim_verdict(comps, no_task)}** (see {link(H_GLUE_PAIRED)}, {link(H_GLUE_BEST)}).",
                  ""]
    # 2. DomainBed
    datasets = ", ".join(self.db_datasets) or "no dataset"
    head2 = (f"**2. RMoE beats GMoE and DynMoE on DomainBed (paper: PACS, VLCS, OfficeHome, DomainNet; here "
             f"{datasets}).** ")
    if self.is_superseded("domainbed"):
        lines += [head2 + withheld.format("DomainBed"), ""]
    else:
        gated = self.db_verdict_datasets()
        left = [d for d in self.db_datasets if d not in gated]
        comps, pw = [], []
        for a, b in DB_COMPARISONS:
            _, pooled = db_paired(self.db_records, IIDAccuracySelectionMethod, a, b, gated, self.db_envs)
            comps.append(Comparison(diff_sentence(a, b, pooled, "points") + f" [{power_sentence(pooled, None)}]",
                                    pooled))
            pw.append(f"{variant_label(a)} − {variant_label(b)}: {paper_gaps_text('domainbed', a, b)}")
        holm_family(comps)
        no_dataset = "no DomainBed dataset passed its floors" if not gated else "fewer than two paired trial seeds"
        lines += [head2 + "Datasets in the verdict: " + (", ".join(gated) or "none")
                  + (" (left out, a dense floor missed: " + ", ".join(left) + ")" if left else "") + ". "
                  + "Test-domain accuracy under training-domain validation, mean over test domains "
                  "per trial seed, paired over (dataset, trial seed): " + join_comparisons(comps)
                  + ". The paper reports no number for these datasets; its gaps on its own datasets, in points: "
                  + "; ".join(pw) + ". " + family_note(comps)
                  + f"Verdict: **{claim_verdict(comps, no_dataset)}** "
                  f"(see {link(H_DB_PAIRED)}).", ""]
    # 3. stability
    comps = []
    for b, base, _key, label, p in self.stability_pairs(extra=False, gated=True):
        if p.n == 0 or self.is_superseded(b):
            continue
        same = " (identical in every pair)" if p.mean == 0 and p.se == 0 else ""
        comps.append(Comparison(f"{bench_label(b)} {label} "
                                + diff_sentence("rmoe", base, p, "", scale=1.0, digits=4) + same, p, -1))
    holm_family(comps)
    lines += ["**3. Regulation makes routing more stable: lower routing fluctuation, fewer dead experts, "
              "more balanced load than the baselines.** End-of-training values, RMoE − baseline paired by run "
              "condition (lower = more stable; the paper gives no number to compare with), only from cells that "
              "passed their gate (GLUE tasks: " + (", ".join(glue_task_label(t) for t in tasks) or "none")
              + "; DomainBed datasets: " + (", ".join(self.db_verdict_datasets()) or "none") + "): "
              + join_comparisons(comps) + ". " + family_note(comps)
              + f"Verdict: **{claim_verdict(comps, 'no cell passed its gate')}** (see {link(H_STAB_PAIRED)}, "
              f"{link(H_STAB)} and the probe flip-rate figure under {link(H_FIGS)}).", ""]
    # 4. ablations
    head4 = ("**4. Both mechanisms contribute (the paper calls Phased Curriculum and Stateful Fusion "
             "synergistic): full RMoE beats RMoE without Stateful Fusion and RMoE without the curriculum.** ")
    if self.is_superseded("glue"):
        lines += [head4 + withheld.format("GLUE"), ""]
    else:
        ablations = self.glue_comparisons("best_dev", ABLATIONS)
        comps = holm_family([Comparison(diff_sentence(a, b, p, "points") + f" [{power_sentence(p, None)}]", p)
                             for a, b, p, _ in ablations])
        abl_tasks = [glue_task_label(t) for t in tasks
                     if any(per.get(t) is not None and per[t].n > 0 for _, _, _, per in ablations)]
        lines += [head4 + f"GLUE dev, best dev epoch, paired over (task, seed) on {', '.join(abl_tasks) or 'no task'}"
                  + out + ": " + join_comparisons([c for c in comps if c.verdict != "no data"])
                  + ". The paper gives no ablation number in SPEC or this code to set beside these. "
                  + family_note(comps)
                  + f"Verdict: **{claim_verdict(comps, no_task)}** (see {link(H_GLUE_PAIRED)}).", ""]
    return lines
