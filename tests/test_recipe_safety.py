"""Recipes: no model-folder code, typed `training:`, and runs that resume only what they ran."""

import json
import os

import pytest
import yaml
from test_cli_recipes import _tiny_recipe

from vlmdistill.cli import main
from vlmdistill.errors import ConfigError
from vlmdistill.recipes import load_recipe, read_yaml, run_recipe
from vlmdistill.runs import RECIPE_RECORD, RUN_SUMMARY


def _remote_code_folder(tmp_path, model_type, vocab=64):
    """A model folder whose config points at Python shipped beside it; importing that file leaves a marker."""
    from tiny_models import tiny_llama

    folder = tmp_path / f"remote-{model_type}"
    tiny_llama(vocab=vocab).save_pretrained(folder)
    marker = tmp_path / f"EXECUTED-{model_type}"
    (folder / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n"
                                             "from transformers import LlamaForCausalLM as EvilModel\n")
    (folder / "configuration_evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n"
                                                  "from transformers import LlamaConfig as EvilConfig\n")
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = model_type
    config["auto_map"] = {"AutoConfig": "configuration_evil.EvilConfig",
                          "AutoModelForCausalLM": "modeling_evil.EvilModel"}
    (folder / "config.json").write_text(json.dumps(config))
    return folder, marker


def _recipe_with_student(tmp_path, student):
    path = _tiny_recipe(tmp_path)
    data = yaml.safe_load(path.read_text())
    data["student"] = student
    path.write_text(yaml.safe_dump(data))
    return path


def _recipe_vocab(tmp_path):
    return yaml.safe_load(_tiny_recipe(tmp_path).read_text())["student"]["kwargs"]["vocab_size"]


@pytest.mark.parametrize("key", ["trust_remote_code", "code_revision", "revision", "token", "cache_dir"])
def test_recipe_refuses_loader_keywords_that_run_code_or_reach_the_network(tmp_path, key):
    folder, marker = _remote_code_folder(tmp_path, "evil")
    path = _recipe_with_student(tmp_path, {"path": str(folder), "kwargs": {key: True}})
    with pytest.raises(ConfigError, match=f"student.kwargs.{key}: refused"):
        load_recipe(str(path))
    assert main(["train", str(path), "--dry-run"]) == 2
    assert not marker.exists()


def test_recipe_from_pretrained_keywords_come_from_an_allow_list(tmp_path):
    path = _recipe_with_student(tmp_path, {"path": str(tmp_path), "kwargs": {"output_loading_info": True}})
    with pytest.raises(ConfigError, match="not an allowed from_pretrained argument; allowed: dtype, torch_dtype"):
        load_recipe(str(path))


@pytest.mark.parametrize("model_type", ["evil", "llama"])
def test_a_model_folder_with_auto_map_never_runs_its_code(tmp_path, model_type):
    folder, marker = _remote_code_folder(tmp_path, model_type, vocab=_recipe_vocab(tmp_path))
    path = _recipe_with_student(tmp_path, {"path": str(folder)})
    recipe = load_recipe(str(path), ["training.max_steps=1"])
    if model_type == "evil":  # only the folder's code could build it: refused, not run
        with pytest.raises(Exception) as info:
            run_recipe(recipe)
        assert "trust_remote_code" in str(info.value)
    else:  # a known model type: transformers' own class is used
        assert run_recipe(recipe)["global_step"] == 1
    assert not marker.exists()


def test_yaml_exponent_floats_are_numbers():
    assert read_yaml("a: 3e-4\nb: 1E5\nc: 10\nd: 1.5\ne: 2.0e-3\nf: -1e3\ng: 1_000") == \
        {"a": 3e-4, "b": 1e5, "c": 10, "d": 1.5, "e": 2e-3, "f": -1e3, "g": 1000}


def test_training_fields_are_typed_at_load_time(tmp_path, capsys):
    path = _tiny_recipe(tmp_path)
    recipe = load_recipe(str(path), ["training.learning_rate=3e-4"])
    assert recipe.training["learning_rate"] == 3e-4 and isinstance(recipe.training["learning_rate"], float)
    with pytest.raises(ConfigError, match=r"training.max_steps: 'ten' \(str\) does not match int"):
        load_recipe(str(path), ["training.max_steps=ten"])
    with pytest.raises(ConfigError, match=r"training.learning_rate: expected a number, got the string 'fast'"):
        load_recipe(str(path), ["training.learning_rate=fast"])
    with pytest.raises(ConfigError, match=r"training.lr_scheduler_type: 'cosin' is not one of \[.*'cosine'"):
        load_recipe(str(path), ["training.lr_scheduler_type=cosin"])
    assert main(["train", str(path), "--dry-run", "--set", "training.max_steps=ten"]) == 2
    assert "does not match int" in capsys.readouterr().err
    # TrainingArguments' own cross-field checks run in --dry-run too
    assert main(["train", str(path), "--dry-run", "--set", "training.bf16=true", "--set", "training.fp16=true"]) == 2
    assert "training:" in capsys.readouterr().err


def test_a_changed_recipe_does_not_resume_an_old_run(tmp_path):
    path = _tiny_recipe(tmp_path, max_steps=2)
    run_recipe(load_recipe(str(path)))
    with pytest.raises(ConfigError, match=r"different recipe; changed: config.alpha: 0.5 -> 0.9.*resume: force"):
        run_recipe(load_recipe(str(path), ["config.alpha=0.9"]))
    with pytest.raises(ConfigError, match="resume: false, but .* already holds a run"):
        run_recipe(load_recipe(str(path), ["resume=false"]))


def test_a_finished_run_is_reported_not_extended(tmp_path):
    path = _tiny_recipe(tmp_path, max_steps=2)
    first = run_recipe(load_recipe(str(path)))
    final_state = os.path.join(first["final"], "vlmdistill_plugin_state.safetensors")
    stamp = os.path.getmtime(final_state)
    again = run_recipe(load_recipe(str(path)))
    assert again["already_finished"] and again["global_step"] == 2
    assert os.path.getmtime(final_state) == stamp  # final/ untouched
    assert json.load(open(tmp_path / "run" / RUN_SUMMARY))["global_step"] == 2
    assert json.load(open(tmp_path / "run" / RECIPE_RECORD))["config"]["alpha"] == 0.5


def test_a_damaged_latest_checkpoint_is_named_and_the_previous_one_used(tmp_path):
    path = _tiny_recipe(tmp_path, max_steps=4)
    from transformers import TrainerCallback

    class StopAt(TrainerCallback):  # an interruption after the step-4 checkpoint, before the run finishes
        def on_save(self, args, state, control, **kwargs):
            if state.global_step == 4:
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_recipe(load_recipe(str(path)), callbacks=[StopAt()])
    weights = tmp_path / "run" / "checkpoints" / "checkpoint-4" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.warns(UserWarning, match=r"checkpoint-4 is damaged \(model.safetensors: .* damaged or truncated"):
        summary = run_recipe(load_recipe(str(path)))
    assert summary["resumed_from"].endswith("checkpoint-2") and summary["global_step"] == 4
