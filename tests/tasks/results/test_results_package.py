"""The layering and the shared schema of ``tasks/results``."""

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

from callbacks.records import SUMMARY_KEYS, summary_record
from tasks.domainbed.datasets import DATASETS
from tasks.results.labels import DATASET_ENVIRONMENTS, sort_variants, variant_label
from tasks.results.stats import mean_se

ROOT = Path(__file__).resolve().parents[3]


def test_callbacks_never_import_tasks():
    for path in sorted((ROOT / "callbacks").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            assert not any(n == "tasks" or n.startswith("tasks.") for n in names), (path.name, names)


def test_the_results_package_and_the_study_report_do_not_import_torch():
    code = ("import sys, tasks.collect, tasks.results.collect, tasks.study.report, tasks.glue.report\n"
            "assert 'torch' not in sys.modules and 'lightning' not in sys.modules, "
            "sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'lightning'))")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))


def test_dataset_environment_labels_match_the_dataset_classes():
    assert list(DATASET_ENVIRONMENTS) == list(DATASETS)
    for name, cls in DATASETS.items():
        assert DATASET_ENVIRONMENTS[name] == tuple(cls.ENVIRONMENTS), name


def test_summary_record_has_exactly_the_schema_fields():
    rec = summary_record(variant="rmoe", seed=0)
    assert tuple(rec) == SUMMARY_KEYS and rec["variant"] == "rmoe" and rec["lr"] is None
    with pytest.raises(KeyError, match="varaint"):
        summary_record(varaint="rmoe")


def test_one_se_convention_sample_std_over_sqrt_n():
    # 1, 2, 4: mean 7/3, deviations -4/3 -1/3 5/3, sum of squares 42/9, s² = 21/9, SE = sqrt(21/9 / 3)
    m, se, n = mean_se([1.0, 2.0, 4.0])
    assert n == 3 and m == pytest.approx(7 / 3) and se == pytest.approx((21 / 27) ** 0.5)


def test_rows_sort_after_their_method_and_keep_its_label():
    rows = ["rmoe [moe.fusion.ema_decay=0.99]", "dense", "rmoe_nofusion", "rmoe", "rmoe [moe.fusion.ema_decay=0.9]",
            "zzz"]
    assert sort_variants(rows) == ["dense", "rmoe", "rmoe [moe.fusion.ema_decay=0.9]",
                                   "rmoe [moe.fusion.ema_decay=0.99]", "rmoe_nofusion", "zzz"]
    assert variant_label("rmoe [moe.fusion=null]") == "RMoE [moe.fusion=null]"
