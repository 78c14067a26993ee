"""End to end: oracle scores, classifier cache, protocols, per-dataset transforms, result records and reports."""

import csv
import json
import os

import numpy as np
import pytest
import torch

from vlmdistill.eval.elevater import dataset_writers as writers
from vlmdistill.eval.elevater import evaluate_zero_shot, get_protocol, get_task, read_dataset
from vlmdistill.eval.elevater.adapters import adapter_for
from vlmdistill.eval.elevater.demo import DIGIT_NAMES, digits_images, digits_task
from vlmdistill.eval.elevater.report import PREDICTION_KEYS, plot_results, write_result_json, write_summary
from vlmdistill.eval.elevater.tasks import TaskSpec
from vlmdistill.eval.elevater.testing import oracle_adapter, stripe_image, tiny_open_clip

CLIP_BENCHMARK_KEYS = {"dataset", "model", "pretrained", "task", "language", "metrics"}


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
    images, labels = digits_images(size=32)
    keep = np.concatenate([np.flatnonzero(labels == c)[:4] for c in range(10)])
    root = tmp_path_factory.mktemp("digits")
    writers.write_iris(str(root), [images[i] for i in keep], [(int(labels[i]),) for i in keep], DIGIT_NAMES["en"])
    (root / "label_cn.txt").write_text("\n".join(DIGIT_NAMES["zh"]) + "\n", encoding="utf-8")
    return root


def _oracle_data(tmp_path, classnames, labels, fmt):
    images = [stripe_image(positives, len(classnames)) for positives in labels]
    if fmt == "coco":
        writers.write_coco(str(tmp_path), images, labels, classnames)
    else:
        writers.write_iris(str(tmp_path), images, labels, classnames)
    return read_dataset(str(tmp_path))


@pytest.mark.parametrize("protocol", ["elevater", "clip_benchmark"])
def test_oracle_scores_one_on_every_metric_multiclass(tmp_path, protocol):
    task = TaskSpec("oracle-10", [f"class{i}" for i in range(10)], ["a photo of a {}.", "art of the {c}"])
    labels = [(i % 10,) for i in range(40)]
    data = _oracle_data(tmp_path, task.classnames, labels, "coco")
    result = evaluate_zero_shot(oracle_adapter(task.classnames), task, data, protocol, batch_size=16, progress=False)
    assert set(result["metrics"]) == {"acc1", "acc5", "mean_per_class_recall", "map_11point",
                                      "mean_average_precision", "roc_auc"}
    assert all(value == 1.0 for value in result["metrics"].values()), result["metrics"]


def test_oracle_scores_one_on_every_metric_multilabel(tmp_path):
    task = TaskSpec("oracle-ml", [f"class{i}" for i in range(6)], ["{}"], metric="11point_mAP", multilabel=True)
    rng = np.random.default_rng(0)
    labels = [tuple(sorted(rng.choice(6, size=rng.integers(1, 4), replace=False).tolist())) for _ in range(30)]
    data = _oracle_data(tmp_path, task.classnames, labels, "iris")
    result = evaluate_zero_shot(oracle_adapter(task.classnames), task, data, progress=False)
    assert result["primary_metric"] == "map_11point"
    assert all(value == 1.0 for value in result["metrics"].values()), result["metrics"]


def test_a_wrong_model_does_not_score_one(tmp_path):
    task = TaskSpec("oracle-10", [f"class{i}" for i in range(10)], ["{}"])
    labels = [(i % 10,) for i in range(20)]
    data = _oracle_data(tmp_path, task.classnames, labels, "iris")
    shifted = TaskSpec("shifted", [f"class{(i + 1) % 10}" for i in range(10)], ["{}"])   # names rotated by one
    result = evaluate_zero_shot(oracle_adapter(task.classnames), shifted, data, progress=False)
    assert result["metrics"]["acc1"] == 0.0


def test_classifier_cache_hit_skips_text_encoding_and_invalidates(tmp_path, digits_dir):
    model, tokenizer = tiny_open_clip()
    adapter = adapter_for(model, tokenizer)
    data = read_dataset(str(digits_dir))
    cache = str(tmp_path / "cache")
    run = lambda task: evaluate_zero_shot(adapter, task, data, cache_dir=cache, progress=False)  # noqa: E731
    first = run(digits_task("en"))
    calls = adapter.text_encoder_calls
    assert not first["classifier"]["cache_hit"] and calls > 0
    second = run(digits_task("en"))
    assert second["classifier"]["cache_hit"] and adapter.text_encoder_calls == calls   # no text encoded
    assert second["metrics"] == first["metrics"]
    changed_templates = run(digits_task("en").with_templates(["the number {}"]))
    changed_names = run(digits_task("en").with_classnames([f"#{i}" for i in range(10)]))
    assert not changed_templates["classifier"]["cache_hit"] and not changed_names["classifier"]["cache_hit"]
    with torch.no_grad():
        model.token_embedding.weight[5] += 0.1      # any weight change must miss the cache
    changed_weights = run(digits_task("en"))
    assert not changed_weights["classifier"]["cache_hit"]
    assert len(os.listdir(cache)) == 4
    open(changed_weights["classifier"]["cache_path"], "wb").write(b"truncated")   # an interrupted write
    recomputed = run(digits_task("en"))
    assert not recomputed["classifier"]["cache_hit"] and recomputed["metrics"] == changed_weights["metrics"]
    assert run(digits_task("en"))["classifier"]["cache_hit"]


