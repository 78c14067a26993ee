"""Batch enlargement: M micro-batches of b give the gradient of one batch of M·b, by hand and under the Trainer."""

import pytest
import torch
from contract_cases.msd import collate, examples, tiny_clip
from trainer_data import ExampleList
from transformers import Trainer, TrainingArguments

import vlmdistill
from vlmdistill.plugins.msd import msd_step
from vlmdistill.plugins.msd.window import split_batch

CONFIG = dict(alpha=0.4, alpha_warmup_steps=0, momentum=0.7, queue_size=12)


def _double_batch(n, seed):
    b = collate(examples(n, seed))
    b["pixel_values"] = b["pixel_values"].double()
    return b


def _warm_model():
    """A float64 wrapper after two steps: the queue is partly filled and the teacher differs from the student."""
    torch.manual_seed(0)
    wrapped = vlmdistill.wrap(tiny_clip().double(), plugin="msd", **CONFIG)
    wrapped.train()
    optimizer = torch.optim.SGD(wrapped.parameters(), lr=0.5)
    for step in range(2):
        msd_step(wrapped, optimizer, _double_batch(4, seed=50 + step), 2)
    assert 0 < int(wrapped.plugin.queues.filled) < CONFIG["queue_size"]
    return wrapped


def _window_grads(wrapped, batches):
    wrapped.zero_grad(set_to_none=True)
    wrapped.plugin.on_accumulation_window(batches)
    total = 0.0
    for batch in batches:
        loss = wrapped(**batch).loss / len(batches)   # what the Trainer does for batches without labels
        loss.backward()
        total += float(loss.detach())
    grads = {n: p.grad.clone() for n, p in wrapped.named_parameters() if p.grad is not None}
    wrapped.plugin._window = None  # drop the window without a step
    return total, grads


@pytest.mark.parametrize("sizes", [[2, 2, 2], [4, 2], [1, 5]])
def test_micro_batches_give_the_macro_batch_gradient(sizes):
    wrapped = _warm_model()
    big = _double_batch(6, seed=7)
    loss_big, grads_big = _window_grads(wrapped, [big])
    chunks, start = [], 0
    for size in sizes:
        chunks.append({k: v[start:start + size] for k, v in big.items()})
        start += size
    loss_micro, grads_micro = _window_grads(wrapped, chunks)
    assert loss_micro == pytest.approx(loss_big, rel=1e-12)
    assert grads_big.keys() == grads_micro.keys() and "plugin.temp" not in grads_big
    assert "student.logit_scale" in grads_big
    for name in grads_big:
        torch.testing.assert_close(grads_micro[name], grads_big[name], rtol=1e-9, atol=1e-12, msg=name)


def test_msd_step_with_micro_batches_equals_one_big_step():
    runs = {}
    for micro in (2, 6):
        torch.manual_seed(0)
        wrapped = vlmdistill.wrap(tiny_clip().double(), plugin="msd", **CONFIG)
        wrapped.train()
        optimizer = torch.optim.SGD(wrapped.parameters(), lr=0.5)
        losses = [msd_step(wrapped, optimizer, _double_batch(6, seed=s), micro) for s in range(4)]
        runs[micro] = (losses, {k: v.clone() for k, v in wrapped.state_dict().items()})
    torch.testing.assert_close(torch.tensor(runs[2][0]), torch.tensor(runs[6][0]), rtol=1e-10, atol=0)
    assert runs[2][1].keys() == runs[6][1].keys()
    for key in runs[2][1]:   # student, EMA teacher, queues, pointer, step counter
        torch.testing.assert_close(runs[2][1][key], runs[6][1][key], rtol=1e-9, atol=1e-12, msg=key)


def _trainer(wrapped, tmp_path, cls=vlmdistill.DistillationTrainer, callbacks=(), data=None, **overrides):
    args = dict(output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=3,
                learning_rate=0.05, optim="sgd", lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=0.0,
                train_sampling_strategy="sequential", report_to=[], use_cpu=True, save_strategy="no",
                disable_tqdm=True, logging_steps=1, seed=0)
    args.update(overrides)
    return cls(model=wrapped, args=TrainingArguments(**args), train_dataset=ExampleList(data or examples(16, 3)),
               data_collator=collate, callbacks=list(callbacks))


