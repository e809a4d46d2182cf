"""rmoe-eval on a real tiny run: the best epoch's logged metrics reproduced exactly, GLUE submission files,
the save_pretrained-style export, test=true, and the refused train=false (real runs, no mocks)."""

import csv
import hashlib
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf

from tasks.glue.predict import (
    format_prediction,
    glue_test_splits,
    read_glue_test_tsv,
    write_submission,
)
from tasks.glue.tasks import GlueDataError, get_task
from tasks.job import train

BIN = os.path.dirname(sys.executable)
RUN_ARGS = ["task=glue/rte", "backbone=tiny_bert", "debug=fast", "moe=rmoe", "moe.fusion.update_in_eval=false",
            "trainer.max_epochs=3", "data.heldout_samples=16", "module.lr=1e-3"]


def cli(name, module, args, cwd, timeout=600):
    exe = shutil.which(name, path=BIN)
    cmd = [exe] if exe else [sys.executable, "-m", module]
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="offline")
    return subprocess.run([*cmd, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def best_ckpt(run):
    found = sorted((run / "checkpoints").glob("best_*.ckpt"))
    assert len(found) == 1, found
    return found[0]


def epoch_row(run, epoch):
    rows = [r for r in read_csv(run / "metrics.csv") if r.get("val/score") and int(r["epoch"]) == epoch]
    assert len(rows) == 1
    return rows[0]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """rmoe-train: tiny BERT + RMoE (fusion frozen in eval) on RTE, 3 debug epochs, a 16-row held-out slice."""
    if not os.path.isdir(os.path.join(os.environ.get("RMOE_DATA_DIR", ""), "glue")):
        pytest.skip("RMOE_DATA_DIR is not set to the offline data folder")
    root = tmp_path_factory.mktemp("eval")
    out = root / "run"
    r = cli("rmoe-train", "tasks.train", [*RUN_ARGS, f"hydra.run.dir={out}"], root)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def glue_with_test(run, tmp_path_factory):
    """A GLUE folder: RTE's train/dev and a labelled test.tsv in GLUE's test layout (index column, rows in
    reverse index order), the first 37 dev rows."""
    src = os.path.join(os.environ["RMOE_DATA_DIR"], "glue", "RTE")
    d = tmp_path_factory.mktemp("glue") / "RTE"
    d.mkdir()
    for stem in ("train", "dev"):
        os.symlink(os.path.join(src, f"{stem}.tsv"), d / f"{stem}.tsv")
    with open(os.path.join(src, "dev.tsv"), encoding="utf-8") as f:
        lines = f.read().splitlines()
    rows = [ln.split("\t") for ln in lines[1:38]]
    body = [f"{36 - i}\t{r[1]}\t{r[2]}\t{r[3]}" for i, r in enumerate(rows)]
    (d / "test.tsv").write_text("index\tsentence1\tsentence2\tlabel\n" + "\n".join(body) + "\n", encoding="utf-8")
    return d.parent, rows


def test_rmoe_eval_reproduces_the_best_epochs_logged_metrics_exactly(run):
    ckpt = best_ckpt(run)
    epoch = int(ckpt.stem.removeprefix("best_epoch"))
    records = {n: digest(run / n) for n in ("done", "summary.json", "metrics.csv", ".hydra/config.yaml")}
    r = cli("rmoe-eval", "tasks.eval", [f"ckpt_path={ckpt}"], run.parent)
    assert r.returncode == 0, r.stderr[-3000:]
    rec = json.loads((run / "eval" / f"{ckpt.stem}.json").read_text())
    assert rec["epoch"] == epoch and rec["config"] == str(run / ".hydra" / "config.yaml")
    got = rec["metrics"]
    want = {k: float(v) for k, v in epoch_row(run, epoch).items()
            if v and k.startswith(("val/", "val_heldout/")) and k != "val/score_best"}
    assert {"val/score", "val/loss", "val_heldout/score", "val_heldout/loss"} <= set(want)
    assert set(got) == set(want)
    for k in want:
        assert got[k] == want[k], k  # exact: the same batches, weights and buffers as the logged validation
    summary = json.loads((run / "summary.json").read_text())
    logged = next(e for e in summary["epochs"] if e["epoch"] == epoch)
    assert got["val/loss"] == logged["dev"]["loss"] and got["val_heldout/loss"] == logged["heldout"]["loss"]
    # the best checkpoint, not the last one: the last epoch logged another dev loss
    last = float(epoch_row(run, 2)["val/loss"])
    assert epoch == 2 or got["val/loss"] != last
    assert "val/score" in r.stdout and f"{got['val/score']:.6g}" in r.stdout
    # the run's own records are untouched
    assert {n: digest(run / n) for n in records} == records


def test_predict_writes_glue_submission_file_and_labelled_test_metrics(run, glue_with_test, tmp_path):
    from transformers import AutoTokenizer

    from tasks.glue.export import load_pretrained

    glue_dir, rows = glue_with_test
    ckpt = best_ckpt(run)
    export = tmp_path / "export"
    r = cli("rmoe-eval", "tasks.eval", [f"ckpt_path={ckpt}", "predict=true", f"export={export}",
                                        f"data.glue_dir={glue_dir}"], run.parent)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = (run / "predictions" / "RTE.tsv").read_text().splitlines()
    assert lines[0] == "index\tprediction"
    assert len(lines) == 1 + 37
    body = [ln.split("\t") for ln in lines[1:]]
    assert [b[0] for b in body] == [str(36 - i) for i in range(37)]  # the test file's order, its indices
    assert {b[1] for b in body} <= {"entailment", "not_entailment"}
    # independently: the exported model, one example at a time, no batching or padding
    model = load_pretrained(export)
    tok = AutoTokenizer.from_pretrained(export)
    labels = get_task("rte").labels
    with torch.no_grad():
        expect = [labels[int(model(dict(tok(a, b, truncation=True, max_length=128, return_tensors="pt")))
                                .argmax(-1))] for _, a, b, _ in rows]
    assert [b[1] for b in body] == expect
    # the labelled test file gives test/acc: the fraction of predicted label names equal to the file's labels
    rec = json.loads((run / "eval" / f"{ckpt.stem}.json").read_text())
    assert rec["predictions"] == {"RTE": str(run / "predictions" / "RTE.tsv")}
    assert rec["metrics"]["test/acc"] == pytest.approx(sum(e == r[3] for e, r in zip(expect, rows)) / 37, abs=1e-7)
    # the same dev metrics as without the test file
    assert rec["metrics"]["val/loss"] == float(epoch_row(run, rec["epoch"])["val/loss"])


def test_export_and_load_pretrained_give_identical_logits(run, tmp_path):
    import hydra
    from transformers import AutoTokenizer

    from rmoe import find_moe_layers
    from tasks.glue.export import load_pretrained

    export = tmp_path / "export"
    r = cli("rmoe-eval", "tasks.eval", [f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}", "validate=false",
                                        f"export={export}"], run.parent)
    assert r.returncode == 0, r.stderr[-3000:]
    names = set(os.listdir(export))
    assert {"config.json", "model.safetensors", "rmoe_config.json", "tokenizer.json"} <= names
    meta = json.loads((export / "rmoe_config.json").read_text())
    assert meta["moe_layers"] == [1] and meta["task"] == "rte" and meta["labels"] == ["entailment", "not_entailment"]
    assert meta["moe_layer_config"]["router"] == "topany" and meta["moe_layer_config"]["fusion"]["ema_decay"] == 0.99
    loaded = load_pretrained(export)
    # the reference: the run's own module with the checkpoint's state
    cfg = OmegaConf.load(run / ".hydra" / "config.yaml")
    ref = hydra.utils.instantiate(cfg.module, _convert_="all")
    state = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    ref.load_state_dict(state)
    ref.eval()
    assert loaded.state_dict().keys() == ref.state_dict().keys()
    m = [k for k in state if k.endswith("fusion.m")]
    assert m and float(state[m[0]].abs().sum()) > 0 and torch.equal(loaded.state_dict()[m[0]], state[m[0]])
    assert len(find_moe_layers(loaded)) == 1 and not loaded.training
    tok = AutoTokenizer.from_pretrained(export)
    batch = dict(tok(["A man is playing a guitar.", "Two dogs run."], ["Someone plays music.", "Cats sleep."],
                     padding=True, return_tensors="pt"))
    with torch.no_grad():
        a, b = loaded(batch), ref(batch)
        fresh = hydra.utils.instantiate(cfg.module, _convert_="all").eval()(batch)
    assert torch.equal(a, b)
    assert not torch.equal(a, fresh)  # the comparison can fail: an unloaded model gives other logits


def test_rmoe_eval_refuses_another_runs_config_and_warns_for_moving_fusion_state(compose_cfg, run):
    from tasks.evaluation import (
        EvalConfigError,
        eval_config,
        evaluate,
        register_eval_resolvers,
        run_choice_overrides,
    )

    register_eval_resolvers()
    ckpt = best_ckpt(run)
    choices = run_choice_overrides(ckpt)
    assert "task=glue/rte" in choices and "backbone=tiny_bert" in choices and "debug=fast" in choices

    def eval_cfg(*overrides):
        given = {o.split("=")[0] for o in overrides}
        injected = [c for c in choices if c.split("=")[0] not in given and "run_config=null" not in overrides]
        cfg = compose_cfg([*injected, f"ckpt_path={ckpt}", *overrides], config_name="eval", output_dir=run)
        return eval_config(cfg, list(overrides), groups=("task", "backbone", "moe", "trainer", "data", "module"))

    with pytest.raises(EvalConfigError, match="task: checkpoint 'rte', config 'cola'"):
        evaluate(eval_cfg("run_config=null", "task=glue/cola", "backbone=tiny_bert", "debug=fast"), write=False)
    with pytest.raises(EvalConfigError, match="override 'task=glue/cola' changes the config group 'task'"):
        eval_cfg("task=glue/cola")
    with pytest.warns(UserWarning, match="update_in_eval=true: the fusion state"):
        rec = evaluate(eval_cfg("moe.fusion.update_in_eval=true"), write=False)
    assert rec["metrics"]["val/acc"] >= 0


def test_rmoe_eval_without_ckpt_path_fails_naming_it(tmp_path):
    r = cli("rmoe-eval", "tasks.eval", ["task=glue/rte"], tmp_path)
    assert r.returncode == 2 and "ckpt_path is mandatory" in r.stderr
    assert os.listdir(tmp_path) == []


def test_train_false_is_refused_naming_the_keys(compose_cfg, run, tmp_path):
    r = cli("rmoe-train", "tasks.train", ["train=false", "task=glue/rte", f"paths.log_dir={tmp_path / 'logs'}"],
            tmp_path)
    assert r.returncode == 2
    assert "train=false with ckpt_path=null" in r.stderr and "rmoe-eval ckpt_path=" in r.stderr
    ckpt = best_ckpt(run)
    before = {n: digest(run / n) for n in ("done", ".hydra/config.yaml", ".hydra/overrides.yaml")}
    r = cli("rmoe-train", "tasks.train", ["train=false", f"ckpt_path={ckpt}"], tmp_path)
    assert r.returncode == 2 and f"rmoe-eval ckpt_path={ckpt}" in r.stderr
    assert {n: digest(run / n) for n in before} == before  # the run folder is not touched
    assert not os.path.exists(tmp_path / "logs")
    cfg = compose_cfg(["task=glue/rte", "backbone=tiny_bert", "train=false"])
    with pytest.raises(ValueError, match=r"train=false with ckpt_path=null .*allowed: train=true"):
        train(cfg)


def test_test_true_evaluates_the_best_checkpoint_after_fitting(compose_cfg, glue_with_test, tmp_path):
    glue_dir, _ = glue_with_test
    cfg = compose_cfg([*RUN_ARGS, "trainer.max_epochs=2", "test=true", f"data.glue_dir={glue_dir}"],
                      output_dir=tmp_path)
    metrics, objects = train(cfg)
    rec = objects["eval"]
    ckpt = best_ckpt(tmp_path)
    assert rec["ckpt_path"] == str(ckpt) and rec["path"] == str(tmp_path / "eval" / f"{ckpt.stem}.json")
    row = epoch_row(tmp_path, rec["epoch"])
    assert rec["metrics"]["val/loss"] == float(row["val/loss"])
    assert rec["metrics"]["val_heldout/loss"] == float(row["val_heldout/loss"])
    assert metrics["test/acc"] == rec["metrics"]["test/acc"]  # labelled test file: test/* in the run's metrics
    assert not (tmp_path / "predictions").exists()


# --- the submission format and the test-file reader, on small files ----------------------------------------
def test_submission_label_names_and_file_names():
    assert [format_prediction(get_task("cola"), i) for i in (0, 1)] == ["0", "1"]
    assert [format_prediction(get_task("mrpc"), i) for i in (0, 1)] == ["0", "1"]
    assert [format_prediction(get_task("rte"), i) for i in (0, 1)] == ["entailment", "not_entailment"]
    assert [format_prediction(get_task("qnli"), i) for i in (0, 1)] == ["entailment", "not_entailment"]
    assert [format_prediction(get_task("mnli"), i) for i in (0, 1, 2)] == ["entailment", "neutral", "contradiction"]
    assert format_prediction(get_task("stsb"), 3.14159) == "3.142"
    assert [(s.stem, s.name) for s in glue_test_splits(get_task("mnli"))] == [
        ("test_matched", "MNLI-m"), ("test_mismatched", "MNLI-mm")]
    assert [s.name for t in ("cola", "sst2", "mrpc", "qqp", "stsb", "qnli", "rte", "wnli")
            for s in glue_test_splits(get_task(t))] == ["CoLA", "SST-2", "MRPC", "QQP", "STS-B", "QNLI", "RTE", "WNLI"]


def test_write_submission_rows_in_order(tmp_path):
    p = write_submission(tmp_path / "STS-B.tsv", get_task("stsb"), ["2", "0", "1"], [4.25, 0.5, 1.0])
    assert p.read_text() == "index\tprediction\n2\t4.250\n0\t0.500\n1\t1.000\n"
    with pytest.raises(ValueError, match="2 predictions for 3 test rows"):
        write_submission(tmp_path / "x.tsv", get_task("stsb"), ["2", "0", "1"], [4.25, 0.5])


def test_read_glue_test_files_in_glues_layouts(tmp_path):
    cola = tmp_path / "cola.tsv"
    cola.write_text("index\tsentence\n0\tThe dog barked.\n1\tDog the barked.\n", encoding="utf-8")
    got = read_glue_test_tsv(str(cola), get_task("cola"))
    assert got == {"index": ["0", "1"], "text_a": ["The dog barked.", "Dog the barked."], "label": None}
    qqp = tmp_path / "qqp.tsv"
    qqp.write_text("id\tquestion1\tquestion2\n7\tWhy?\t\n", encoding="utf-8")  # empty question kept
    got = read_glue_test_tsv(str(qqp), get_task("qqp"))
    assert got["index"] == ["7"] and got["text_b"] == [""] and got["label"] is None
    bad = tmp_path / "rte.tsv"
    bad.write_text("index\tsentence1\tsentence2\n0\ta\tb\n1\ta\n", encoding="utf-8")
    with pytest.raises(GlueDataError, match=r"rte.tsv:3: malformed row: 2 tab-separated fields, expected 3"):
        read_glue_test_tsv(str(bad), get_task("rte"))
    bad.write_text("index\tsentence1\tsentence2\n0\ta\tb\n0\tc\td\n", encoding="utf-8")
    with pytest.raises(GlueDataError, match=r"rte.tsv:3: malformed row: index='0' repeats line 2"):
        read_glue_test_tsv(str(bad), get_task("rte"))
    bad.write_text("sentence1\tsentence2\na\tb\n", encoding="utf-8")
    with pytest.raises(GlueDataError, match=r"rte.tsv:1: header has no index column; allowed: one of"):
        read_glue_test_tsv(str(bad), get_task("rte"))
    bad.write_text("index\tsentence1\tsentence2\tlabel\n0\ta\tb\tmaybe\n", encoding="utf-8")
    with pytest.raises(GlueDataError, match=r"rte.tsv:2: malformed row: label='maybe'; allowed: entailment\|"):
        read_glue_test_tsv(str(bad), get_task("rte"))


# --- predict without a test file, dev-set predictions, saying when there are no test metrics ----------------
def test_predict_true_without_a_test_file_is_one_clear_line(run):
    r = cli("rmoe-eval", "tasks.eval", [f"ckpt_path={best_ckpt(run)}", "predict=true"], run.parent)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    line = next(ln for ln in r.stderr.splitlines() if ln.startswith("rmoe-eval: error:"))
    assert "predict=true: no GLUE test file test.tsv in" in line and "allowed: predict=dev" in line


def test_predict_dev_writes_every_dev_rows_prediction_and_label(run):
    ckpt = best_ckpt(run)
    r = cli("rmoe-eval", "tasks.eval", [f"ckpt_path={ckpt}", "predict=dev", "trainer.limit_val_batches=1.0",
                                        f"eval_dir={run / 'eval_dev'}"], run.parent)
    assert r.returncode == 0, r.stderr[-3000:]
    path = run / "predictions" / "RTE-dev.tsv"
    with open(path, newline="") as f:
        rows = list(csv.reader(f, delimiter="\t"))
    with open(os.path.join(os.environ["RMOE_DATA_DIR"], "glue", "RTE", "dev.tsv"), encoding="utf-8") as f:
        dev = [ln.split("\t") for ln in f.read().splitlines()[1:] if ln.strip()]
    assert rows[0] == ["index", "prediction", "label"] and len(rows) - 1 == len(dev) == 277
    assert [r[0] for r in rows[1:]] == [str(i) for i in range(len(dev))]
    assert [r[2] for r in rows[1:]] == [d[3] for d in dev]  # the dev file's own labels, in its order
    rec = json.loads((run / "eval_dev" / f"{ckpt.stem}.json").read_text())
    acc = sum(r[1] == r[2] for r in rows[1:]) / len(dev)
    assert acc == pytest.approx(rec["metrics"]["val/acc"], abs=1e-6)  # the full dev pass's accuracy
    assert rec["predictions"] == {"RTE-dev": str(path)}
    assert "no labelled GLUE test file" in rec["no_test_metrics"] and "(no test metrics:" in r.stdout
    out = (r.stdout + r.stderr).splitlines()
    assert sum("GPU available:" in ln for ln in out) == 1  # each Lightning line once
