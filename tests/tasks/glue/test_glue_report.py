"""python -m tasks.glue.report: the per-run summary printed for the README numbers."""

from tasks.glue.report import main, summarise


def test_report_reads_metrics_and_config(tmp_path, capsys):
    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "config.yaml").write_text(
        "task_name: glue/cola\nmoe:\n  name: rmoe\nbackbone:\n  name: minilm_l6\n")
    (tmp_path / "metrics.csv").write_text(
        "epoch,step,time/train_epoch_s,time/val_s,val/score\n"
        "0,10,,,0.25\n0,10,100.4,6.0,\n1,20,,,0.5\n1,20,99.6,8.0,\n")
    s = summarise(str(tmp_path))
    assert (s["task"], s["moe"], s["backbone"]) == ("glue/cola", "rmoe", "minilm_l6")
    assert s["epoch_s"] == [100.4, 99.6] and s["score"] == [0.25, 0.5]
    assert main([str(tmp_path)]) == 0
    line = capsys.readouterr().out.splitlines()[1]
    assert line.split() == ["glue/cola", "minilm_l6", "rmoe", "100,", "100", "7", "0.2500,", "0.5000", "0.5000"]
