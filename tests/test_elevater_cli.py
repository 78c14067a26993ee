"""The command line as a user meets it: refusals that name the problem, every dataset checked before
the model loads, a failing dataset that does not cost the others, run labels, side-by-side summaries,
prediction files in the toolkit's submission format, and a help that is fast and complete."""

import csv
import json
import math
import os
import subprocess
import sys
import zipfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch

from vlmdistill.eval.elevater import dataset_writers as writers
from vlmdistill.eval.elevater import get_task
from vlmdistill.eval.elevater.cli import main as cli_main
from vlmdistill.eval.elevater.demo import DIGIT_NAMES, digits_images
from vlmdistill.eval.elevater.report import PREDICTION_KEYS
from vlmdistill.eval.elevater.testing import TINY_OPEN_CLIP_CONFIG, save_tiny_hf_model, tiny_open_clip


@pytest.fixture(scope="module")
def digits():
    images, labels = digits_images(size=32)
    keep = np.concatenate([np.flatnonzero(labels == c)[:3] for c in range(10)])
    return [images[i] for i in keep], [(int(labels[i]),) for i in keep]


@pytest.fixture(scope="module")
def root(tmp_path_factory, digits):
    """cifar-10 under its own name, mnist under the toolkit's folder name, a custom digits task."""
    images, labels = digits
    root = tmp_path_factory.mktemp("elevater")
    writers.write_iris(str(root / "cifar-10"), images, labels, get_task("cifar-10").classnames)
    writers.write_iris(str(root / "classification" / "mnist_20211008"), images, labels, get_task("mnist").classnames)
    writers.write_iris(str(root / "digits"), images, labels, DIGIT_NAMES["en"])
    (root / "digits" / "label_cn.txt").write_text("\n".join(DIGIT_NAMES["zh"]) + "\n", encoding="utf-8")
    (root / "tasks.yaml").write_text(
        "tasks:\n  digits:\n    classnames: [zero, one, two, three, four, five, six, seven, eight, nine]\n"
        "    templates: ['a photo of the digit {}.']\n    templates_zh: ['数字{}的照片']\n")
    return root


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Two checkpoints of one custom open_clip architecture, each saved as `<run>/model.pt`."""
    folder = tmp_path_factory.mktemp("checkpoints")
    (folder / "tiny.json").write_text(json.dumps(TINY_OPEN_CLIP_CONFIG))
    paths = {}
    for run, seed in (("teacher", 1), ("student", 2)):
        model, _ = tiny_open_clip(seed=seed)
        (folder / run).mkdir()
        torch.save(model.state_dict(), folder / run / "model.pt")
        paths[run] = str(folder / run / "model.pt")
    return {"config": str(folder / "tiny.json"), **paths}


def _model(checkpoints, run="teacher"):
    return ["--model", "tiny-cli", "--model-config", checkpoints["config"], "--pretrained", checkpoints[run]]


def _run(args, capsys):
    code = cli_main(args + ["--no-progress", "--batch-size", "16"])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def combine_like_prepare_submit(folder: Path) -> dict:
    """The toolkit's `vision_benchmark/commands/prepare_submit.py` combining step, reproduced from its
    source (the toolkit is not installable here): every `.json` file of the folder is grouped by
    `dataset_name`; `rnd_seeds` and `predictions` are concatenated, `num_trainable_params` averaged,
    and every other key must be equal across the files of a dataset (it asserts so)."""
    by_dataset = defaultdict(list)
    for path in sorted(folder.iterdir()):
        if path.suffix == ".json":
            record = json.loads(path.read_text())
            by_dataset[record["dataset_name"]].append(record)
    combined = []
    for dataset, records in by_dataset.items():
        entry = {}
        for key in records[0]:
            values = [record[key] for record in records]
            if key in ("rnd_seeds", "predictions"):
                entry[key] = [v for value in values for v in value]
            elif key == "num_trainable_params":
                entry[key] = float(np.mean(values))
            else:
                assert all(v == values[0] for v in values), f"{dataset}: {key} differs between files"
                entry[key] = values[0]
        combined.append(entry)
    return {"data": combined}


def check_submission_entry(entry: dict, num_images: int, num_classes: int) -> None:
    """The documented zero-shot submission fields (`submission_file_readme.md`) and the per-image
    checks of `vision_benchmark/common/prediction_submission.py` for multi-class data."""
    assert set(entry) == set(PREDICTION_KEYS)
    for key in ("num_params", "num_visual_params", "num_backbone_params", "n_shot"):
        assert isinstance(entry[key], int), key
    assert entry["n_shot"] == 0 and entry["rnd_seeds"] == [0] and entry["num_trainable_params"] == 0
    assert len(entry["predictions"]) == len(entry["rnd_seeds"]) == 1
    for probs in entry["predictions"][0]:
        assert len(probs) == num_classes
        assert math.isclose(sum(probs), 1.0, rel_tol=1e-3)
        assert all(0.0 <= p <= 1.0 for p in probs)
    assert len(entry["predictions"][0]) == num_images


def test_english_and_chinese_runs_make_predictions_the_submission_combiner_accepts(tmp_path, root, checkpoints,
                                                                                   capsys):
    out = tmp_path / "out"
    common = _model(checkpoints) + ["--data-root", str(root), "--datasets", "digits,cifar-10", "--tasks-yaml",
                                    str(root / "tasks.yaml"), "--output-dir", str(out), "--save-predictions"]
    assert _run(common, capsys)[0] == 0
    assert _run(common[:-5] + ["--datasets", "digits", "--tasks-yaml", str(root / "tasks.yaml"), "--output-dir",
                               str(out), "--save-predictions", "--protocol", "cnclip_zh"], capsys)[0] == 0
    folders = sorted((out / "predictions").iterdir())
    assert [f.name.rsplit("__", 1)[1] for f in folders] == ["en", "zh"]
    for folder in folders:
        combined = combine_like_prepare_submit(folder)["data"]
        assert {e["dataset_name"] for e in combined} == ({"digits", "cifar-10"} if folder.name.endswith("en")
                                                         else {"digits"})
        for entry in combined:
            check_submission_entry(entry, 30, 10)
    mixed = tmp_path / "mixed"                              # what one folder of both languages would give
    mixed.mkdir()
    for folder in folders:
        (mixed / f"{folder.name}.json").write_bytes((folder / "digits.json").read_bytes())
    with pytest.raises(AssertionError, match="differs"):
        combine_like_prepare_submit(mixed)
    english = json.loads((folders[0] / "digits.json").read_text())
    result = json.loads((out / "results" / f"{folders[0].name.rsplit('__', 1)[0]}__digits__en.json").read_text())
    assert english["model_name"] == result["run_label"] and result["model_info"]["num_params"] == english["num_params"]


def test_random_weights_only_on_request(tmp_path, root, checkpoints, capsys):
    common = ["--model", "tiny-cli", "--model-config", checkpoints["config"], "--data-root", str(root),
              "--datasets", "cifar-10", "--output-dir", str(tmp_path)]
    code, _, err = _run(common, capsys)
    assert code == 2 and "randomly initialised" in err and "--random-weights" in err
    assert not (tmp_path / "results").exists()
    code, out, _ = _run(common + ["--random-weights"], capsys)
    assert code == 0 and "run label: tiny-cli-random-" in out
    code, _, err = _run(common + ["--random-weights", "--pretrained", checkpoints["teacher"]], capsys)
    assert code == 2 and "contradict" in err


def test_dataset_names_typos_and_paths_are_refused_with_what_to_do(tmp_path, root, checkpoints, capsys):
    model = _model(checkpoints) + ["--output-dir", str(tmp_path / "out")]
    code, _, err = _run(model + ["--data-root", str(root), "--datasets", f"cifar10={root / 'cifar-10'}"], capsys)
    assert code == 2 and "did you mean 'cifar-10'" in err          # not a new task with one template
    code, _, err = _run(model + ["--data-root", str(root), "--datasets", "flowers,caltech101"], capsys)
    assert code == 2 and "unknown dataset 'flowers'" in err and "did you mean 'caltech-101'" in err
    assert "voc-2007-classification" in err and "oxford-flower-102" in err    # the registered names are listed
    code, _, err = _run(model + ["--datasets", f"cifar-10={tmp_path / 'nowhere'}"], capsys)
    assert code == 2 and f"{tmp_path / 'nowhere'} does not exist" in err
    code, _, err = _run(model + ["--data-root", str(tmp_path / "missing")], capsys)
    assert code == 2 and "--data-root" in err and "does not exist" in err
    code, _, err = _run(model + ["--data-root", str(root), "--datasets", "gtsrb"], capsys)
    assert code == 2 and "dataset gtsrb: no folder under" in err and "gtsrb_20210923" in err
    code, _, err = _run(model + ["--datasets", f"handwriting={root / 'digits'}"], capsys)   # labels.txt, no templates
    assert code == 2 and "not a registered dataset" in err and "--tasks-yaml" in err
    assert not (tmp_path / "out").exists()


def test_model_paths_are_named_and_folders_explained(tmp_path, root, capsys):
    data = ["--data-root", str(root), "--datasets", "cifar-10", "--output-dir", str(tmp_path / "out")]
    code, _, err = _run(["--model", str(tmp_path / "student")] + data, capsys)
    assert code == 2 and f"model folder {tmp_path / 'student'} does not exist" in err
    (tmp_path / "empty").mkdir()
    code, _, err = _run(["--model", str(tmp_path / "empty")] + data, capsys)
    assert code == 2 and "transformers model folder" in err and "open_clip folder" in err
    code, _, err = _run(["--model", "ViT-B-32-quickgelux", "--random-weights"] + data, capsys)
    assert code == 2 and "unknown open_clip architecture" in err and "ViT-B-32-quickgelu" in err
    hf = save_tiny_hf_model(str(tmp_path / "hf"), "clip", ["a photo of a"] + list(get_task("cifar-10").classnames))
    for weights in Path(hf).glob("*.safetensors"):
        weights.unlink()
    code, _, err = _run(["--model", hf] + data, capsys)
    assert code == 2 and "no weights file" in err and "--random-weights" in err


def test_every_dataset_is_checked_before_the_model_loads(tmp_path, root, digits, capsys):
    images, labels = digits
    broken = tmp_path / "mnist"
    writers.write_iris(str(broken), images, [(12,)] + labels[1:], get_task("mnist").classnames)   # label 12 of 10
    missing = tmp_path / "cifar-10"
    writers.write_iris(str(missing), images, labels, get_task("cifar-10").classnames)
    index = (missing / "test.txt").read_text().splitlines()
    (missing / "test.txt").write_text("\n".join(index + ["test.zip@test/99999.png 3"]) + "\n")
    code, _, err = _run(["--model", str(tmp_path / "no-such-model"), "--datasets",
                         f"mnist={broken},cifar-10={missing},dtd", "--output-dir", str(tmp_path / "out")], capsys)
    assert code == 2
    assert "label 12 is outside the 10 classes" in err and f"{broken / 'test.txt'}:1" in err
    assert "test/99999.png is not in" in err and "dataset dtd: no --data-root" in err
    assert "no-such-model" not in err                 # the model was never loaded
    assert not (tmp_path / "out").exists()


def test_a_dataset_failing_during_evaluation_does_not_cost_the_others(tmp_path, root, digits, checkpoints, capsys):
    images, labels = digits
    bad = tmp_path / "mnist"
    writers.write_iris(str(bad), images, labels, get_task("mnist").classnames)
    with zipfile.ZipFile(bad / "test.zip", "a") as archive:   # a member that exists but is no image
        archive.writestr("test/broken.png", b"not a png")
    (bad / "test.txt").write_text((bad / "test.txt").read_text() + "test.zip@test/broken.png 4\n")
    out = tmp_path / "out"
    code, stdout, err = _run(_model(checkpoints) + ["--data-root", str(root), "--datasets",
                                                    f"mnist={bad},cifar-10", "--output-dir", str(out)], capsys)
    assert code == 1
    assert "dataset mnist failed" in err and "broken.png" in err and "1 of 2 dataset(s) failed" in err
    summary = list(csv.DictReader(open(out / "summary.csv", encoding="utf-8")))
    assert [r["dataset"] for r in summary] == ["cifar-10", "ELEVATER average (1/20)"]
    assert (out / "zero_shot.png").is_file() and "cifar-10" in stdout


def test_two_checkpoints_of_one_architecture_side_by_side_and_no_silent_overwrite(tmp_path, root, checkpoints,
                                                                                  capsys):
    out = tmp_path / "out"
    data = ["--data-root", str(root), "--datasets", "cifar-10,mnist", "--output-dir", str(out), "--no-plot"]
    labels = []
    for run in ("teacher", "student"):
        code, stdout, _ = _run(_model(checkpoints, run) + data, capsys)
        assert code == 0
        labels.append(stdout.split("run label: ")[1].split()[0])
    assert labels[0].startswith("tiny-cli-teacher-") and labels[1].startswith("tiny-cli-student-")
    assert len(os.listdir(out / "results")) == 4
    code, _, err = _run(_model(checkpoints, "teacher") + data, capsys)      # the same run again
    assert code == 2 and "--overwrite" in err and f"{labels[0]}__cifar-10__en.json exists" in err
    before = (out / "results" / f"{labels[0]}__cifar-10__en.json").read_text()
    assert _run(_model(checkpoints, "teacher") + data + ["--overwrite"], capsys)[0] == 0
    after = json.loads((out / "results" / f"{labels[0]}__cifar-10__en.json").read_text())
    assert after["metrics"] == json.loads(before)["metrics"] and after["created_at"] >= json.loads(before)["created_at"]
    code, other_protocol, _ = _run(_model(checkpoints, "teacher") + data + ["--protocol", "clip_benchmark"], capsys)
    assert code == 0 and other_protocol.split("run label: ")[1].split()[0] not in labels   # the protocol is hashed
    assert _run(_model(checkpoints, "teacher") + data + ["--run-label", "mine"], capsys)[0] == 0
    table = (out / "summary.md").read_text().split("\n\n")[1].splitlines()
    header = table[0]
    assert all(f"{label} [en, elevater]" in header for label in labels + ["mine"])
    rows = {line.split(" | ")[0].strip("| "): line for line in table[2:]}
    assert set(rows) == {"cifar-10", "mnist", "ELEVATER average"} and rows["ELEVATER average"].count("(2/20)") == 4
    summary = list(csv.DictReader(open(out / "summary.csv", encoding="utf-8")))
    assert {r["run_label"] for r in summary if r["dataset"].startswith("ELEVATER average")} >= set(labels)


def test_predictions_of_logit_scores_are_refused(tmp_path, root, checkpoints, capsys):
    code, _, err = _run(_model(checkpoints) + ["--data-root", str(root), "--datasets", "cifar-10", "--protocol",
                                               "clip_benchmark", "--save-predictions", "--output-dir", str(tmp_path)],
                        capsys)
    assert code == 2 and "raw logits" in err


def test_help_documents_every_option_and_lists_the_datasets(capsys):
    import argparse

    from vlmdistill.cli import main as vlmdistill_main
    from vlmdistill.eval.elevater.cli import _configure

    parser = argparse.ArgumentParser()
    _configure(parser)
    for action in parser._actions:
        assert action.help and action.help != argparse.SUPPRESS, action.option_strings
    with pytest.raises(SystemExit) as stop:
        vlmdistill_main(["eval", "elevater", "--help"])
    assert stop.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: vlmdistill eval elevater")
    assert "(default: None)" not in text and "wired by the core CLI" not in text
    for name in ("caltech-101", "kitti-distance", "voc-2007-classification", "imagenet-1k"):
        assert f"\n  {name} " in text
    assert "[no centre crop]" in text.split("\n  kitti-distance ")[1].splitlines()[0]


@pytest.mark.parametrize("entry", ["from vlmdistill.cli import main; main(['eval', 'elevater', '--help'])",
                                   "from vlmdistill.eval.elevater.cli import main; main(['--help'])"])
def test_help_starts_without_torch(entry):
    """`vlmdistill eval elevater --help` (and the module form) import neither torch nor any plugin."""
    program = ("import sys, time\n"
               "started = time.perf_counter()\n"
               f"try:\n    {entry}\nexcept SystemExit:\n    pass\n"
               "print('SECONDS', time.perf_counter() - started, 'TORCH', 'torch' in sys.modules)\n")
    output = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=120).stdout
    seconds, torch_imported = output.split("SECONDS ")[1].split(" TORCH ")
    assert "registered datasets" in output and torch_imported.strip() == "False"
    assert float(seconds) < 3.0
