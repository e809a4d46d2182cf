"""Strict reader for the original GLUE TSV files.

Files must be UTF-8 text (a gzip-compressed or otherwise non-UTF-8 file fails naming the file, the
line and the byte). Rows are split on tabs with ``csv.QUOTE_NONE`` (MRPC and others contain
unbalanced ``"``). Every row must have as many fields as the header (headerless CoLA: exactly 4 --
an extra tab inside a sentence would otherwise cut it); labels must be in the task's label set
(STS-B: a float in ``[0, 5]``); sentences must not be empty (QQP, whose official file has a few
empty questions: those rows are dropped with one warning giving their count). Any violation raises
:class:`GlueDataError` naming the file, the 1-based line and the offending key.
"""

from __future__ import annotations

import csv
import io
import math
import os
import sys
import warnings

from .tasks import GlueDataError, GlueTask

csv.field_size_limit(min(sys.maxsize, 2**31 - 1))


def task_file(glue_dir: str, task: GlueTask, stem: str) -> str:
    """``<glue_dir>/<TaskDir>/<stem>.tsv``; fails naming the path when it does not exist."""
    path = os.path.join(glue_dir, task.dir_name, f"{stem}.tsv")
    if not os.path.isfile(path):
        raise GlueDataError(f"GLUE file not found: {path} (task {task.name!r} needs {stem}.tsv in "
                            f"{os.path.join(glue_dir, task.dir_name)}; set data.glue_dir to the folder holding "
                            f"{task.dir_name}/, or data.glue_dir=hub to use the hub dataset nyu-mll/glue)")
    return path


def _parse_label(task: GlueTask, raw: str, where: str, key: str) -> int | float:
    raw = raw.strip()
    if task.labels is None:
        try:
            value = float(raw)
        except ValueError:
            value = float("nan")
        if not (math.isfinite(value) and 0.0 <= value <= 5.0):
            raise GlueDataError(f"{where}: malformed row: {key}={raw!r}; allowed: a number in [0, 5]")
        return value
    if raw not in task.labels:
        raise GlueDataError(f"{where}: malformed row: {key}={raw!r}; allowed: {'|'.join(task.labels)}")
    return task.labels.index(raw)


def read_text(path: str) -> str:
    """The file as UTF-8 text (BOM dropped); fails naming the file, line and byte when it is not."""
    with open(path, "rb") as f:
        data = f.read()
    if data[:2] == b"\x1f\x8b":
        raise GlueDataError(f"{path}: a gzip-compressed file, not a TSV text file; allowed: the decompressed "
                            "UTF-8 .tsv (gunzip it first)")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        col = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise GlueDataError(f"{path}:{line}: not UTF-8 text: byte 0x{data[e.start]:02x} at column {col} ({e.reason}); "
                            "allowed: UTF-8 text (re-encode the file, e.g. iconv -f latin1 -t utf-8)") from None


def read_glue_tsv(path: str, task: GlueTask) -> dict[str, list]:
    """Read one split into ``{"text_a": [...], "text_b": [...] (pairs only), "label": [...]}``."""
    a_col, b_col, y_col = task.columns
    out: dict[str, list] = {"text_a": [], "label": []}
    if b_col is not None:
        out["text_b"] = []
    empty: list[int] = []
    with io.StringIO(read_text(path), newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        width = None
        if task.header:
            try:
                header = next(reader)
            except StopIteration:
                raise GlueDataError(f"{path}:1: empty file; expected a header with columns "
                                    f"{[c for c in task.columns if c is not None]}") from None
            header = [h.strip() for h in header]
            missing = [c for c in task.columns if c is not None and c not in header]
            if missing:
                raise GlueDataError(f"{path}:1: header has no column {missing[0]!r}; header is {header}")
            width = len(header)
            a_i, y_i = header.index(a_col), header.index(y_col)
            b_i = header.index(b_col) if b_col is not None else None
            names = {a_i: a_col, y_i: y_col, b_i: b_col}
        else:
            a_i, b_i, y_i = a_col, b_col, y_col
            names = {a_i: f"column {a_i} (sentence)", y_i: f"column {y_i} (label)", b_i: f"column {b_i}"}
            width = task.n_fields
        need = max(i for i in (a_i, b_i, y_i) if i is not None) + 1
        for row in reader:
            line = reader.line_num
            where = f"{path}:{line}"
            if not row or (len(row) == 1 and not row[0].strip()):
                continue
            if width is not None and len(row) != width:
                what = "the header's columns" if task.header else f"{task.dir_name}'s fields; a tab inside a sentence?"
                raise GlueDataError(f"{where}: malformed row: {len(row)} tab-separated fields, expected "
                                    f"{width} ({what})")
            if len(row) < need:
                raise GlueDataError(f"{where}: malformed row: {len(row)} tab-separated fields, expected at "
                                    f"least {need}")
            label = _parse_label(task, row[y_i], where, names[y_i])
            blank = [(names[i], row[i]) for i in (a_i, b_i) if i is not None and not row[i].strip()]
            if blank:
                if not task.empty_text_warns:
                    raise GlueDataError(f"{where}: malformed row: {blank[0][0]}={blank[0][1]!r} is empty; "
                                        "allowed: a non-empty sentence")
                empty.append(line)
                continue
            out["label"].append(label)
            out["text_a"].append(row[a_i])
            if b_i is not None:
                out["text_b"].append(row[b_i])
    if empty:
        warnings.warn(f"{path}: dropped {len(empty)} row(s) with an empty sentence (first at line {empty[0]})",
                      stacklevel=2)
    if not out["label"]:
        raise GlueDataError(f"{path}: no data rows")
    return out
