"""The nine GLUE tasks: their files, text fields, label sets and headline metrics.

One :class:`GlueTask` record per task; :func:`get_task` is the only lookup and fails with the
allowed names. The local layout is the original GLUE TSV distribution
(``<glue_dir>/<TaskDir>/{train,dev}.tsv``; MNLI has ``dev_matched.tsv`` and ``dev_mismatched.tsv``).
"""

from __future__ import annotations

from dataclasses import dataclass


class GlueDataError(ValueError):
    """Bad GLUE input (unknown task, missing file, malformed row); the message names file/line/key."""


@dataclass(frozen=True)
class GlueTask:
    """A GLUE task.

    ``columns``: the TSV columns holding (text_a, text_b, label) — names for files with a header,
    integer positions for headerless files (CoLA). ``labels``: the label strings in class-index
    order, or ``None`` for regression (STS-B, scores in ``[0, 5]``). ``hub_fields``: the column
    names of the same task in the hub dataset ``nyu-mll/glue``. ``val_splits``: local file stem ->
    hub split, the first is the headline split.
    """

    name: str
    dir_name: str
    columns: tuple
    header: bool
    labels: tuple[str, ...] | None
    hub_fields: tuple[str, str | None]
    val_splits: tuple[tuple[str, str], ...] = (("dev", "validation"),)
    headline: str = "acc"
    # headerless files: the exact number of tab-separated fields of a row (CoLA: 4)
    n_fields: int | None = None
    # rows with an empty sentence are dropped with a warning (count + first line) instead of failing:
    # only where the official files contain such rows (QQP's question2)
    empty_text_warns: bool = False

    @property
    def is_regression(self) -> bool:
        return self.labels is None

    @property
    def num_labels(self) -> int:
        return 1 if self.labels is None else len(self.labels)

    @property
    def has_text_b(self) -> bool:
        return self.columns[1] is not None


_BIN = ("0", "1")
_NLI2 = ("entailment", "not_entailment")

TASKS: dict[str, GlueTask] = {
    t.name: t
    for t in (
        GlueTask("cola", "CoLA", (3, None, 1), False, _BIN, ("sentence", None), headline="mcc", n_fields=4),
        GlueTask("sst2", "SST-2", ("sentence", None, "label"), True, _BIN, ("sentence", None)),
        GlueTask("mrpc", "MRPC", ("#1 String", "#2 String", "Quality"), True, _BIN,
                 ("sentence1", "sentence2"), headline="acc_f1"),
        GlueTask("qqp", "QQP", ("question1", "question2", "is_duplicate"), True, _BIN,
                 ("question1", "question2"), headline="acc_f1", empty_text_warns=True),
        GlueTask("stsb", "STS-B", ("sentence1", "sentence2", "score"), True, None,
                 ("sentence1", "sentence2"), headline="pearson_spearman"),
        GlueTask("mnli", "MNLI", ("sentence1", "sentence2", "gold_label"), True,
                 ("entailment", "neutral", "contradiction"), ("premise", "hypothesis"),
                 val_splits=(("dev_matched", "validation_matched"), ("dev_mismatched", "validation_mismatched"))),
        GlueTask("qnli", "QNLI", ("question", "sentence", "label"), True, _NLI2, ("question", "sentence")),
        GlueTask("rte", "RTE", ("sentence1", "sentence2", "label"), True, _NLI2, ("sentence1", "sentence2")),
        GlueTask("wnli", "WNLI", ("sentence1", "sentence2", "label"), True, _BIN, ("sentence1", "sentence2")),
    )
}


def get_task(name: str) -> GlueTask:
    """The task record for ``name`` (case-insensitive); unknown names fail listing the allowed ones."""
    key = str(name).lower().replace("-", "")
    if key not in TASKS:
        raise GlueDataError(f"unknown GLUE task data.task={name!r}; allowed: {'|'.join(TASKS)}")
    return TASKS[key]
