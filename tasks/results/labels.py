"""The one labels / display-order list: methods (variants), GLUE tasks, DomainBed datasets and their
test domains, benchmarks. Every table and report sorts and labels through these functions.

A table *row* may be a method with the overrides that set it apart (``"rmoe [moe.fusion.ema_decay=0.9]"``,
see :mod:`tasks.results.grouping`): it sorts after its method and is labelled by the method's label
followed by the bracket.
"""

from __future__ import annotations

from collections.abc import Iterable

#: Row order of methods: this platform's ``moe`` / ``variant`` names with DomainBed-style names beside
#: them; ablations (``rmoe_*``) follow ``rmoe``; other names follow alphabetically.
VARIANT_ORDER = ("ERM", "MoE", "dense", "moe_cosine", "moe_topk", "GMoE", "gmoe", "DynMoE", "dynmoe", "dynmoe_released",
                 "lossfree", "RMoE", "rmoe", "rmoe_released", "rmoe_nofusion", "rmoe_nocurriculum")
VARIANT_LABELS = {"dense": "Dense", "moe_cosine": "MoE (cosine)", "moe_topk": "MoE (top-k)", "gmoe": "GMoE",
                  "dynmoe": "DynMoE", "rmoe": "RMoE", "lossfree": "Loss-free",
                  "dynmoe_released": "DynMoE (released code)", "rmoe_released": "RMoE (released code)",
                  "rmoe_nofusion": "RMoE w/o fusion", "rmoe_nocurriculum": "RMoE w/o curriculum",
                  "ERM": "ERM", "MoE": "MoE", "GMoE": "GMoE", "DynMoE": "DynMoE", "RMoE": "RMoE"}
#: Column order of GLUE tasks: the paper's table (CoLA, MRPC, QNLI, MNLI, RTE), then the others.
GLUE_TASK_ORDER = ("cola", "mrpc", "qnli", "mnli", "rte", "sst2", "stsb", "qqp", "wnli")
GLUE_TASK_LABELS = {"cola": "CoLA", "mrpc": "MRPC", "qnli": "QNLI", "mnli": "MNLI", "rte": "RTE", "sst2": "SST-2",
                    "stsb": "STS-B", "qqp": "QQP", "wnli": "WNLI"}
#: DomainBed datasets in display order and the names of their domains (= ``ENVIRONMENTS`` of the
#: dataset classes in :mod:`tasks.domainbed.datasets`; a test checks they agree).
DATASET_ENVIRONMENTS: dict[str, tuple[str, ...]] = {
    "ColoredMNIST": ("+90%", "+80%", "-90%"),
    "RotatedMNIST": ("0", "15", "30", "45", "60", "75"),
    "RotatedDigits": ("0", "15", "30", "45", "60", "75"),
    "VLCS": ("C", "L", "S", "V"),
    "PACS": ("A", "C", "P", "S"),
    "OfficeHome": ("A", "C", "P", "R"),
    "TerraIncognita": ("L100", "L38", "L43", "L46"),
    "DomainNet": ("clip", "info", "paint", "quick", "real", "sketch"),
}
BENCH_ORDER = ("glue", "domainbed", "ceiling")
BENCH_LABELS = {"glue": "GLUE", "domainbed": "DomainBed", "ceiling": "GLUE full fine-tune (ceiling)"}


def _split_row(name: str) -> tuple[str, str]:
    base, sep, rest = str(name).partition(" [")
    return base, (sep + rest if sep else "")


def _override_key(rest: str) -> tuple:
    """Sort key of ``" [a=1e-3, b=0.9]"``: per override its key, then numbers by value, others as text."""
    out = []
    for item in rest.strip(" []").split(", ") if rest else []:
        k, _, v = item.partition("=")
        try:
            out.append((k, 0, float(v), v))
        except ValueError:
            out.append((k, 1, 0.0, v))
    return tuple(out)


def variant_label(v: str) -> str:
    """``"rmoe"`` -> ``"RMoE"``; ``"rmoe [moe.fusion.ema_decay=0.9]"`` -> ``"RMoE [moe.fusion.ema_decay=0.9]"``."""
    base, rest = _split_row(v)
    return VARIANT_LABELS.get(base, base) + rest


def sort_variants(names: Iterable[str]) -> list[str]:
    """Known methods in :data:`VARIANT_ORDER`, then others alphabetically; a row with overrides
    directly after its method."""
    def key(n: str) -> tuple:
        base, rest = _split_row(n)
        known = base in VARIANT_ORDER
        return (0 if known else 1, VARIANT_ORDER.index(base) if known else 0, base, _override_key(rest))

    return sorted(set(names), key=key)


def sort_glue_tasks(names: Iterable[str]) -> list[str]:
    names = set(names)
    return [t for t in GLUE_TASK_ORDER if t in names] + sorted(n for n in names if n not in GLUE_TASK_ORDER)


def glue_task_label(t: str) -> str:
    return GLUE_TASK_LABELS.get(t, t)


def sort_datasets(names: Iterable[str]) -> list[str]:
    names = set(names)
    return [d for d in DATASET_ENVIRONMENTS if d in names] + sorted(n for n in names if n not in DATASET_ENVIRONMENTS)


def sort_benchmarks(names: Iterable[str]) -> list[str]:
    names = set(names)
    return [b for b in BENCH_ORDER if b in names] + sorted(names - set(BENCH_ORDER))


def bench_label(b: str) -> str:
    return BENCH_LABELS.get(b, b)


def task_order(bench: str, names: Iterable[str]) -> list[str]:
    """Column order of a benchmark's tasks (GLUE: the paper's; otherwise alphabetical)."""
    return sort_glue_tasks(names) if bench == "glue" else sorted(names)


def task_label(bench: str, task: str) -> str:
    return glue_task_label(task) if bench == "glue" else task


def environment_names(dataset: str, n_envs: int | None = None) -> list[str]:
    """The domain names of ``dataset``; an unknown dataset: ``"0" .. str(n_envs - 1)``."""
    if dataset in DATASET_ENVIRONMENTS:
        return list(DATASET_ENVIRONMENTS[dataset])
    if n_envs is None:
        raise ValueError(f"unknown DomainBed dataset {dataset!r} and no environment count")
    return [str(i) for i in range(n_envs)]
