"""Image-text pairs from image folders and `datasets` folders, preprocessed the way each model expects."""

import json
import os

import pytest
import torch
import yaml
from image_text_fixtures import caption, caption_tokenizer, image, save_clip_folder, write_image_folder

import vlmdistill
from vlmdistill.data.image_text import (ClipImageTransform, ImageTextCollator, build_image_text, decode_keys,
                                        encode_keys, image_transform_for, read_image_text_source)
from vlmdistill.errors import ConfigError, DataError


@pytest.fixture(scope="module")
def tokenizer():
    return caption_tokenizer()


@pytest.fixture(scope="module")
def folders(tmp_path_factory, tokenizer):
    """A CLIP student (16 px) with its processor, a SigLIP teacher (32 px, mean/std 0.5), an image folder."""
    from transformers import CLIPModel, SiglipModel

    root = tmp_path_factory.mktemp("image_text")
    student_dir = save_clip_folder(root / "student", tokenizer, image_size=16)
    teacher_dir = save_clip_folder(root / "teacher", tokenizer, family="siglip", image_size=32, hidden=32,
                                   seed=1)
    rows = write_image_folder(root / "data", n=8)
    return {"root": root, "student": student_dir, "teacher": teacher_dir, "data": str(root / "data"), "rows": rows,
            "load_student": lambda: CLIPModel.from_pretrained(student_dir),
            "load_teacher": lambda: SiglipModel.from_pretrained(teacher_dir)}


def test_image_folder_round_trip_in_the_students_own_preprocessing(folders, tokenizer):
    from transformers import AutoImageProcessor

    student = folders["load_student"]()
    dataset, collate, runtime = build_image_text(student, None, folders["data"])
    processor = AutoImageProcessor.from_pretrained(folders["student"])
    assert len(dataset) == 8
    for i, row in enumerate(folders["rows"]):
        item = dataset[i]
        assert item["sample_key"] == row["file_name"] and item["language"] == row["language"]
        assert tokenizer.decode(item["input_ids"], skip_special_tokens=True) == row["text"] == caption(i)
        expected = processor(images=image(i), return_tensors="pt")["pixel_values"][0]
        torch.testing.assert_close(item["pixel_values"], expected)  # exactly the student's processor
    assert runtime["student_tokenizer"].get_vocab() == tokenizer.get_vocab()  # found in the student's folder
    assert "teacher_pixel_values" not in dataset[0]  # no teacher: nothing extra


def test_size_and_normalisation_come_from_the_config_without_a_processor(tmp_path, tokenizer):
    from transformers import CLIPModel, SiglipModel

    student = CLIPModel.from_pretrained(save_clip_folder(tmp_path / "s", tokenizer, image_size=16, processor=False))
    transform = image_transform_for(student)
    assert isinstance(transform, ClipImageTransform) and transform.image_size == 16
    assert transform.describe()["mean"][0] == pytest.approx(0.48145466)
    siglip = SiglipModel.from_pretrained(save_clip_folder(tmp_path / "t", tokenizer, family="siglip", image_size=24,
                                                          processor=False))
    t = image_transform_for(siglip, role="teacher")
    assert t.image_size == 24 and t.mean == (0.5, 0.5, 0.5) and t.resize_mode == "squash"
    assert t(image(0)).shape == (3, 24, 24)  # squashed, not cropped: both sides 24
    # The reported bug: a 24-px pipeline for a 16-px model is refused here, naming both sizes.
    with pytest.raises(ConfigError, match="16x16 images but image_size gives 24x24"):
        image_transform_for(student, image_size=24)


def test_a_teacher_that_preprocesses_differently_gets_its_own_pixels(folders):
    student, teacher = folders["load_student"](), folders["load_teacher"]()
    dataset, collate, runtime = build_image_text(student, teacher, folders["data"], augment="random_resized_crop",
                                                 crop_scale=(0.5, 0.9))
    item = dataset[3]
    assert item["pixel_values"].shape == (3, 16, 16) and item["teacher_pixel_values"].shape == (3, 32, 32)
    teacher_view = image_transform_for(teacher, folders["teacher"], augment="random_resized_crop",
                                       crop_scale=(0.5, 0.9))(image(3), item["sample_key"], 0)
    torch.testing.assert_close(item["teacher_pixel_values"], teacher_view)  # SigLIP's own view of the same crop
    batch = collate([dataset[i] for i in range(4)])
    wrapped = vlmdistill.wrap(student, plugin="dcclip", teacher=teacher, **runtime)
    seen = []
    teacher.vision_model.register_forward_pre_hook(lambda m, args, kw: seen.append(kw["pixel_values"]),
                                                   with_kwargs=True)
    out = wrapped(**batch)
    out.loss.backward()
    assert torch.isfinite(out.loss) and seen and torch.equal(seen[0], batch["teacher_pixel_values"])


