"""Per-step state of msd: EMA once per optimizer step, queue timing, a gradient-free teacher, exact save/resume."""

import pytest
import torch
from contract_cases.msd import collate, examples, tiny_clip

import vlmdistill
from vlmdistill.plugins.msd import msd_step
from vlmdistill.plugins.msd.queue import KeyQueues
from vlmdistill.teachers import EMATeacher

CONFIG = dict(alpha=0.4, alpha_warmup_steps=3, momentum=0.8, queue_size=12)


def _double_batch(n, seed):
    b = collate(examples(n, seed))
    b["pixel_values"] = b["pixel_values"].double()
    return b


def _wrapped(**overrides):
    torch.manual_seed(0)
    wrapped = vlmdistill.wrap(tiny_clip().double(), plugin="msd", **{**CONFIG, **overrides})
    wrapped.train()
    return wrapped


def test_ema_applied_exactly_once_per_optimizer_step(monkeypatch):
    wrapped = _wrapped()
    plugin = wrapped.plugin
    calls = []
    update = EMATeacher.update
    monkeypatch.setattr(EMATeacher, "update", lambda self, *a, **k: (calls.append(1), update(self, *a, **k))[1])
    optimizer = torch.optim.SGD(wrapped.parameters(), lr=0.5)
    expected = {n: p.detach().clone() for n, p in plugin.teacher.named_parameters()}
    m = CONFIG["momentum"]
    for step in range(4):
        msd_step(wrapped, optimizer, _double_batch(6, seed=step), 2)   # M = 3 micro-batches
        student = dict(wrapped.student.named_parameters())
        expected = {n: m * v + (1 - m) * student[n].detach() for n, v in expected.items()}
        assert len(calls) == step + 1
        for name, value in plugin.teacher.named_parameters():
            torch.testing.assert_close(value, expected[name], rtol=1e-12, atol=1e-14, msg=name)
    # A per-micro-batch update would have made the teacher follow with momentum m**3: it is visibly apart.
    assert any(not torch.allclose(p, dict(wrapped.student.named_parameters())[n], atol=1e-3)
               for n, p in plugin.teacher.named_parameters())


def test_queues_never_hold_the_current_macro_batch_at_loss_time():
    wrapped = _wrapped()
    plugin = wrapped.plugin
    optimizer = torch.optim.SGD(wrapped.parameters(), lr=0.5)
    checked, window_keys = [], []

    def spy(module, args, kwargs):
        window = plugin._window
        window_keys.append(window.image_keys)
        queued_image, queued_text = plugin.queues.keys()
        if queued_image is None:
            checked.append(0)
            return
        for keys, queued in ((window.image_keys, queued_image), (window.text_keys, queued_text)):
            distance = torch.cdist(keys, queued.T)     # [B, filled]
            assert distance.min() > 1e-6, "a key of the current macro-batch is already in the queue"
        checked.append(queued_image.shape[1])

    handle = wrapped.student.register_forward_pre_hook(spy, with_kwargs=True)
    for step in range(5):
        msd_step(wrapped, optimizer, _double_batch(4, seed=step), 2)
        # After the step, the macro-batch's keys were enqueued at the pointer (4 per step, K = 12).
        queued_image, _ = plugin.queues.keys()
        start = (4 * step) % 12
        torch.testing.assert_close(queued_image[:, start:start + 4].T, window_keys[-1], rtol=0, atol=0)
    handle.remove()
    assert checked == [0, 0, 4, 4, 8, 8, 12, 12, 12, 12]
    assert int(plugin.queues.ptr) == 20 % 12 and int(plugin.queues.filled) == 12


def test_teacher_never_gets_gradients_or_optimizer_updates():
    wrapped = _wrapped()
    teacher = wrapped.plugin.teacher
    optimizer = torch.optim.SGD(wrapped.parameters(), lr=0.5)
    optimized = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert not optimized & {id(p) for p in teacher.parameters()}
    for step in range(2):
        msd_step(wrapped, optimizer, _double_batch(4, seed=step), 2)
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert not teacher.training


