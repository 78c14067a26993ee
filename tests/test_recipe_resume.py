"""Every demo recipe resumes exactly: interrupted after a checkpoint and rerun, it ends where an uninterrupted run
ends (same weights, same logged losses)."""

import glob
import os

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from vlmdistill.recipes import load_recipe, run_recipe

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = sorted(glob.glob(os.path.join(ROOT, "configs", "*", "demo.yaml")))
SHORT = ["training.max_steps=4", "training.save_steps=2", "training.logging_steps=1", "training.warmup_steps=1",
         "training.disable_tqdm=true"]


def _lingudistill(tmp_path):
    parts = str(tmp_path / "parts")
    return [f"student.kwargs.parts={parts}", "student.kwargs.lm_steps=2", "student.kwargs.vision_steps=2",
            f"teacher.kwargs.parts={parts}", "teacher.kwargs.lm_steps=2", "teacher.kwargs.vision_steps=2",
            f"data.kwargs.parts={parts}", "data.kwargs.text_blocks=16", "training.per_device_train_batch_size=4"]


def _msd(tmp_path):
    return ["training.per_device_train_batch_size=4", "training.gradient_accumulation_steps=2",
            "config.micro_batch_size=4", "config.queue_size=16", "config.alpha_warmup_steps=2"]


def _ccd(tmp_path):
    return ["data.kwargs.images=48", "training.per_device_train_batch_size=4",
            "config.freeze_last_layer_fraction=0.25", "config.pseudo_mask_fraction=0.75"]


def _dcclip(tmp_path):
    """The recipe's inputs, made small: the demo's shards and tokenizer, an untrained teacher, no feature cache,
    and the stage switch inside the interrupted part."""
    from vlmdistill.eval.experiments import dcclip as demo

    work = str(tmp_path / "artifacts")
    data = demo.build_data(work, quick=True)
    teacher = demo.export(demo.make_clip(demo.TEACHER, len(data["tokenizer"]), seed=1), data["tokenizer"],
                          os.path.join(work, "teacher"))
    tok = os.path.join(work, "tokenizer")
    shards = data["paths"]["student"]
    return [f"student.kwargs.tokenizer={tok}", f"teacher.path={teacher}", f"data.kwargs.shards={shards}",
            f"data.kwargs.tokenizer={tok}", "data.kwargs.shuffle_buffer=64", "config.teacher_cache=null",
            "config.switch_at_step=3", "training.per_device_train_batch_size=8"]


def _kd(tmp_path):
    """What `vlmdistill demo kd` saves for the recipe, made small: a tokenizer and an untrained 1-layer teacher."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from vlmdistill.data.text import split_by_module, stdlib_docstrings, train_tokenizer

    tokenizer = train_tokenizer(split_by_module(stdlib_docstrings())[0][:300], vocab_size=512)
    tokenizer.save_pretrained(str(tmp_path / "tokenizer"))
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
                     ).save_pretrained(str(tmp_path / "teacher"))
    return [f"teacher.path={tmp_path / 'teacher'}", f"student.kwargs.vocab_size={len(tokenizer)}",
            f"data.kwargs.tokenizer={tmp_path / 'tokenizer'}", f"eval_data.kwargs.tokenizer={tmp_path / 'tokenizer'}",
            "data.kwargs.max_blocks=32", "eval_data.kwargs.max_blocks=8", "training.per_device_train_batch_size=4"]


SHRINK = {"lingudistill": _lingudistill, "msd": _msd, "ccd": _ccd, "dcclip": _dcclip, "kd": _kd}


class InterruptAfterSave(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt


def _run(path, overrides, output_dir, callbacks=None):
    return run_recipe(load_recipe(path, [*overrides, f"output_dir={output_dir}"]), callbacks=callbacks)


def _losses(summary):
    return [(h["step"], h["loss"]) for h in summary["log_history"] if "loss" in h]


def test_every_plugin_with_a_demo_has_a_demo_recipe_checked_here():
    assert {os.path.basename(os.path.dirname(p)) for p in RECIPES} == set(SHRINK)


SLOW = {"lingudistill", "ccd", "kd"}  # about a minute each on 2 cores (kd: collecting the docstring corpus)


def _marked(path):
    plugin = os.path.basename(os.path.dirname(path))
    return pytest.param(path, id=plugin, marks=[pytest.mark.slow] if plugin in SLOW else [])


@pytest.mark.parametrize("path", [_marked(p) for p in RECIPES])
def test_demo_recipe_resumes_exactly(path, tmp_path):
    torch.set_num_threads(1)
    plugin = os.path.basename(os.path.dirname(path))
    overrides = SHORT + SHRINK[plugin](tmp_path)
    straight = _run(path, overrides, tmp_path / "straight")
    with pytest.raises(KeyboardInterrupt):
        _run(path, overrides, tmp_path / "interrupted", callbacks=[InterruptAfterSave(2)])
    resumed = _run(path, overrides, tmp_path / "interrupted")
    assert resumed["resumed_from"].endswith("checkpoint-2") and resumed["global_step"] == straight["global_step"] == 4
    assert _losses(resumed)[-2:] == _losses(straight)[-2:]
    for name in ("model.safetensors", "vlmdistill_plugin_state.safetensors"):
        expected = load_file(os.path.join(straight["final"], name))
        got = load_file(os.path.join(resumed["final"], name))
        assert expected.keys() == got.keys()
        for key in expected:
            assert torch.equal(expected[key], got[key]), f"{name}:{key}"