def test_metadata_csv_and_datasets_folders(tmp_path, folders):
    import datasets

    student = folders["load_student"]()
    write_image_folder(tmp_path / "csv", n=4, fmt="csv")
    from_csv, _, _ = build_image_text(student, None, str(tmp_path / "csv"), language_column="language")
    assert [from_csv[i]["sample_key"] for i in range(4)] == [f"images/{i:03d}.png" for i in range(4)]

    rows = [{"image": image(i), "caption": caption(i), "id": f"img-{i}"} for i in range(5)]
    table = datasets.Dataset.from_list(rows).cast_column("image", datasets.Image())
    datasets.DatasetDict({"train": table}).save_to_disk(str(tmp_path / "saved"))
    saved, collate, _ = build_image_text(student, None, str(tmp_path / "saved"), text_column="caption",
                                         key_column="id")
    reference = image_transform_for(student)
    assert len(saved) == 5 and saved[2]["sample_key"] == "img-2" and saved[2]["caption"] == caption(2)
    torch.testing.assert_close(saved[2]["pixel_values"], reference(image(2).convert("RGB")))
    with pytest.raises(DataError, match="no split 'validation'; splits: \\['train'\\]"):
        read_image_text_source(str(tmp_path / "saved"), split="validation")

    # A column of relative paths instead of an Image feature.
    paths = datasets.Dataset.from_list([{"path": f"images/{i:03d}.png", "text": caption(i)} for i in range(3)])
    paths.save_to_disk(str(tmp_path / "paths"))
    by_path, _, _ = build_image_text(student, None, str(tmp_path / "paths"), image_column="path",
                                     image_root=str(tmp_path / "csv"))
    assert by_path[1]["sample_key"] == "1"
    torch.testing.assert_close(by_path[1]["pixel_values"], from_csv[1]["pixel_values"])


def test_bad_data_is_named_by_file_and_record(tmp_path, folders):
    student = folders["load_student"]()
    write_image_folder(tmp_path / "d", n=4)
    os.remove(tmp_path / "d" / "images" / "002.png")
    with pytest.raises(DataError, match=r"metadata.jsonl record 2: image file .*002.png does not exist"):
        build_image_text(student, None, str(tmp_path / "d"))

    write_image_folder(tmp_path / "e", n=4)
    (tmp_path / "e" / "images" / "001.png").write_bytes(b"not an image")
    dataset, _, _ = build_image_text(student, None, str(tmp_path / "e"))
    with pytest.raises(DataError, match=r"metadata.jsonl record 1: cannot read .*001.png"):
        dataset[1]

    with open(tmp_path / "e" / "metadata.jsonl", "a") as fh:
        fh.write("{broken\n")
    with pytest.raises(DataError, match="metadata.jsonl line 5: not valid JSON"):
        build_image_text(student, None, str(tmp_path / "e"))

    write_image_folder(tmp_path / "f", n=2)
    with pytest.raises(DataError, match=r"no text column 'caption' \(columns: \['file_name', 'language', 'text'\]\)"):
        build_image_text(student, None, str(tmp_path / "f"), text_column="caption")
    with pytest.raises(DataError, match="neither metadata.jsonl nor metadata.csv"):
        build_image_text(student, None, str(tmp_path))


def test_batches_are_tensors_of_one_width_so_accelerate_can_dispatch_them(folders):
    dataset, collate, _ = build_image_text(folders["load_student"](), folders["load_teacher"](), folders["data"])
    a, b = collate([dataset[i] for i in range(3)]), collate([dataset[i] for i in range(3, 8)])
    assert all(isinstance(v, torch.Tensor) for v in a.values())
    joined = {k: torch.cat([a[k], b[k]]) for k in a}  # what accelerate's dispatcher does with W batches
    assert decode_keys(joined["sample_key"]) == [r["file_name"] for r in folders["rows"]]
    lengths = [len(dataset[i]["input_ids"]) for i in range(8)]
    assert joined["input_ids"].shape[1] == 32 and len(set(lengths)) > 1
    assert joined["attention_mask"].sum(1).tolist() == lengths
    assert decode_keys(encode_keys(["a", "数字", ""])) == ["a", "数字", ""]
    with pytest.raises(DataError, match="longer than 4 UTF-8 bytes"):
        encode_keys(["abcde"], width=4)
    plain = ImageTextCollator(0)([dataset[0], dataset[1]])
    assert plain["input_ids"].shape[1] == max(lengths[:2])  # no pad_to: padded to the batch's longest


