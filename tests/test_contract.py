"""The plugin contract, checked for every registered plugin (see tests/contract_cases/)."""

from __future__ import annotations

import os

import pytest
import torch
from contract_cases import load_case
from torch import nn
from trainer_data import ExampleList
from transformers import Trainer, TrainingArguments

import vlmdistill
from vlmdistill.errors import ConfigError, UnknownPluginError
from vlmdistill.io import PLUGIN_CONFIG_NAME, PLUGIN_STATE_NAME

PLUGINS = vlmdistill.list_plugins()


def _wrap(case, student=None, teacher="__make__", **extra):
    student = student if student is not None else case.make_student()
    teacher = case.make_teacher(student) if teacher == "__make__" else teacher
    wrapped = vlmdistill.wrap(student, plugin=extra.pop("plugin"), teacher=teacher, config=dict(case.config),
                              **case.runtime, **extra)
    return wrapped


def _attn_impls(model):
    config = getattr(model, "config", None)
    if config is None:
        return None
    out = {"": getattr(config, "_attn_implementation", None)}
    for key in getattr(config, "sub_configs", {}) or {}:
        sub = getattr(config, key, None)
        if sub is not None:
            out[key] = getattr(sub, "_attn_implementation", None)
    return out


def _hooks(model):
    return {name: (dict(m._forward_hooks), dict(m._forward_pre_hooks), dict(m._backward_hooks),
                   dict(getattr(m, "_forward_hooks_with_kwargs", {})))
            for name, m in model.named_modules()}


def _loss_step(wrapped, batches, case, optimizer=None):
    """One optimizer step over a window of micro-batches, normalised as the Trainer does."""
    inner = wrapped
    inner.plugin.on_accumulation_window(batches)
    num_items = case.num_items(batches)
    total = 0.0
    for batch in batches:
        out = wrapped(**batch, num_items_in_batch=num_items)
        loss = out.loss if num_items is not None else out.loss / len(batches)
        loss.backward()
        total += float(loss.detach())
    if optimizer is not None:
        optimizer.step()
        optimizer.zero_grad()
        wrapped.step_end()
    return total


def test_every_plugin_has_a_contract_case():
    assert "kd" in PLUGINS
    for name in PLUGINS:
        load_case(name)


def test_unknown_plugin_lists_installed():
    with pytest.raises(UnknownPluginError) as err:
        vlmdistill.wrap(nn.Linear(2, 2), plugin="no-such-plugin")
    for name in PLUGINS:
        assert name in str(err.value)


@pytest.mark.parametrize("plugin", PLUGINS)
def test_unknown_config_key_lists_valid_keys(plugin):
    case = load_case(plugin)
    cls = vlmdistill.get_plugin(plugin)
    with pytest.raises(ConfigError) as err:
        _wrap(case, plugin=plugin, not_a_real_key=1)
    assert "not_a_real_key" in str(err.value)
    for key in cls.config_class.field_names():
        assert key in str(err.value)


@pytest.mark.parametrize("plugin", PLUGINS)
def test_teacher_frozen_hidden_and_run_without_grad(plugin):
    case = load_case(plugin)
    wrapped = _wrap(case, plugin=plugin)
    teacher = wrapped.teacher
    assert teacher is not None
    teacher_tensors = {t.data_ptr() for t in teacher.parameters()}
    if wrapped.plugin.teacher_is_student_base:
        pytest.skip("the teacher is the student's own base weights")
    assert all(not p.requires_grad for p in teacher.parameters())
    assert not teacher_tensors & {p.data_ptr() for p in wrapped.parameters()}
    assert not {id(m) for m in teacher.modules()} & {id(m) for _, m in wrapped.named_modules()}
    own_teacher = vlmdistill.get_plugin(plugin).teacher_policy == "none"
    for key, value in wrapped.state_dict().items():
        if value.data_ptr() in teacher_tensors:
            # A plugin-built (EMA) teacher is plugin state, saved apart from the student.
            assert own_teacher and key.startswith("plugin.hidden."), key

    seen = []

    def spy(module, args, kwargs):
        seen.append((module.training, torch.is_grad_enabled()))

    handle = teacher.register_forward_pre_hook(spy, with_kwargs=True)
    teacher.train()  # the wrapper must put it back in eval mode itself
    wrapped.train()
    _loss_step(wrapped, [case.batch(2)], case)
    handle.remove()
    assert seen and all(mode == (False, False) for mode in seen)
    assert all(p.grad is None for p in teacher.parameters())

    args = TrainingArguments(output_dir="unused", report_to=[], use_cpu=True)
    trainer = Trainer(model=wrapped, args=args)
    optimizer = trainer.create_optimizer()
    in_optimizer = {p.data_ptr() for g in optimizer.param_groups for p in g["params"]}
    assert not in_optimizer & teacher_tensors
    assert in_optimizer == {p.data_ptr() for p in wrapped.parameters() if p.requires_grad}