def test_trainer_accumulation_equals_the_big_batch(tmp_path):
    """DistillationTrainer with 2 × 2 accumulation ends where 1 × 4 does: same gradients each step (the Trainer
    divides by M, the plugin weighs rows by M/B), one EMA update and one enqueue of 4 keys per step."""
    states = {}
    for batch, accumulate in ((2, 2), (4, 1)):
        torch.manual_seed(0)
        wrapped = vlmdistill.wrap(tiny_clip(), plugin="msd", **CONFIG)
        trainer = _trainer(wrapped, tmp_path / f"{batch}x{accumulate}", per_device_train_batch_size=batch,
                           gradient_accumulation_steps=accumulate)
        trainer.train()
        assert int(wrapped.plugin.global_step) == 3
        assert int(wrapped.plugin.queues.filled) == 12 and int(wrapped.plugin.queues.ptr) == 0
        states[(batch, accumulate)] = {k: v.clone() for k, v in wrapped.state_dict().items()}
        states[(batch, accumulate), "loss"] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    a, b = states[(2, 2)], states[(4, 1)]
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6, msg=key)
    torch.testing.assert_close(torch.tensor(states[(2, 2), "loss"]), torch.tensor(states[(4, 1), "loss"]),
                               rtol=1e-4, atol=1e-6)


def test_distillation_trainer_keeps_the_window_on_the_host(tmp_path):
    """accelerate's loader would move every micro-batch of the window to the device when the Trainer prefetches
    it; for msd the window stays on the host and each micro-batch moves in its own training_step."""
    wrapped = vlmdistill.wrap(tiny_clip(), plugin="msd", **CONFIG)
    assert _trainer(wrapped, tmp_path).get_train_dataloader().device is None


def test_plain_trainer_with_accumulation_is_refused(tmp_path):
    wrapped = vlmdistill.wrap(tiny_clip(), plugin="msd", **CONFIG)
    trainer = _trainer(wrapped, tmp_path, cls=Trainer, callbacks=[vlmdistill.DistillationCallback()])
    with pytest.raises(RuntimeError, match="DistillationTrainer"):
        trainer.train()
    assert int(wrapped.plugin.global_step) == 0   # refused before any optimizer step


def test_plain_trainer_without_accumulation_uses_each_batch_as_its_window(tmp_path):
    wrapped = vlmdistill.wrap(tiny_clip(), plugin="msd", **CONFIG)
    trainer = _trainer(wrapped, tmp_path, cls=Trainer, callbacks=[vlmdistill.DistillationCallback()],
                       gradient_accumulation_steps=1)
    trainer.train()
    assert int(wrapped.plugin.global_step) == 3
    assert int(wrapped.plugin.queues.filled) == 6


def test_a_micro_batch_outside_the_announced_window_is_refused():
    wrapped = vlmdistill.wrap(tiny_clip(), plugin="msd", **CONFIG)
    wrapped.train()
    batch = collate(examples(4, 1))
    wrapped.plugin.on_accumulation_window(split_batch(batch, 2))
    with pytest.raises(ValueError, match="not one of the 2 micro-batches"):
        wrapped(**collate(examples(2, 99)))
    wrapped(**split_batch(batch, 2)[1])   # any order is fine
    wrapped(**split_batch(batch, 2)[0])
    with pytest.raises(RuntimeError, match="already used"):
        wrapped(**split_batch(batch, 2)[0])


def test_evaluation_forward_changes_no_state():
    wrapped = vlmdistill.wrap(tiny_clip(), plugin="msd", **CONFIG)
    wrapped.eval()
    before = {k: v.clone() for k, v in wrapped.state_dict().items()}
    out = wrapped(**collate(examples(3, 1)))
    assert torch.isfinite(out.loss)
    assert wrapped.plugin._window is None
    for key, value in wrapped.state_dict().items():
        assert torch.equal(value, before[key]), key
