"""``python -m tasks.study.devlabels``: the GLUE dev label counts the report's gates read, on hand-made TSVs,
and the committed ``docs/results/glue_dev_labels.json`` against counts made independently (``awk``/``cut`` +
``uniq -c`` on the dev files: CoLA 322 / 721, MRPC 129 / 279, RTE 146 entailment / 131 not_entailment)."""

import json
from pathlib import Path

from tasks.study.devlabels import main

ROOT = Path(__file__).resolve().parents[3]


def test_counts_from_hand_made_dev_files(tmp_path):
    (tmp_path / "RTE").mkdir()
    (tmp_path / "RTE" / "dev.tsv").write_text("index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n"
                                              "1\tc\td\tnot_entailment\n2\te\tf\tentailment\n")
    (tmp_path / "CoLA").mkdir()
    (tmp_path / "CoLA" / "dev.tsv").write_text("s\t0\t*\tBad one.\ns\t1\t\tGood one.\n"
                                               "s\t1\t\tAnother.\ns\t1\t\tThird.\n")
    (tmp_path / "STS-B").mkdir()
    (tmp_path / "STS-B" / "dev.tsv").write_text("index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\t"
                                                "sentence2\tscore\n0\tg\tf\ty\t0\ts\ts\ta\tb\t5.000\n"
                                                "1\tg\tf\ty\t1\ts\ts\tc\td\t3.000\n")
    out = tmp_path / "labels.json"
    main(["--glue-dir", str(tmp_path), "--output", str(out), "--tasks", "rte", "cola", "stsb"])
    data = json.loads(out.read_text())["tasks"]
    assert data["rte"] == {"file": "RTE/dev.tsv", "n": 3, "labels": ["entailment", "not_entailment"], "counts": [2, 1]}
    assert data["cola"] == {"file": "CoLA/dev.tsv", "n": 4, "labels": ["0", "1"], "counts": [1, 3]}
    assert data["stsb"] == {"file": "STS-B/dev.tsv", "n": 2, "regression": True, "std": 1.0}  # scores 5 and 3


def test_committed_counts():
    data = json.loads((ROOT / "docs" / "results" / "glue_dev_labels.json").read_text())["tasks"]
    assert (data["cola"]["n"], data["cola"]["counts"]) == (1043, [322, 721])
    assert (data["mrpc"]["n"], data["mrpc"]["counts"]) == (408, [129, 279])
    assert (data["rte"]["n"], data["rte"]["counts"]) == (277, [146, 131])
    # std: awk -F'\t' 'NR>1{s+=$10; q+=$10*$10; n++} END{m=s/n; print n, sqrt(q/n-m*m)}' STS-B/dev.tsv
    assert data["stsb"] == {"file": "STS-B/dev.tsv", "n": 1500, "regression": True, "std": 1.499985}