def test_protocols_switch_their_knobs(digits_dir):
    model, tokenizer = tiny_open_clip()
    data = read_dataset(str(digits_dir))
    elevater = evaluate_zero_shot(model, digits_task("en"), data, "elevater",
                                  tokenizer=tokenizer, progress=False)
    benchmark = evaluate_zero_shot(model, digits_task("en"), data, "clip_benchmark", tokenizer=tokenizer,
                                   progress=False)
    assert elevater["metrics"]["acc1"] == benchmark["metrics"]["acc1"]          # argmax is unchanged
    assert benchmark["protocol"]["scores"] == "logits100" and benchmark["protocol"]["transform"] == "model"
    chinese = evaluate_zero_shot(model, digits_task("zh"), data, "cnclip_zh", tokenizer=tokenizer, progress=False)
    assert chinese["language"] == "zh" and chinese["primary_metric"] == "acc1"
    assert chinese["task_spec"]["spec_hash"] != elevater["task_spec"]["spec_hash"]
    assert get_protocol("elevater", language="zh").language == "zh"
    caltech = get_task("caltech-101")
    assert get_protocol("cnclip_zh").primary == "acc1" and caltech.metric == "mean-per-class"


def test_fp32_protocol_restores_the_models_dtype_and_device(digits_dir):
    model, tokenizer = tiny_open_clip()
    model.to(torch.bfloat16)
    result = evaluate_zero_shot(model, digits_task("en"), read_dataset(str(digits_dir)), tokenizer=tokenizer,
                                progress=False)
    assert next(model.parameters()).dtype == torch.bfloat16
    assert result["protocol"]["precision"] == "fp32"


