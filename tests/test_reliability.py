"""Bad batches and interrupted or damaged state: nothing is corrupted silently, nothing is lost."""

import json
import os

import pytest
import torch
from contract_cases import load_case
from trainer_data import ExampleList
from transformers import Trainer, TrainingArguments

import vlmdistill
from vlmdistill.errors import ConfigError, DataError, NonFiniteLossError
from vlmdistill.io import PLUGIN_CONFIG_NAME, PLUGIN_STATE_NAME

LABELLED = ["kd", "lingudistill"]  # plugins whose supervision is per token (labels, -100 = unsupervised)


def _masked(examples):
    return [{**e, "labels": torch.full_like(e["labels"], -100)} for e in examples]


def _train_one_step(plugin, examples, tmp_path, *, batch, accumulation):
    case = load_case(plugin)
    torch.manual_seed(0)
    student = case.make_student()
    wrapped = vlmdistill.wrap(student, plugin=plugin, teacher=case.make_teacher(student), config=dict(case.config),
                              **case.runtime)
    before = {n: p.detach().clone() for n, p in wrapped.named_parameters()}
    args = TrainingArguments(output_dir=str(tmp_path / "out"), per_device_train_batch_size=batch,
                             gradient_accumulation_steps=accumulation, max_steps=1, learning_rate=0.5, optim="sgd",
                             weight_decay=0.0, lr_scheduler_type="constant", max_grad_norm=0.0,
                             train_sampling_strategy="sequential", report_to=[], use_cpu=True, save_strategy="no",
                             disable_tqdm=True, remove_unused_columns=False)
    trainer = Trainer(model=wrapped, args=args, train_dataset=ExampleList(examples), data_collator=case.collate,
                      callbacks=[vlmdistill.DistillationCallback()])
    trainer.train()
    after = {n: p.detach().clone() for n, p in wrapped.named_parameters()}
    return before, after, wrapped


@pytest.mark.parametrize("plugin", LABELLED)
@pytest.mark.parametrize("accumulation", [1, 2])
def test_a_window_with_nothing_supervised_changes_no_weight(plugin, tmp_path, accumulation):
    examples = _masked(load_case(plugin).examples(2 * accumulation, 3))
    before, after, _ = _train_one_step(plugin, examples, tmp_path, batch=2, accumulation=accumulation)
    for name, value in after.items():
        assert torch.isfinite(value).all(), name
        assert torch.equal(value, before[name]), f"{name} moved on a batch with no supervised token"


@pytest.mark.parametrize("plugin", LABELLED)
def test_an_unsupervised_micro_batch_adds_nothing_to_its_window(plugin, tmp_path):
    """[all-masked, normal] accumulated = [normal] alone: the masked micro-batch contributes exactly zero."""
    case = load_case(plugin)
    normal = case.examples(2, 5)
    _, with_masked, _ = _train_one_step(plugin, _masked(case.examples(2, 3)) + normal, tmp_path / "a", batch=2,
                                        accumulation=2)
    _, alone, _ = _train_one_step(plugin, normal, tmp_path / "b", batch=2, accumulation=1)
    for name in alone:
        torch.testing.assert_close(with_masked[name], alone[name], rtol=1e-5, atol=1e-7, msg=name)


def _nan_first_weight(wrapped):
    # a weight the loss reads: one that had a gradient (dcclip's first parameter, the logit scale, is idle in stage 1)
    trainable = [p for p in wrapped.student.parameters() if p.is_floating_point() and p.requires_grad]
    param = next((p for p in trainable if p.grad is not None), trainable[0])
    with torch.no_grad():
        param.fill_(float("nan"))


@pytest.mark.parametrize("plugin", vlmdistill.list_plugins())
def test_a_non_finite_loss_term_is_refused_with_its_name_and_step(plugin):
    case = load_case(plugin)
    torch.manual_seed(0)
    student = case.make_student()
    wrapped = vlmdistill.wrap(student, plugin=plugin, teacher=case.make_teacher(student), config=dict(case.config),
                              **case.runtime)
    wrapped.train()
    batch = case.batch(2, seed=1)
    wrapped.plugin.on_accumulation_window([batch])
    wrapped(**batch, num_items_in_batch=case.num_items([batch])).loss.backward()
    wrapped.step_end()
    _nan_first_weight(wrapped)
    wrapped.plugin.on_accumulation_window([batch])
    with pytest.raises(NonFiniteLossError, match=r"loss term '\w+' is nan in optimizer step 2"):
        wrapped(**batch, num_items_in_batch=case.num_items([batch]))