@pytest.mark.parametrize("plugin", PLUGINS)
def test_unwrap_restores_student_exactly(plugin):
    case = load_case(plugin)
    student = case.make_student()
    student.eval()
    batch = case.batch(3, seed=5)
    plain_batch = {k: v for k, v in batch.items() if k not in vlmdistill.get_plugin(plugin).extra_inputs}
    with torch.no_grad():
        before_out = student(**plain_batch)
    before_state = {k: v.clone() for k, v in student.state_dict().items()}
    before_hooks = _hooks(student)
    before_attn = _attn_impls(student)
    cls = type(student)

    wrapped = _wrap(case, student=student, plugin=plugin)
    wrapped.train()
    _loss_step(wrapped, [batch], case)  # a forward/backward with everything attached, no optimizer step
    restored = vlmdistill.unwrap(wrapped)

    assert restored is student and type(restored) is cls
    after_state = restored.state_dict()
    assert list(after_state) == list(before_state)
    for key in before_state:
        assert torch.equal(after_state[key], before_state[key]), key
    assert _hooks(restored) == before_hooks
    assert _attn_impls(restored) == before_attn
    restored.eval()
    with torch.no_grad():
        after_out = restored(**plain_batch)
    for key in ("logits", "logits_per_image", "image_embeds", "last_hidden_state"):
        if isinstance(before_out, dict) and key in before_out:
            assert torch.equal(before_out[key], after_out[key]), key
    if isinstance(before_out, torch.Tensor):
        assert torch.equal(before_out, after_out)


def _train(wrapped, case, steps, start_seed=0, optimizer=None):
    optimizer = optimizer or torch.optim.AdamW([p for p in wrapped.parameters() if p.requires_grad], lr=1e-2)
    wrapped.train()
    losses = []
    for step in range(steps):
        batches = [case.batch(2, seed=100 + start_seed + step), case.batch(2, seed=200 + start_seed + step)]
        losses.append(_loss_step(wrapped, batches, case, optimizer))
    return losses, optimizer


@pytest.mark.parametrize("plugin", PLUGINS)
def test_save_load_resume_matches_uninterrupted(plugin, tmp_path):
    case = load_case(plugin)
    n, m = 3, 3
    torch.manual_seed(0)
    reference = _wrap(case, plugin=plugin)
    ref_losses, _ = _train(reference, case, n + m)

    torch.manual_seed(0)
    first = _wrap(case, plugin=plugin)
    losses_a, optimizer = _train(first, case, n)
    first.save_pretrained(tmp_path / "ckpt")
    torch.save(optimizer.state_dict(), tmp_path / "optimizer.pt")
    assert (tmp_path / "ckpt" / PLUGIN_CONFIG_NAME).is_file()
    assert (tmp_path / "ckpt" / PLUGIN_STATE_NAME).is_file()

    fresh = case.make_student()
    resumed = vlmdistill.load(str(tmp_path / "ckpt"), model=fresh, teacher=case.make_teacher(fresh), **case.runtime)
    opt2 = torch.optim.AdamW([p for p in resumed.parameters() if p.requires_grad], lr=1e-2)
    opt2.load_state_dict(torch.load(tmp_path / "optimizer.pt"))
    losses_b, _ = _train(resumed, case, m, start_seed=n, optimizer=opt2)
    torch.testing.assert_close(torch.tensor(losses_a + losses_b), torch.tensor(ref_losses), rtol=1e-5, atol=1e-6)
    assert int(resumed.plugin.global_step) == n + m

    if case.hf_student:
        # The exported student loads with plain transformers, and holds no plugin tensors.
        plain = type(fresh).from_pretrained(tmp_path / "ckpt")
        for key, value in vlmdistill.unwrap(first).state_dict().items():
            assert torch.equal(plain.state_dict()[key], value), key
        from safetensors import safe_open

        weights = [f for f in os.listdir(tmp_path / "ckpt") if f.endswith(".safetensors") and f != PLUGIN_STATE_NAME]
        for name in weights:
            with safe_open(str(tmp_path / "ckpt" / name), framework="pt") as handle:
                assert not [k for k in handle.keys() if k.startswith("plugin")]


