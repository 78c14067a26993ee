"""Task registry: packaged data, templates, Chinese sets, user class names, YAML custom tasks."""

import json
from importlib import resources

import pytest
import torch

from vlmdistill.errors import ConfigError, DataError
from vlmdistill.eval.elevater import tasks
from vlmdistill.eval.elevater.adapters import adapter_for
from vlmdistill.eval.elevater.classifier import encode_classifier
from vlmdistill.eval.elevater.testing import tiny_open_clip


def test_registry_holds_the_twenty_datasets_and_imagenet():
    assert len(tasks.ELEVATER_IC20) == 20
    assert "imagenet-1k" in tasks.list_tasks() and "imagenet-1k" not in tasks.ELEVATER_IC20
    data = json.loads(resources.files("vlmdistill.eval.elevater").joinpath(
        "data", "elevater_ic_en_tasks.json").read_text(encoding="utf-8"))["datasets"]
    for name in tasks.list_tasks():
        spec = tasks.get_task(name)
        assert spec.num_classes == data[name]["num_classes"], name
        assert spec.metric == data[name]["metric"]
        assert all(t.count("{}") == 1 for t in spec.templates)
    assert tasks.get_task("voc-2007-classification").multilabel
    assert tasks.get_task("caltech-101").metric == "mean-per-class"
    assert tasks.get_task("hateful-memes").metric == "roc_auc"


def test_packaged_data_files_are_readable_as_resources():
    files = resources.files("vlmdistill.eval.elevater").joinpath("data")
    names = {entry.name for entry in files.iterdir()}
    assert {"elevater_ic_en_tasks.json", "cnclip_chinese_templates.json", "imagenet1k_zh.json",
            "reference_clip_vitb32_openai.csv"} <= names


def test_fer_synonym_lists_keep_the_first_synonym():
    assert tasks.get_task("fer-2013").classnames[3] == "happy"


def test_c_and_empty_placeholders_are_equivalent():
    assert tasks.normalize_template("a photo of a {c}.") == "a photo of a {}."
    assert tasks.normalize_template("a {} with {braces}") == "a {} with {{braces}}"
    with pytest.raises(ConfigError, match="exactly one"):
        tasks.normalize_template("no placeholder")


def test_braces_and_c_templates_give_identical_classifiers():
    model, tokenizer = tiny_open_clip()
    adapter = adapter_for(model, tokenizer)
    names = ["cat", "dog", "bird"]
    braces = encode_classifier(adapter, names, tasks.TaskSpec("t", names, ["a photo of a {}.", "{} art"]).templates)
    c_form = encode_classifier(adapter, names, tasks.TaskSpec("t", names, ["a photo of a {c}.", "{c} art"]).templates)
    assert torch.equal(braces, c_form)
    other = encode_classifier(adapter, names, ["a drawing of a {}."])
    assert not torch.allclose(braces, other)


def test_classifier_is_mean_of_normalised_prompt_embeddings():
    model, tokenizer = tiny_open_clip()
    adapter = adapter_for(model, tokenizer)
    templates = ["a photo of a {}.", "a {} in the wild."]
    weights = encode_classifier(adapter, ["cat", "dog"], templates, batch_size=3)
    with torch.no_grad():
        manual = []
        for name in ["cat", "dog"]:
            texts = tokenizer([t.format(name) for t in templates])
            embeddings = torch.nn.functional.normalize(model.encode_text(texts), dim=-1)
            mean = embeddings.mean(0)
            manual.append(mean / mean.norm())
    assert torch.allclose(weights, torch.stack(manual, dim=1), atol=1e-6)
    assert torch.allclose(weights.norm(dim=0), torch.ones(2))


def test_chinese_tasks():
    imagenet = tasks.get_task("imagenet-1k", "zh")
    assert imagenet.language == "zh" and imagenet.classnames[1] == "金鱼"
    assert imagenet.templates[0] == "{}的照片"
    benchmark = tasks.get_task("imagenet-1k", "zh", zh_source="clip_benchmark")
    assert benchmark.templates != imagenet.templates and all("{}" in t for t in benchmark.templates)
    food_set, food_templates = tasks.chinese_template_set("food-101")
    assert food_set == "food_templates"
    assert tasks.chinese_template_set("gtsrb")[0] == "openai_templates"
    with pytest.raises(ConfigError, match="label_cn.txt"):
        tasks.get_task("cifar-10", "zh")


def test_user_classnames_file(tmp_path):
    names = ["飞机", "汽车", "鸟", "猫", "鹿", "狗", "青蛙", "马", "船", "卡车"]
    path = tmp_path / "label_cn.txt"
    path.write_text("\n".join(names) + "\n", encoding="utf-8")
    spec = tasks.get_task("cifar-10", "zh", classnames_file=path)
    assert spec.classnames == tuple(names) and spec.language == "zh"
    assert spec.templates == tuple(tasks.chinese_template_set("cifar-10")[1])
    path.write_text("\n".join(names[:9]) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match="10 classes but 9"):
        tasks.get_task("cifar-10", "zh", classnames_file=path)
    path.write_text("a\n\nb\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"label_cn\.txt:2: empty class name"):
        tasks.read_classnames_file(path)


def test_spec_hash_tracks_everything_that_changes_scores():
    spec = tasks.get_task("cifar-10")
    assert spec.spec_hash == tasks.get_task("cifar-10").spec_hash
    assert spec.with_templates(["{}"]).spec_hash != spec.spec_hash
    assert spec.with_classnames([f"c{i}" for i in range(10)]).spec_hash != spec.spec_hash


def test_custom_tasks_from_yaml(tmp_path):
    (tmp_path / "names.txt").write_text("red\ngreen\nblue\n")
    (tmp_path / "tasks.yaml").write_text(
        "tasks:\n"
        "  colours:\n    classnames_file: names.txt\n    templates: ['a {c} square']\n    metric: mean-per-class\n"
        "  shapes:\n    classnames: [circle, [square, box]]\n    multilabel: true\n    metric: 11point_mAP\n"
        "    templates_zh: ['{}的图片']\n    classnames_zh: [圆, 方]\n")
    loaded = tasks.load_custom_tasks(tmp_path / "tasks.yaml")
    assert [s.name for s in loaded] == ["colours", "shapes"]
    assert tasks.get_task("colours").templates == ("a {} square",)
    assert tasks.get_task("shapes").classnames == ("circle", "square")
    chinese = tasks.get_task("shapes", "zh")
    assert chinese.classnames == ("圆", "方") and chinese.templates == ("{}的图片",)


def test_yaml_is_parsed_safely_and_strictly(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("tasks:\n  x: !!python/object/apply:os.system ['echo unsafe']\n")
    with pytest.raises(DataError, match="invalid YAML"):
        tasks.load_custom_tasks(path)
    path.write_text("tasks:\n  x:\n    classnames: [a]\n    colour: red\n")
    with pytest.raises(ConfigError, match="unknown keys \\['colour'\\]"):
        tasks.load_custom_tasks(path)