def test_queue_wraps_around_and_keeps_the_newest_keys():
    queues = KeyQueues(5)
    assert queues.keys() == (None, None)
    rows = torch.arange(24, dtype=torch.float32).reshape(12, 2)
    queues.enqueue(rows[:3], -rows[:3])
    queues.enqueue(rows[3:6], -rows[3:6])         # wraps: slots 3, 4, 0
    image, text = queues.keys()
    assert torch.equal(image.T, torch.stack([rows[5], rows[1], rows[2], rows[3], rows[4]]))
    assert torch.equal(text, -image) and int(queues.ptr) == 1 and int(queues.filled) == 5
    queues.enqueue(rows[:12], rows[:12])          # more than K: the last K survive
    assert sorted(queues.keys()[0].T[:, 0].tolist()) == [14.0, 16.0, 18.0, 20.0, 22.0]


def _hidden(wrapped):
    return {k: v.clone() for k, v in wrapped.plugin.hidden_state().items()}


def test_save_and_resume_restore_ema_queues_pointer_and_alpha_exactly(tmp_path):
    wrapped = _wrapped(temperature=0.07)
    optimizer = torch.optim.SGD(wrapped.parameters(), lr=0.5)
    for step in range(2):
        msd_step(wrapped, optimizer, _double_batch(4, seed=step), 2)
    wrapped.save_pretrained(tmp_path / "ckpt")
    fresh = tiny_clip().double()
    resumed = vlmdistill.load(str(tmp_path / "ckpt"), model=fresh)
    resumed.train()
    saved, loaded = _hidden(wrapped), _hidden(resumed)
    assert saved.keys() == loaded.keys() and {"image_queue", "text_queue", "queue_ptr", "queue_filled"} <= saved.keys()
    assert any(k.startswith("teacher.") for k in saved)
    for key in saved:
        assert torch.equal(saved[key], loaded[key]), key
    assert int(resumed.plugin.global_step) == 2
    assert resumed.plugin.current_alpha() == wrapped.plugin.current_alpha() == pytest.approx(0.4 * 2 / 3)
    assert torch.equal(resumed.plugin.temp, wrapped.plugin.temp)

    opt2 = torch.optim.SGD(resumed.parameters(), lr=0.5)
    for step in range(2, 4):
        a = msd_step(wrapped, optimizer, _double_batch(4, seed=step), 2)
        b = msd_step(resumed, opt2, _double_batch(4, seed=step), 2)
        assert a == b
    for key, value in _hidden(wrapped).items():
        assert torch.equal(value, _hidden(resumed)[key]), key


def test_trainer_checkpoint_resume_matches_uninterrupted_run(tmp_path):
    """Trainer checkpoints hold the plugin state (EMA teacher, queues, pointer, step); with the same learning-rate
    schedule in both runs, the resumed run is the uninterrupted one."""
    from test_msd_accumulation import _trainer

    torch.manual_seed(0)
    full_model = vlmdistill.wrap(tiny_clip(), plugin="msd", **CONFIG)
    full = _trainer(full_model, tmp_path / "full", max_steps=4)
    full.train()
    torch.manual_seed(0)
    part = _trainer(vlmdistill.wrap(tiny_clip(), plugin="msd", **CONFIG), tmp_path / "part", max_steps=2,
                    save_strategy="steps", save_steps=2)
    part.train()
    torch.manual_seed(0)
    resumed_model = vlmdistill.wrap(tiny_clip(), plugin="msd", **CONFIG)
    resumed = _trainer(resumed_model, tmp_path / "part", max_steps=4)
    resumed.train(resume_from_checkpoint=str(tmp_path / "part" / "checkpoint-2"))
    losses = lambda t: [h["loss"] for h in t.state.log_history if "loss" in h]  # noqa: E731
    torch.testing.assert_close(torch.tensor(losses(resumed)[-2:]), torch.tensor(losses(full)[-2:]), rtol=1e-5,
                               atol=1e-6)
    for key, value in _hidden(full_model).items():
        torch.testing.assert_close(_hidden(resumed_model)[key], value, rtol=1e-5, atol=1e-6, msg=key)