def test_skip_mode_drops_the_step_and_leaves_optimizer_state_alone(tmp_path):
    case = load_case("kd")
    examples = case.examples(2, 3)
    torch.manual_seed(0)
    student = case.make_student()
    wrapped = vlmdistill.wrap(student, plugin="kd", teacher=case.make_teacher(student), config=dict(case.config),
                              on_nonfinite="skip")
    _nan_first_weight(wrapped)
    before = {n: p.detach().clone() for n, p in wrapped.named_parameters()}
    args = TrainingArguments(output_dir=str(tmp_path / "out"), per_device_train_batch_size=2, max_steps=2,
                             learning_rate=0.1, weight_decay=0.1, report_to=[], use_cpu=True, save_strategy="no",
                             disable_tqdm=True)
    trainer = Trainer(model=wrapped, args=args, train_dataset=ExampleList(examples), data_collator=case.collate,
                      callbacks=[vlmdistill.DistillationCallback()])
    with pytest.warns(RuntimeWarning, match="skipping this optimizer step"):
        trainer.train()
    assert trainer.state.global_step == 2
    assert int(wrapped.plugin.global_step) == 0  # the plugin counts only steps the optimizer took
    assert not trainer.optimizer.state  # AdamW never stepped: no moments, no weight decay
    for name, value in wrapped.named_parameters():
        assert torch.equal(value.detach(), before[name]) or torch.isnan(before[name]).all(), name


def test_nan_in_the_first_batch_inputs_is_refused_naming_the_column():
    case = load_case("dcclip")
    student = case.make_student()
    wrapped = vlmdistill.wrap(student, plugin="dcclip", teacher=case.make_teacher(student), config=dict(case.config),
                              **case.runtime)
    wrapped.train()
    batch = case.batch(2, seed=1)
    batch["pixel_values"][0, 0, 0, 0] = float("nan")
    with pytest.raises(DataError, match=r"1 non-finite value\(s\) \(NaN/inf\) in 'pixel_values'"):
        wrapped(**batch)


def test_unknown_nonfinite_policy_is_refused():
    case = load_case("kd")
    student = case.make_student()
    with pytest.raises(ConfigError, match="raise, skip"):
        vlmdistill.wrap(student, plugin="kd", teacher=case.make_teacher(student), on_nonfinite="ignore")


@pytest.mark.parametrize("plugin", LABELLED)
def test_labels_that_do_not_fit_the_logits_are_refused(plugin):
    case = load_case(plugin)
    student = case.make_student()
    wrapped = vlmdistill.wrap(student, plugin=plugin, teacher=case.make_teacher(student), config=dict(case.config),
                              **case.runtime)
    batch = case.batch(2, seed=1)
    batch["labels"] = batch["labels"][:, :-2]
    with pytest.raises(DataError, match=r"labels of shape \(2, \d+\) do not fit"):
        wrapped(**batch)


# ---------------------------------------------------------------------------------------------- load()
def _saved(case, plugin, tmp_path):
    student = case.make_student()
    teacher = case.make_teacher(student)
    wrapped = vlmdistill.wrap(student, plugin=plugin, teacher=teacher, config=dict(case.config), **case.runtime)
    wrapped.save_pretrained(str(tmp_path / "saved"))
    return str(tmp_path / "saved")


def _fresh(case):
    student = case.make_student()
    return student, case.make_teacher(student)


def test_load_refuses_a_state_file_of_another_plugin_and_attaches_nothing(tmp_path):
    case = load_case("lingudistill")
    directory = _saved(case, "lingudistill", tmp_path)
    meta_path = os.path.join(directory, PLUGIN_CONFIG_NAME)
    meta = json.load(open(meta_path))
    meta["plugin"] = "kd"
    json.dump(meta, open(meta_path, "w"))
    student, teacher = _fresh(case)
    with pytest.raises(DataError, match="holds the state of plugin 'lingudistill', but .* names 'kd'"):
        vlmdistill.load(directory, model=student, teacher=teacher)
    meta["plugin"] = "lingudistill"
    json.dump(meta, open(meta_path, "w"))
    vlmdistill.load(directory, model=student, teacher=teacher, **case.runtime)  # nothing was left attached


