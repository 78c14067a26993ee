"""`vlmdistill train`: a progress bar with the loss terms, log_history.jsonl, a loss-curve plot per term, a table."""

import json
import os

from PIL import Image
from test_cli_recipes import _tiny_recipe
from transformers import TrainerState, TrainingArguments

from vlmdistill.cli import main
from vlmdistill.run_report import RunReport, loss_terms, plot_loss_curves, summary_table

HISTORY = [{"loss": 4.0, "distill/kd": 0.5, "distill/task": 7.5, "learning_rate": 1e-3, "grad_norm": 2.0, "step": 1},
           {"loss": 3.0, "distill/kd": 0.25, "distill/task": 5.5, "learning_rate": 1e-3, "step": 2},
           {"eval_loss": 3.5, "eval_distill/kd": 0.4, "step": 2},
           {"loss": 3.2, "distill/kd": 0.2, "distill/task": 6.0, "learning_rate": 5e-4, "step": 3},
           {"train_runtime": 1.0, "train_loss": 3.4, "total_flos": 10.0, "step": 3}]


def test_cli_train_shows_progress_writes_logs_and_plots_and_ends_with_a_table(tmp_path, capsys):
    path = _tiny_recipe(tmp_path, max_steps=4, disable_tqdm=False)
    assert main(["train", str(path)]) == 0
    captured = capsys.readouterr()
    out, err = captured.out, captured.err
    assert "{'loss'" not in out + err and '"loss":' not in out  # no raw log dicts
    assert "train: 100%" in err and "4/4" in err and "kd " in err and "task " in err  # the bar and its terms
    table = out[out.index("term"):]
    assert [line.split()[0] for line in table.splitlines()[2:5]] == ["loss", "distill/kd", "distill/task"]
    run = tmp_path / "run"
    entries = [json.loads(line) for line in (run / "log_history.jsonl").read_text().splitlines()]
    logged = [e for e in entries if "loss" in e]
    assert [e["step"] for e in logged] == [1, 2, 3, 4] and all("distill/kd" in e for e in logged)
    assert "train_runtime" in entries[-1]  # the Trainer's closing entry too
    last = next(line for line in table.splitlines() if line.startswith("distill/kd"))
    assert float(last.split()[2]) == float(f"{logged[-1]['distill/kd']:.4g}")
    for term in ("loss", "distill_kd", "distill_task"):
        with Image.open(run / "plots" / f"{term}.png") as png:
            assert png.format == "PNG" and png.size[0] > 300
    assert f"plots:        {run / 'plots'}/" in out and f"student:      {run / 'student'}" in out

    assert main(["train", str(path)]) == 0  # rerun: the finished run is reported, not extended
    assert "nothing was trained" in capsys.readouterr().out


def test_loss_terms_table_and_plots_from_a_history(tmp_path):
    assert loss_terms(HISTORY[0]) == {"loss": 4.0, "distill/kd": 0.5, "distill/task": 7.5}
    assert loss_terms(HISTORY[2]) == {"eval_loss": 3.5, "eval_distill/kd": 0.4}
    assert loss_terms(HISTORY[4]) == {}  # the closing entry's averages are not curves
    rows = {line.split()[0]: line.split()[1:] for line in summary_table(HISTORY).splitlines()[2:]}
    assert rows["loss"] == ["4", "3.2", "3", "2"] and rows["distill/kd"] == ["0.5", "0.2", "0.2", "3"]
    assert rows["eval_loss"] == ["3.5", "3.5", "3.5", "2"]
    paths = plot_loss_curves(HISTORY, str(tmp_path / "plots"))
    assert set(paths) == {"loss", "distill/kd", "distill/task", "eval_loss", "eval_distill/kd"}
    assert os.path.basename(paths["distill/kd"]) == "distill_kd.png" and os.path.isfile(paths["eval_loss"])


def test_resumed_run_keeps_the_log_of_the_steps_it_did_not_redo(tmp_path):
    report = RunReport(str(tmp_path), progress=False)
    with open(report.log_path, "w") as fh:  # an interrupted run logged steps 1..3; its checkpoint is at step 2
        for entry in HISTORY[:4]:
            fh.write(json.dumps(entry) + "\n")
    args = TrainingArguments(output_dir=str(tmp_path / "t"), report_to=[], use_cpu=True)
    state = TrainerState(log_history=HISTORY[:3], global_step=2, max_steps=4)
    report.on_train_begin(args, state, None)
    report.on_log(args, state, None, logs={"loss": 2.9, "distill/kd": 0.1})
    lines = [json.loads(line) for line in open(report.log_path)]
    assert lines[:3] == HISTORY[:3] and lines[3]["loss"] == 2.9 and len(lines) == 4