def test_result_json_summary_chart_and_predictions(tmp_path, digits_dir):
    model, tokenizer = tiny_open_clip()
    data = read_dataset(str(digits_dir))
    predictions = tmp_path / "pred.json"
    result = evaluate_zero_shot(adapter_for(model, tokenizer, name="tiny", pretrained="ckpt.pt"), digits_task("en"),
                                data, predictions_path=str(predictions), progress=False)
    path = write_result_json(result, str(tmp_path / "results"))
    loaded = json.loads(open(path, encoding="utf-8").read())
    assert CLIP_BENCHMARK_KEYS <= set(loaded)
    assert loaded["task"] == "zeroshot_classification" and loaded["model"] == "tiny"
    assert all(0.0 <= v <= 1.0 for v in loaded["metrics"].values())
    for key in ("protocol", "task_spec", "data", "num_samples", "runtime_s", "primary_metric", "primary_value"):
        assert key in loaded, key
    assert set(loaded["task_spec"]) >= {"spec_hash", "classnames_hash", "templates_hash"}
    assert loaded["data"]["reader"] == "iris" and loaded["num_samples"] == len(data) == 40
    assert loaded["runtime_s"]["total"] > 0
    record = json.loads(predictions.read_text())
    assert tuple(record) == PREDICTION_KEYS                  # the toolkit's keys only: the scores once
    scores = np.array(record["predictions"])
    assert scores.shape == (1, 40, 10) and np.allclose(scores.sum(-1), 1.0, atol=1e-4)   # softmax rows
    assert np.all(np.round(scores, 6) == scores)
    assert record["dataset_name"] == "digits" and record["model_name"] == "tiny" == loaded["run_label"]
    assert (record["n_shot"], record["rnd_seeds"], record["num_trainable_params"]) == (0, [0], 0)
    assert record["num_params"] == record["num_backbone_params"] == sum(p.numel() for p in model.parameters())
    assert record["num_visual_params"] == sum(p.numel() for p in model.visual.parameters()) < record["num_params"]
    assert np.mean(scores[0].argmax(1) == [lab[0] for lab in data.labels]) == pytest.approx(loaded["metrics"]["acc1"])
    csv_path, md_path = write_summary([result], str(tmp_path))
    rows = list(csv.DictReader(open(csv_path)))
    assert rows[0]["dataset"] == "digits"
    assert float(rows[0]["score"]) == pytest.approx(100 * result["primary_value"], abs=0.01)
    assert "| digits |" in open(md_path).read()
    chart = plot_results([result], str(tmp_path / "chart.png"))
    assert open(chart, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_summary_averages_the_benchmark_datasets_only():
    def fake(dataset, value):
        return {"dataset": dataset, "model": "m", "language": "en", "protocol": {"name": "elevater"},
                "primary_metric": "acc1", "primary_value": value, "metrics": {"acc1": value},
                "elevater_metric": "accuracy", "elevater_metric_value": value, "num_samples": 10}

    from vlmdistill.eval.elevater.report import comparison_table, summary_rows

    rows = summary_rows([fake("cifar-10", 0.5), fake("mnist", 0.7), fake("imagenet-1k", 0.1)])
    average = [r for r in rows if r["dataset"].startswith("ELEVATER average")]
    assert average[0]["dataset"] == "ELEVATER average (2/20)" and average[0]["score"] == "60.00"
    header, table = comparison_table([fake("cifar-10", 0.5), fake("imagenet-1k", 0.1),
                                      {**fake("mnist", 0.2), "run_label": "other"}])
    assert header == ["dataset", "metric", "m [en, elevater]", "other [en, elevater]"]
    assert table == [["cifar-10", "accuracy", "50.00", ""], ["mnist", "accuracy", "", "20.00"],
                     ["imagenet-1k", "accuracy", "10.00", ""],
                     ["ELEVATER average", "primary", "50.00 (1/20)", "20.00 (1/20)"]]
    assert comparison_table([fake("imagenet-1k", 0.1)])[1] == [["imagenet-1k", "accuracy", "10.00"]]   # no average


def test_in_memory_digits_score_like_the_same_images_on_disk(tmp_path):
    from vlmdistill.eval.elevater import digits_test_data

    data = digits_test_data(test_size=60)
    images = [data.open_image(i) for i in range(len(data))]
    writers.write_iris(str(tmp_path), images, data.labels, DIGIT_NAMES["en"])
    model, tokenizer = tiny_open_clip()
    adapter = adapter_for(model, tokenizer)
    in_memory = evaluate_zero_shot(adapter, digits_task("zh"), data, "cnclip_zh", progress=False)
    on_disk = evaluate_zero_shot(adapter, digits_task("zh"), read_dataset(str(tmp_path)), "cnclip_zh", progress=False)
    assert in_memory["data"]["reader"] == "memory" and on_disk["data"]["reader"] == "iris"
    assert in_memory["metrics"] == on_disk["metrics"] and in_memory["num_samples"] == 60


def test_each_dataset_gets_the_toolkits_test_transform():
    """kitti-distance.yaml sets CENTER_CROP false: its wide images are squashed whole to a square; every
    other dataset keeps the shorter-side resize and centre crop. Both bicubic, references built with PIL."""
    from PIL import Image
    from torchvision.transforms import functional as TF

    from vlmdistill.eval.elevater.runner import image_transform, preprocessing

    rng = np.random.default_rng(0)
    wide = Image.fromarray(rng.integers(0, 256, (375, 1242, 3), dtype=np.uint8))   # a KITTI frame's shape
    model, tokenizer = tiny_open_clip()
    adapter = adapter_for(model, tokenizer)
    size, protocol = adapter.image_size, get_protocol("elevater")
    kitti, cifar = get_task("kitti-distance"), get_task("cifar-10")
    assert (kitti.center_crop, cifar.center_crop) == (False, True)
    assert {t.interpolation for t in (kitti, cifar)} == {"bicubic"} and kitti.image_size == cifar.image_size == 224
    assert [n for n in tasks_with_crop(False)] == ["kitti-distance"]

    def reference(image):
        return TF.normalize(TF.to_tensor(image), list(adapter.mean), list(adapter.std))

    squashed = reference(wide.resize((size, size), Image.BICUBIC))
    short = wide.resize((int(size * 1242 / 375), size), Image.BICUBIC)
    left = int(round((short.width - size) / 2))
    cropped = reference(short.crop((left, 0, left + size, size)))
    assert torch.allclose(image_transform(adapter, protocol, kitti)(wide), squashed, atol=1e-6)
    assert torch.allclose(image_transform(adapter, protocol, cifar)(wide), cropped, atol=1e-6)
    assert not torch.allclose(squashed, cropped, atol=1e-2)
    assert preprocessing(adapter, protocol, kitti) == {"transform": "elevater", "image_size": size,
                                                       "center_crop": False, "interpolation": "bicubic",
                                                       "toolkit_image_size": 224}
    assert get_task("kitti-distance").spec_hash != TaskSpec(**{**kitti.__dict__, "center_crop": True}).spec_hash


def tasks_with_crop(center_crop):
    from vlmdistill.eval.elevater.tasks import list_tasks

    return [name for name in list_tasks() if get_task(name).center_crop is center_crop]
