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

def paired_table(labels: Sequence[str], rows: list[Sequence[str]]) -> list[str]:
    """A paired-differences table: three label columns, then mean diff, SE, n and the verdict."""
    if not rows:
        return ["No paired runs yet."]
    return md_table([*labels, "mean diff", "SE", "n", "verdict"], rows, "lllrrrl")


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
