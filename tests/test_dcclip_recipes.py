"""dcclip through recipes: `vlmdistill cache-teacher RECIPE` and `vlmdistill train RECIPE`."""

import json
import os

import numpy as np
import pytest
import torch
import yaml

import vlmdistill
from vlmdistill.plugins.dcclip.data import ImageTextSample, write_image_text_shards
from vlmdistill.plugins.dcclip.recipes import cache_teacher_main
from vlmdistill.eval.tiny_models import tiny_hf_clip
from vlmdistill.data.text import train_caption_tokenizer
from vlmdistill.recipes import load_recipe, run_recipe


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture()
def recipe_path(tmp_path):
    captions = ["a photo of the digit {}.".format(n) for n in ("one", "two", "three")] + \
               ["数字{}的照片。".format(n) for n in ("一", "二", "三")]
    tokenizer = train_caption_tokenizer(captions, vocab_size=300)
    tokenizer.save_pretrained(tmp_path / "tok")
    rng = np.random.default_rng(0)
    samples = [ImageTextSample(f"k{i:02d}", rng.integers(0, 256, (8, 8, 3), dtype=np.uint8), captions[i % 6],
                               "en" if i % 6 < 3 else "zh") for i in range(12)]
    write_image_text_shards(samples, str(tmp_path / "shards"), samples_per_shard=5)
    teacher = tiny_hf_clip(hidden=32, layers=1, patch=4, image_size=16, vocab=len(tokenizer), projection=24, seed=2)
    teacher.save_pretrained(tmp_path / "teacher")
    recipe = {
        "plugin": "dcclip",
        "config": {"switch_at_step": 1, "teacher_cache": str(tmp_path / "cache")},
        "student": {"builder": "dcclip-hf-clip", "kwargs": {"tokenizer": str(tmp_path / "tok"), "hidden": 16,
                                                          "layers": 1, "patch": 8, "image_size": 16}},
        "teacher": {"path": str(tmp_path / "teacher"), "auto_class": "CLIPModel"},
        "data": {"builder": "dcclip-image-text", "kwargs": {"shards": str(tmp_path / "shards"),
                                                            "tokenizer": str(tmp_path / "tok"), "image_size": 16,
                                                            "shuffle_buffer": 4}},
        "training": {"max_steps": 2, "per_device_train_batch_size": 4, "learning_rate": 1e-3, "logging_steps": 1,
                     "save_strategy": "no", "disable_tqdm": True},
        "output_dir": str(tmp_path / "out"),
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


def test_cache_teacher_command_covers_the_recipe_data(recipe_path, tmp_path, capsys):
    assert cache_teacher_main([recipe_path]) == 0
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert manifest["num_samples"] == 12 and manifest["data_fingerprint"]
    assert "teacher features written" in capsys.readouterr().out
    from vlmdistill.plugins.dcclip.cache import TeacherFeatureCache, module_fingerprint
    from transformers import CLIPModel

    assert manifest["teacher_fingerprint"] == module_fingerprint(CLIPModel.from_pretrained(tmp_path / "teacher"))
    assert {k for k, _ in TeacherFeatureCache(str(tmp_path / "cache")).index} == {f"k{i:02d}" for i in range(12)}


def test_cache_teacher_is_a_cli_command():
    from vlmdistill.cli import build_parser

    assert "cache-teacher" in vlmdistill.get_plugin("dcclip").commands
    build_parser().parse_args(["cache-teacher", "recipe.yaml"])


@pytest.mark.slow
def test_train_recipe_runs_both_stages_from_the_cache(recipe_path, tmp_path):
    cache_teacher_main([recipe_path])
    summary = run_recipe(load_recipe(recipe_path))
    assert summary["global_step"] == 2
    logged = [h for h in summary["log_history"] if "loss" in h]
    assert "distill/image" in logged[0] and "distill/contrastive" in logged[1]
    # the recipe's Trainer restarts the (linear) schedule for stage 2; one schedule would be at 5e-4 there
    assert [h["learning_rate"] for h in logged] == pytest.approx([1e-3, 1e-3])
    from transformers import CLIPModel

    CLIPModel.from_pretrained(summary["student"])


def test_demo_recipe_is_valid():
    recipe = load_recipe(os.path.join(REPO, "configs", "dcclip", "demo.yaml"))
    from vlmdistill.eval.experiments.dcclip import STUDENT_STEPS

    # the demo's embedding-term arm: its steps, a third of them in stage 1 (the share chosen on validation)
    assert recipe.plugin == "dcclip" and recipe.training["max_steps"] == STUDENT_STEPS
    assert recipe.config["switch_at_step"] == round(STUDENT_STEPS / 3) and recipe.config["embedding_weight"] == 1.0


def test_shard_pipeline_takes_the_students_image_size(recipe_path, tmp_path):
    """The recipe data used to default to 24 px whatever the student took (a crash at step 1 for a 16-px model)."""
    from vlmdistill.errors import ConfigError
    from vlmdistill.plugins.dcclip.recipes import build_image_text

    recipe = yaml.safe_load(open(recipe_path))
    kwargs = {k: v for k, v in recipe["data"]["kwargs"].items() if k != "image_size"}
    student = tiny_hf_clip(hidden=16, layers=1, patch=8, image_size=16, vocab=300)
    dataset, collate, _ = build_image_text(student, None, **kwargs)
    batch = collate([next(iter(dataset)) for _ in range(2)])
    assert batch["pixel_values"].shape[-2:] == (16, 16) and batch["input_ids"].shape[1] == 32
    with pytest.raises(ConfigError, match="takes 16x16 images but image_size gives 24x24"):
        build_image_text(student, None, **kwargs, image_size=24)


def test_shard_pipeline_gives_a_differently_preprocessed_teacher_its_own_pixels(recipe_path):
    from vlmdistill.data.image_text import image_transform_for
    from vlmdistill.plugins.dcclip.recipes import build_image_text

    kwargs = {k: v for k, v in yaml.safe_load(open(recipe_path))["data"]["kwargs"].items() if k != "image_size"}
    student = tiny_hf_clip(hidden=16, layers=1, patch=8, image_size=16, vocab=300)
    siglip = tiny_hf_clip("siglip", hidden=16, layers=1, patch=8, image_size=32, vocab=300)
    dataset, collate, runtime = build_image_text(student, siglip, **kwargs)
    batch = collate([item for item, _ in zip(dataset, range(3))])
    assert batch["pixel_values"].shape[-1] == 16 and batch["teacher_pixel_values"].shape[-1] == 32
    transform = image_transform_for(siglip, role="teacher")
    assert transform.mean == (0.5, 0.5, 0.5) and dataset.teacher_transform.describe() == transform.describe()
    same, _, same_runtime = build_image_text(student, tiny_hf_clip(hidden=16, layers=1, image_size=16, vocab=300),
                                             **kwargs)
    assert same.teacher_transform is None and same_runtime["data_fingerprint"] != runtime["data_fingerprint"]


def test_recipe_compares_the_teachers_own_tokenizer(recipe_path, tmp_path):
    """The teacher folder's tokenizer reaches wrap(): one with another vocabulary of the same size is refused for
    token-level distillation (it used to be compared with the student's tokenizer, i.e. with itself)."""
    from vlmdistill.errors import IncompatibleTeacherError

    from transformers import AutoTokenizer

    other = train_caption_tokenizer(["a handwritten nine, eight or seven", "手写的九、八或七", "a photo of a four",
                                     "a scan of the digit two, five or six", "数字二、五或六的扫描"], vocab_size=300)
    assert len(other) == len(AutoTokenizer.from_pretrained(tmp_path / "tok"))  # same size: only the tokenizers tell
    teacher = tiny_hf_clip(hidden=32, layers=1, patch=4, image_size=16, vocab=len(other), projection=24, seed=2)
    teacher.save_pretrained(tmp_path / "teacher")
    other.save_pretrained(tmp_path / "teacher")
    overrides = ["config.teacher_cache=null"]
    with pytest.raises(IncompatibleTeacherError, match="differs from the teacher tokenizer"):
        run_recipe(load_recipe(recipe_path, overrides))


def test_shard_pipeline_tokenises_for_a_teacher_with_its_own_tokenizer(recipe_path, tmp_path):
    from vlmdistill.plugins.dcclip.recipes import build_image_text

    kwargs = yaml.safe_load(open(recipe_path))["data"]["kwargs"]
    other = train_caption_tokenizer(["a handwritten nine", "手写的九"], vocab_size=300)
    other.save_pretrained(tmp_path / "teacher_tok")
    student = tiny_hf_clip(hidden=16, layers=1, patch=8, image_size=16, vocab=300)
    teacher = tiny_hf_clip(hidden=16, layers=1, patch=8, image_size=16, vocab=len(other))
    dataset, collate, runtime = build_image_text(student, teacher, **kwargs,
                                                 teacher_tokenizer=str(tmp_path / "teacher_tok"))
    items = [item for item, _ in zip(dataset, range(2))]
    batch = collate(items)
    assert torch.equal(batch["teacher_input_ids"][0, :len(other(items[0]["caption"])["input_ids"])],
                       torch.tensor(other(items[0]["caption"])["input_ids"]))
    assert runtime["teacher_tokenizer"] is not None and "teacher_attention_mask" in batch
    # no tokenizer known for the teacher: none is claimed (the plugin then compares vocabulary sizes)
    _, _, runtime = build_image_text(student, teacher, **kwargs)
    assert "teacher_tokenizer" not in runtime


def test_clip_builder_refuses_a_tokenizer_it_would_pool_wrong(tmp_path):
    from vlmdistill.errors import IncompatibleTeacherError
    from vlmdistill.eval.experiments.dcclip_recipes import build_hf_clip

    xlmr = train_caption_tokenizer(["a photo of the digit seven.", "数字七的照片。"], vocab_size=300, layout="xlm-r")
    xlmr.save_pretrained(tmp_path / "xlmr")
    with pytest.raises(IncompatibleTeacherError, match="family 'clip'.*legacy rule"):
        build_hf_clip(str(tmp_path / "xlmr"))
    model = build_hf_clip(str(tmp_path / "xlmr"), family="altclip")  # XLM-R pools its first token: fine
    assert type(model).__name__ == "AltCLIPModel"
