"""CLI, YAML recipes (train, resume, validation) and the README's quickstart."""

import os
import re
import subprocess
import sys

import pytest
import yaml

import vlmdistill
from vlmdistill.cli import main
from vlmdistill.errors import ConfigError
from vlmdistill.recipes import load_recipe, run_recipe

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_plugins_command_lists_every_plugin(capsys):
    assert main(["plugins", "-v"]) == 0
    out = capsys.readouterr().out
    for name in vlmdistill.list_plugins():
        assert re.search(rf"^{name}\s+\S", out, re.M)
    assert "temperature" in out  # -v shows config fields


def _tiny_recipe(tmp_path, **training):
    from vlmdistill.data.text import train_tokenizer

    tok = train_tokenizer(["the cat sat on the mat. " * 20, "a dog ran in the park. " * 20], vocab_size=120)
    tok.save_pretrained(tmp_path / "tok")
    text = tmp_path / "corpus.txt"
    text.write_text("\n\n".join(["the cat sat on the mat and the dog ran in the park."] * 40))
    model = {"builder": "from-config",
             "kwargs": {"model_type": "llama", "vocab_size": len(tok), "hidden_size": 32, "intermediate_size": 64,
                        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}}
    teacher = {"builder": "from-config", "kwargs": {**model["kwargs"], "num_hidden_layers": 3, "seed": 1}}
    recipe = {"plugin": "kd", "config": {"alpha": 0.5, "temperature": 2.0}, "student": model, "teacher": teacher,
              "data": {"builder": "text-blocks", "kwargs": {"tokenizer": str(tmp_path / "tok"),
                                                           "files": [str(text)], "block": 16}},
              "training": {"per_device_train_batch_size": 4, "learning_rate": 1e-3, "save_steps": 2,
                           "logging_steps": 1, "disable_tqdm": True, **training},
              "output_dir": str(tmp_path / "run")}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_build_gives_the_models_and_data_of_a_recipe(tmp_path):
    import torch

    from vlmdistill.recipes import build

    path = _tiny_recipe(tmp_path, max_steps=1)
    held_out = ["eval_data.builder=text-blocks", f"eval_data.kwargs.tokenizer={tmp_path / 'tok'}",
                f"eval_data.kwargs.files=[{tmp_path / 'corpus.txt'}]", "eval_data.kwargs.block=8"]
    recipe = load_recipe(str(path), held_out)
    built = build(recipe)
    assert built.student.config.num_hidden_layers == 2 and built.teacher.config.num_hidden_layers == 3
    assert built.train_dataset[0]["input_ids"].shape == (16,) and built.eval_dataset[0]["input_ids"].shape == (8,)
    assert set(built.wrap_kwargs) <= set(vlmdistill.get_plugin("kd").runtime_args)
    again = build(recipe, eval_data=False)  # seeded: the same models and data, no evaluation data
    assert again.eval_dataset is None and again.eval_collator is None
    for a, b in zip(built.student.state_dict().values(), again.student.state_dict().values()):
        assert torch.equal(a, b)
    model = vlmdistill.wrap(built.student, plugin=recipe.plugin, teacher=built.teacher, config=recipe.config,
                            **built.wrap_kwargs)
    out = model(**built.data_collator([built.train_dataset[i] for i in range(4)]))
    assert torch.isfinite(out.loss) and "kd" in out.loss_terms


def test_recipe_trains_exports_and_resumes(tmp_path):
    path = _tiny_recipe(tmp_path, max_steps=2)
    first = run_recipe(load_recipe(str(path)))
    assert first["global_step"] == 2 and first["resumed_from"] is None
    assert os.path.isfile(os.path.join(first["final"], vlmdistill.io.PLUGIN_STATE_NAME))
    from transformers import LlamaForCausalLM

    LlamaForCausalLM.from_pretrained(first["student"])  # plain transformers, no vlmdistill
    assert any("distill/kd" in h for h in first["log_history"])

    # A longer schedule is a changed recipe: continued only when asked (resume: force).
    second = run_recipe(load_recipe(str(path), ["training.max_steps=4", "resume=force"]))
    assert second["resumed_from"].endswith("checkpoint-2")
    assert second["global_step"] == 4


def test_recipe_errors_name_the_problem(tmp_path):
    path = _tiny_recipe(tmp_path)
    data = yaml.safe_load(path.read_text())
    data["studnet"] = data.pop("student")
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match="unknown key.*studnet.*Valid keys: plugin, student, data"):
        load_recipe(str(path))

    path = _tiny_recipe(tmp_path)
    with pytest.raises(ConfigError, match="unknown key.*temprature"):
        load_recipe(str(path), ["config.temprature=3"])
    with pytest.raises(ConfigError, match="unknown TrainingArguments field.*max_stepz.*Valid fields: .*max_steps"):
        load_recipe(str(path), ["training.max_stepz=3"])
    with pytest.raises(ConfigError, match="unknown data builder 'nope'.*text-blocks"):
        run_recipe(load_recipe(str(path), ["data.builder=nope"]))


def test_yaml_cannot_construct_python_objects(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("plugin: !!python/object/apply:os.system ['echo hacked']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_recipe(str(path))


def test_cli_train_dry_run_and_error_exit_code(tmp_path, capsys):
    path = _tiny_recipe(tmp_path)
    assert main(["train", str(path), "--dry-run", "--set", "training.max_steps=1"]) == 0
    assert '"max_steps": 1' in capsys.readouterr().out
    assert main(["train", str(tmp_path / "missing.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_readme_quickstart_runs(tmp_path):
    with open(os.path.join(ROOT, "README.md")) as fh:
        readme = fh.read()
    block = re.search(r"## Quickstart.*?```python\n(.*?)```", readme, re.S).group(1)
    result = subprocess.run([sys.executable, "-c", block], cwd=tmp_path, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "'kd':" in result.stdout and "'task':" in result.stdout
    assert (tmp_path / "runs" / "quickstart" / "config.json").is_file()
