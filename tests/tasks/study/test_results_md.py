"""docs/RESULTS.md is exactly what the documented command regenerates from docs/results/."""

import filecmp
from pathlib import Path

import pytest

from tasks.study.report import main as study_report

ROOT = Path(__file__).resolve().parents[3]


@pytest.mark.skipif(not (ROOT / "docs" / "results").is_dir(), reason="no study records committed yet")
def test_committed_results_md_is_regenerated_byte_for_byte(tmp_path):
    out = tmp_path / "RESULTS.md"
    # python -m tasks.study_report docs/results --output docs/RESULTS.md (plots beside it, in plots/)
    study_report([str(ROOT / "docs" / "results"), "--output", str(out)])
    assert out.read_bytes() == (ROOT / "docs" / "RESULTS.md").read_bytes()
    for png in (ROOT / "docs" / "plots").glob("*.png"):
        assert (tmp_path / "plots" / png.name).is_file(), png.name
    assert filecmp.dircmp(tmp_path / "plots", ROOT / "docs" / "plots").left_only == []