def _recipe(tmp_path, folders, plugin, **extra):
    recipe = {"plugin": plugin, "student": {"path": folders["student"], "auto_class": "CLIPModel"},
              "data": {"builder": "image-text", "kwargs": {"path": folders["data"]}},
              "training": {"max_steps": 2, "per_device_train_batch_size": 4, "learning_rate": 1e-3,
                           "logging_steps": 1, "save_steps": 10, "disable_tqdm": True},
              "output_dir": str(tmp_path / f"run-{plugin}"), **extra}
    path = tmp_path / f"{plugin}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _readme_yaml(plugin: str) -> str:
    import re

    readme = open(os.path.join(os.path.dirname(os.path.dirname(__file__)), "README.md")).read()
    section = re.search(r"### Image–text pairs \(dcclip, msd\)\n(.*?)\n## ", readme, re.S).group(1)
    return next(b for b in re.findall(r"```yaml\n(.*?)```", section, re.S) if b.startswith(f"plugin: {plugin}\n"))


@pytest.mark.parametrize("plugin", ["dcclip", "msd"])
def test_readme_image_text_recipes_train(tmp_path, folders, plugin, monkeypatch, capsys):
    """The README's image-text recipes, verbatim but for run length, on its folder layout."""
    import shutil

    from transformers import CLIPModel

    from vlmdistill.cli import main

    shutil.copytree(folders["student"], tmp_path / "checkpoints" / "my-clip")
    shutil.copytree(folders["teacher"], tmp_path / "checkpoints" / "my-big-clip")  # SigLIP, 32 px, mean/std 0.5
    shutil.copytree(folders["data"], tmp_path / "data" / "pairs")
    (tmp_path / f"my-{plugin}.yaml").write_text(_readme_yaml(plugin))
    monkeypatch.chdir(tmp_path)
    short = ["training.max_steps=2", "training.per_device_train_batch_size=4", "training.gradient_accumulation_steps=1",
             "training.logging_steps=1", "training.disable_tqdm=true"]
    if plugin == "dcclip":
        short.append("config.switch_at_step=1")  # both stages
    assert main(["train", f"my-{plugin}.yaml", *[a for s in short for a in ("--set", s)]]) == 0
    table = capsys.readouterr().out
    run = tmp_path / "runs" / f"my-{plugin}"
    logged = [json.loads(line) for line in (run / "log_history.jsonl").read_text().splitlines()]
    logged = [e for e in logged if "loss" in e]
    assert len(logged) == 2 and "distill/" in table
    if plugin == "dcclip":
        assert "distill/image" in logged[0] and "distill/contrastive" in logged[1]
    trained = CLIPModel.from_pretrained(run / "student")
    before = CLIPModel.from_pretrained(folders["student"])
    patches = "vision_model.embeddings.patch_embedding.weight"  # trained by both methods
    assert not torch.equal(trained.state_dict()[patches], before.state_dict()[patches])


def test_open_clip_student_from_a_local_checkpoint_in_a_recipe(tmp_path, folders):
    from vlmdistill.open_clip_models import load_open_clip
    from vlmdistill.eval.tiny_models import open_clip_config, tiny_open_clip
    from vlmdistill.recipes import load_recipe, run_recipe

    config = open_clip_config(image_size=16, patch=8, vocab=49408, context=16)
    (tmp_path / "tiny-vit.json").write_text(json.dumps(config))
    model, _ = tiny_open_clip(image_size=16, patch=8, vocab=49408, context=16, seed=3)
    torch.save(model.state_dict(), tmp_path / "epoch_1.pt")
    loaded = load_open_clip(config=str(tmp_path / "tiny-vit.json"), checkpoint=str(tmp_path / "epoch_1.pt"))
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    with pytest.raises(ConfigError, match="not a local file"):
        load_open_clip(model="ViT-B-32", checkpoint="laion2b_s34b_b79k")
    with pytest.raises(ConfigError, match="downloaded from the hub"):
        load_open_clip(model="hf-hub:laion/CLIP-ViT-B-32")

    student = {"builder": "open-clip", "kwargs": {"config": str(tmp_path / "tiny-vit.json"),
                                                  "checkpoint": str(tmp_path / "epoch_1.pt")}}
    path = _recipe(tmp_path, folders, "dcclip", config={"stage": 2})
    recipe = yaml.safe_load(path.read_text())
    recipe["student"] = student
    path.write_text(yaml.safe_dump(recipe))
    summary = run_recipe(load_recipe(str(path)))
    assert summary["global_step"] == 2
    exported = load_open_clip(model=f"local-dir:{summary['student']}")  # open_clip alone reads the export
    assert exported.visual.image_size == (16, 16)
    assert not torch.equal(exported.text_projection, model.text_projection)
