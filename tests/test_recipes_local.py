"""Recipes from local checkpoint folders: the README's "Train on your own model and data" followed verbatim on tiny
folders (a LLaVA with its processor, its original Llama LM, a larger LLaVA), for lingudistill and kd; the class
chosen from config.json; the dry run; refusals that name the problem."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import tiny_processors as tp
import torch
import yaml
from PIL import Image

from vlmdistill.errors import ConfigError, DataError
from vlmdistill.recipes import check_recipe, load_recipe

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _readme_section() -> str:
    with open(os.path.join(ROOT, "README.md")) as fh:
        readme = fh.read()
    return re.search(r"## Train on your own model and data\n(.*?)\n## ", readme, re.S).group(1)


def _blocks(kind: str) -> list[str]:
    return re.findall(rf"```{kind}\n(.*?)```", _readme_section(), re.S)


def _records(n: int, rng: torch.Generator) -> list[dict]:
    words = ["cat", "dog", "bird", "ball", "mat", "park", "sky", "grass"]
    out = []
    for i in range(n):
        a, b = (words[int(j)] for j in torch.randint(0, len(words), (2,), generator=rng))
        if i % 4 == 3:  # text-only records mix in
            out.append({"source": "sciqa", "conversations": [
                {"from": "human", "value": f"what is a {a}?"}, {"from": "gpt", "value": f"a {a} is not a {b}."}]})
            continue
        out.append({"image": f"{i % 3}.png", "source": ("coco", "docvqa")[i % 2], "conversations": [
            {"from": "human", "value": "<image>\nwhat is in the picture?"},
            {"from": "gpt", "value": f"there is a {a} and a {b}."}]})
    return out


@pytest.fixture
def workspace(tmp_path):
    """The README's layout: checkpoints/{my-vlm, my-lm, my-big-vlm}, data/{train,val}.json, data/images."""
    lm_tok = tp.lm_tokenizer()
    tok = tp.student_tokenizer("llava", lm_tok)
    processor = tp.processor("llava", tok)
    student = tp.model_for("llava", tok, seed=0)
    teacher = tp.teacher_for(student, lm_tok)
    big = tp.model_for("llava", tok, seed=1, layers=3, hidden=48, heads=4)
    for name, model, proc in (("my-vlm", student, processor), ("my-lm", teacher, lm_tok),
                              ("my-big-vlm", big, processor)):
        model.save_pretrained(tmp_path / "checkpoints" / name)
        proc.save_pretrained(tmp_path / "checkpoints" / name)
    images = tmp_path / "data" / "images"
    images.mkdir(parents=True)
    for i, color in enumerate([(200, 30, 30), (30, 200, 30), (30, 30, 200)]):
        Image.new("RGB", (24, 20), color).save(images / f"{i}.png")
    rng = torch.Generator().manual_seed(0)
    (tmp_path / "data" / "train.json").write_text(json.dumps(_records(24, rng)))
    (tmp_path / "data" / "val.json").write_text(json.dumps(_records(6, rng)))
    for kind in ("lingudistill", "kd"):
        block = next(b for b in _blocks("yaml") if b.startswith(f"plugin: {kind}\n"))
        (tmp_path / f"my-{kind}.yaml").write_text(block)
    return tmp_path


def _cli(capsys, *args) -> tuple[int, str, str]:
    """`vlmdistill ARGS` (the console script's own `main`), in this process."""
    from vlmdistill.cli import main

    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


SHORT = ["--set", "training.max_steps=4", "--set", "training.save_steps=2", "--set",
         "training.per_device_train_batch_size=4", "--set", "training.logging_steps=1"]