@pytest.mark.parametrize("plugin", PLUGINS)
def test_accumulation_equals_big_batch(plugin):
    case = load_case(plugin)
    big = case.batch(4, seed=7)
    halves = [{k: v[:2] for k, v in big.items()}, {k: v[2:] for k, v in big.items()}]

    torch.manual_seed(0)
    a = _wrap(case, plugin=plugin)
    _loss_step(a, [big], case)
    torch.manual_seed(0)
    b = _wrap(case, plugin=plugin)
    _loss_step(b, halves, case)
    grads_a = {n: p.grad for n, p in a.named_parameters() if p.grad is not None}
    grads_b = {n: p.grad for n, p in b.named_parameters() if p.grad is not None}
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-4, atol=1e-6, msg=name)


def _trainer(case, wrapped, tmp_path, **args):
    # A constant schedule: an interrupted run with a smaller max_steps must follow the same learning rates.
    defaults = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=2, learning_rate=1e-3,
                    lr_scheduler_type="constant",
                    report_to=[], use_cpu=True, logging_steps=1, save_strategy="no", disable_tqdm=True,
                    dataloader_num_workers=0, seed=0)
    defaults.update(args)
    examples = case.examples(16, 11)
    for e in examples:
        e["unrelated_column"] = "dropped by the Trainer"
    collate = case.collate

    def collate_with_junk(items):
        assert all("unrelated_column" not in i for i in items), "the Trainer should prune unknown columns"
        return collate(items)

    cls = vlmdistill.DistillationTrainer if case.trainer == "DistillationTrainer" else Trainer
    callbacks = [] if cls is vlmdistill.DistillationTrainer else [vlmdistill.DistillationCallback()]
    return cls(model=wrapped, args=TrainingArguments(**defaults), train_dataset=ExampleList(examples),
               data_collator=collate_with_junk, callbacks=callbacks)


@pytest.mark.parametrize("plugin", PLUGINS)
def test_trainer_steps_logging_and_columns(plugin, tmp_path):
    case = load_case(plugin)
    wrapped = _wrap(case, plugin=plugin)
    received = []

    def spy(module, args, kwargs):
        received.append(set(kwargs))

    wrapped.register_forward_pre_hook(spy, with_kwargs=True)
    trainer = _trainer(case, wrapped, tmp_path, gradient_accumulation_steps=2, max_steps=3)
    trainer.train()
    assert int(wrapped.plugin.global_step) == trainer.state.global_step == 3
    assert len(received) == 6  # 3 optimizer steps x 2 micro-batches
    extras = set(vlmdistill.get_plugin(plugin).extra_inputs)
    for keys in received:
        assert "unrelated_column" not in keys
        assert extras <= keys, f"plugin inputs {extras - keys} were pruned by the Trainer"
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert logged and all(any(k.startswith("distill/") for k in h) for h in logged)


@pytest.mark.parametrize("plugin", PLUGINS)
def test_trainer_resume_from_checkpoint_matches(plugin, tmp_path):
    case = load_case(plugin)
    torch.manual_seed(0)
    full = _trainer(case, _wrap(case, plugin=plugin), tmp_path / "a", max_steps=4, gradient_accumulation_steps=2)
    full.train()
    ref = [h["loss"] for h in full.state.log_history if "loss" in h]

    torch.manual_seed(0)
    part = _trainer(case, _wrap(case, plugin=plugin), tmp_path / "b", max_steps=2, gradient_accumulation_steps=2,
                    save_strategy="steps", save_steps=2)
    part.train()
    torch.manual_seed(0)
    resumed_model = _wrap(case, plugin=plugin)
    resumed = _trainer(case, resumed_model, tmp_path / "b", max_steps=4, gradient_accumulation_steps=2)
    resumed.train(resume_from_checkpoint=str(tmp_path / "b" / "out" / "checkpoint-2"))
    got = [h["loss"] for h in resumed.state.log_history if "loss" in h]
    assert int(resumed_model.plugin.global_step) == 4
    torch.testing.assert_close(torch.tensor(got[-2:]), torch.tensor(ref[-2:]), rtol=1e-4, atol=1e-6)