def test_load_refuses_a_student_of_another_class_before_touching_it(tmp_path):
    from tiny_models import tiny_llama

    case = load_case("lingudistill")
    directory = _saved(case, "lingudistill", tmp_path)
    other = tiny_llama(seed=3)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(ConfigError, match="saved from a .*LlavaForConditionalGeneration student; model= is a "
                                          ".*LlamaForCausalLM"):
        vlmdistill.load(directory, model=other, teacher=tiny_llama(seed=4))
    assert all(torch.equal(v, before[k]) for k, v in other.state_dict().items())


def test_load_refuses_weights_of_another_size_without_building_a_model(tmp_path):
    case = load_case("kd")
    directory = _saved(case, "kd", tmp_path)
    from tiny_models import tiny_llama

    wider = tiny_llama(seed=1, tie=True, hidden=48)
    with pytest.raises(DataError, match=r"do not fit LlamaForCausalLM \(shape mismatch .*saved \(64, 32\), "
                                        r"model \(64, 48\)"):
        vlmdistill.load(directory, model=wider, teacher=case.make_teacher(wider))


def test_load_copies_weights_into_the_given_student_in_place(tmp_path):
    case = load_case("lingudistill")
    student = case.make_student()
    wrapped = vlmdistill.wrap(student, plugin="lingudistill", teacher=case.make_teacher(student),
                              config=dict(case.config), **case.runtime)
    wrapped.save_pretrained(str(tmp_path / "saved"))
    saved = {k: v.clone() for k, v in vlmdistill.unwrap(wrapped).state_dict().items()}
    torch.manual_seed(9)
    other, teacher = _fresh(case)
    pointers = {k: v.data_ptr() for k, v in other.state_dict().items()}
    loaded = vlmdistill.load(str(tmp_path / "saved"), model=other, teacher=teacher, **case.runtime)
    assert loaded.student is other
    state = other.state_dict()
    assert {k: v.data_ptr() for k, v in state.items()} == pointers  # same tensors: no second model was built
    for key, value in saved.items():
        assert torch.equal(state[key], value), key


def test_a_truncated_state_file_is_named(tmp_path):
    case = load_case("kd")
    directory = _saved(case, "kd", tmp_path)
    path = os.path.join(directory, PLUGIN_STATE_NAME)
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    student, teacher = _fresh(case)
    with pytest.raises(DataError, match=f"{PLUGIN_STATE_NAME} is damaged or truncated"):
        vlmdistill.load(directory, model=student, teacher=teacher)


def test_nonfinite_policy_survives_save_and_load(tmp_path):
    case = load_case("kd")
    student = case.make_student()
    wrapped = vlmdistill.wrap(student, plugin="kd", teacher=case.make_teacher(student), config=dict(case.config),
                              on_nonfinite="skip")
    wrapped.save_pretrained(str(tmp_path / "saved"))
    student, teacher = _fresh(case)
    assert vlmdistill.load(str(tmp_path / "saved"), model=student, teacher=teacher).on_nonfinite == "skip"


def test_a_plugin_state_that_does_not_fit_leaves_nothing_attached(tmp_path):
    from safetensors.torch import load_file, save_file

    case = load_case("lingudistill")
    directory = _saved(case, "lingudistill", tmp_path)
    path = os.path.join(directory, PLUGIN_STATE_NAME)
    good = load_file(path)
    save_file({**good, "global_step": torch.zeros(3, dtype=torch.long)}, path, metadata={"plugin": "lingudistill"})
    student, teacher = _fresh(case)
    attention = (student.config.get_text_config()._attn_implementation, teacher.config._attn_implementation)
    with pytest.raises(DataError, match="does not fit the 'lingudistill' plugin"):
        vlmdistill.load(directory, model=student, teacher=teacher, **case.runtime)
    assert (student.config.get_text_config()._attn_implementation, teacher.config._attn_implementation) == attention
    save_file(good, path, metadata={"plugin": "lingudistill"})
    # the same student and teacher load again: the failed attempt left neither attached
    vlmdistill.load(directory, model=student, teacher=teacher, **case.runtime)