@pytest.mark.parametrize("plugin", ["lingudistill", "kd"])
def test_readme_walkthrough_trains_and_exports_a_loadable_student(workspace, plugin, capsys, monkeypatch):
    monkeypatch.chdir(workspace)
    recipe = f"my-{plugin}.yaml"
    commands = [line.split() for line in _blocks("bash")[0].strip().splitlines()]
    assert commands == [["vlmdistill", "train", "my-lingudistill.yaml", "--dry-run"],
                        ["vlmdistill", "train", "my-lingudistill.yaml"]]
    code, out, err = _cli(capsys, "train", recipe, "--dry-run")
    assert code == 0, err[-3000:]
    assert "student: checkpoints/my-vlm -> LlavaForConditionalGeneration (from config.json architectures)" in out
    assert "24 conversations from data/train.json (18 with images" in out

    code, out, err = _cli(capsys, "train", recipe, *SHORT)
    assert code == 0, err[-3000:]
    out = workspace / "runs" / f"my-{plugin}"
    state = json.loads((out / "checkpoints" / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["global_step"] == 4 and any("distill/kd" in h for h in state["log_history"])
    if plugin == "lingudistill":  # eval_data is evaluated at every checkpoint
        assert [h["step"] for h in state["log_history"] if "eval_loss" in h] == [2, 4]
    for name in ("config.json", "model.safetensors", "processor_config.json", "tokenizer.json", "chat_template.jinja"):
        assert (out / "student" / name).is_file(), name

    python = _blocks("python")[0].replace("runs/my-lingudistill", f"runs/my-{plugin}")
    loaded = subprocess.run([sys.executable, "-c", python + "\nprint(type(model).__name__, type(processor).__name__, "
                                                            "processor.chat_template is not None)"],
                            cwd=workspace, capture_output=True, text=True, timeout=300)
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    assert loaded.stdout.split() == ["LlavaForConditionalGeneration", "LlavaProcessor", "True"]
    from transformers import LlavaForConditionalGeneration

    before = LlavaForConditionalGeneration.from_pretrained(workspace / "checkpoints" / "my-vlm")
    after = LlavaForConditionalGeneration.from_pretrained(out / "student")
    assert not torch.equal(before.lm_head.weight, after.lm_head.weight)  # it trained


def test_model_class_comes_from_the_folder(workspace):
    from vlmdistill.checkpoints import model_class

    cls, how = model_class(str(workspace / "checkpoints" / "my-vlm"), None, "student")
    assert cls.__name__ == "LlavaForConditionalGeneration" and how == "config.json architectures"
    config = json.loads((workspace / "checkpoints" / "my-lm" / "config.json").read_text())
    config["architectures"] = ["SomeRemoteCodeModel"]  # not in transformers: the model_type decides
    (workspace / "checkpoints" / "my-lm" / "config.json").write_text(json.dumps(config))
    cls, how = model_class(str(workspace / "checkpoints" / "my-lm"), None, "teacher")
    assert cls.__name__ == "LlamaForCausalLM" and "model_type 'llama'" in how
    config["model_type"] = "made_up"
    (workspace / "checkpoints" / "my-lm" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="model_type 'made_up' is not a transformers model type.*never run"):
        model_class(str(workspace / "checkpoints" / "my-lm"), None, "teacher")


def test_dry_run_names_what_is_wrong_without_building_a_model(workspace, monkeypatch):
    monkeypatch.chdir(workspace)
    recipe = load_recipe("my-lingudistill.yaml")
    lines = check_recipe(recipe)
    assert any(line.startswith("teacher: checkpoints/my-lm -> LlamaForCausalLM") for line in lines)
    assert any("categories coco: 12, docvqa: 6, sciqa: 6" in line for line in lines)

    data = yaml.safe_load(open("my-lingudistill.yaml"))
    del data["config"]["dataset_categories"]["sciqa"]
    open("bad.yaml", "w").write(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=r"categories \['sciqa'\] .* are not in the config's dataset_categories"):
        check_recipe(load_recipe("bad.yaml"))
    records = json.loads(open("data/train.json").read())
    records[5]["image"] = "missing.png"
    open("data/train.json", "w").write(json.dumps(records))
    with pytest.raises(DataError, match=r"data/train.json, record 5: image .*missing.png does not exist"):
        check_recipe(recipe)
    with pytest.raises(ConfigError, match=r"unknown argument\(s\) \['max_len'\]; valid: path, image_root"):
        check_recipe(load_recipe("my-lingudistill.yaml", ["data.kwargs.max_len=8"]))
    with pytest.raises(ConfigError, match="category_column feeds selective distillation.*plugin 'kd'"):
        check_recipe(load_recipe("my-kd.yaml", ["data.kwargs.category_column=source"]))
    os.remove("checkpoints/my-lm/model.safetensors")
    with pytest.raises(ConfigError, match="teacher.path 'checkpoints/my-lm' holds no weights"):
        check_recipe(recipe)


@pytest.mark.parametrize("name", ["smolvlm-256m", "smollm2-360m-vlm", "llava-1.5-7b", "qwen2-vl-2b"])
def test_templates_are_valid_recipes_with_placeholder_paths(name):
    from vlmdistill.recipes import training_arguments

    recipe = load_recipe(os.path.join(ROOT, "configs", "lingudistill", f"{name}.yaml"))
    assert recipe.plugin == "lingudistill" and recipe.config["alpha"] == 0.5
    args = training_arguments(recipe)
    assert args.learning_rate == 2e-5 and args.max_steps == 4000 and args.remove_unused_columns is False
    assert args.per_device_train_batch_size * args.gradient_accumulation_steps == 128
    with pytest.raises(ConfigError, match="student.path 'checkpoints/.*' is not a local folder"):
        check_recipe(recipe)


def test_the_folders_tokenizers_check_the_vocabulary(workspace, monkeypatch):
    """The teacher folder's tokenizer reaches wrap(): a teacher that speaks another vocabulary is refused, naming
    the first id where the two disagree (sizes alone would only say they differ)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from vlmdistill.errors import IncompatibleTeacherError
    from vlmdistill.recipes import run_recipe

    monkeypatch.chdir(workspace)
    vocab = {token: i for i, token in enumerate(["<pad>", "<eos>", "<bos>"]  # <eos> and <bos> swapped
                                                 + [chr(c) for c in range(ord("a"), ord("z") + 1)])}
    other = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    other.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=other, pad_token="<pad>").save_pretrained("checkpoints/my-lm")
    with pytest.raises(IncompatibleTeacherError, match="tokenizers disagree at id 1: '<bos>' for the student vs "
                                                       "'<eos>' for the teacher"):
        run_recipe(load_recipe("my-lingudistill.yaml", ["training.max_steps=1"]))