def test_temperature_is_clamped_after_each_step():
    wrapped = _wrapped(temperature=0.07)
    assert wrapped.plugin.temp.requires_grad
    with torch.no_grad():
        wrapped.plugin.temp.fill_(0.9)
    wrapped.step_end()
    assert float(wrapped.plugin.temp.detach()) == pytest.approx(0.5)
    own = _wrapped()
    with torch.no_grad():
        own.student.logit_scale.fill_(9.0)   # tau = e^-9 < 0.001
    own.step_end()
    assert float(own.student.logit_scale.detach()) == pytest.approx(torch.log(torch.tensor(1000.0)).item())
    frozen = _wrapped(temperature=0.1, learnable_temperature=False)
    assert not frozen.plugin.temp.requires_grad


def test_the_window_keeps_no_inputs_only_keys_and_signatures():
    import gc
    import weakref

    wrapped = _wrapped()
    batch = _double_batch(6, seed=1)
    micro = [{k: v[i:i + 2].clone() for k, v in batch.items()} for i in (0, 2, 4)]
    refs = [weakref.ref(m["pixel_values"]) for m in micro]
    wrapped.plugin.on_accumulation_window(micro)
    window = wrapped.plugin._window
    del micro
    gc.collect()
    assert all(r() is None for r in refs)   # nothing of the micro-batches is held for the step
    assert window.image_keys.shape == (6, 16) and window.total == 6


def _snapshot(plugin):
    return {k: v.clone() for k, v in plugin.hidden_state().items()}


def test_a_skipped_step_moves_no_ema_enqueues_nothing_and_the_next_step_runs():
    wrapped = _wrapped()
    plugin = wrapped.plugin
    optimizer = torch.optim.SGD(wrapped.parameters(), lr=0.5)
    msd_step(wrapped, optimizer, _double_batch(4, seed=0), 2)
    before = _snapshot(plugin)
    # A lone forward (GA = 1, a plain loop), then an optimizer step the mixed-precision scaler skipped
    wrapped(**_double_batch(4, seed=1)).loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    wrapped.step_end(skipped=True)
    after = _snapshot(plugin)
    assert int(plugin.global_step) == 1
    for key in before:
        assert torch.equal(before[key], after[key]), key   # EMA teacher, queues, pointer, fill count
    wrapped(**_double_batch(4, seed=2)).loss.backward()   # a new window of its own, not "a second micro-batch"
    wrapped.step_end()
    assert int(plugin.global_step) == 2 and int(plugin.queues.filled) == 8


def test_trainer_skipped_step_keeps_nan_keys_out_of_queue_and_teacher(tmp_path):
    """Under the Trainer with on_nonfinite='skip', a window whose loss is NaN (a NaN image in its second
    micro-batch) takes no step: the EMA teacher does not move and its (NaN) keys never enter the queue."""
    from test_msd_accumulation import _trainer

    torch.manual_seed(0)
    wrapped = vlmdistill.wrap(tiny_clip(), plugin="msd", on_nonfinite="skip", **CONFIG)
    states = []

    class Record(vlmdistill.DistillationCallback):
        def on_step_end(self, args, state, control, **kwargs):
            out = super().on_step_end(args, state, control, **kwargs)
            states.append(_snapshot(wrapped.plugin))
            return out

    data = examples(16, 3)
    data[6]["pixel_values"] = torch.full_like(data[6]["pixel_values"], float("nan"))   # step 2, micro-batch 2
    trainer = _trainer(wrapped, tmp_path, callbacks=[Record()], max_steps=3, data=data)
    with pytest.warns(RuntimeWarning, match="skipping this optimizer step"):
        trainer.train()
    assert int(wrapped.plugin.global_step) == 2
    for key in states[0]:
        assert torch.equal(states[0][key], states[1][key]), key    # step 2 skipped: nothing moved
    assert int(wrapped.plugin.queues.filled) == 8 and torch.isfinite(wrapped.plugin.queues.image).all()
    assert all(torch.isfinite(p).all() for p in wrapped.plugin.teacher.parameters())
