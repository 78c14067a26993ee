"""What one accumulation window costs: a constant-cost match of each forward to its micro-batch, one micro-batch of
inputs on the device at a time (by hand and under the Trainer), and a step the optimizer skipped leaves the EMA
teacher and the queues alone under the Trainer."""

import threading

import pytest
import torch
from contract_cases.msd import collate, examples, tiny_clip
from test_msd_accumulation import _trainer

import vlmdistill
from vlmdistill.plugins.msd import msd_step
from vlmdistill.plugins.msd import step as step_module
from vlmdistill.plugins.msd.window import AccumulationWindow, BatchSignature

CONFIG = dict(alpha=0.4, alpha_warmup_steps=0, momentum=0.7, queue_size=12)


def _within(work, seconds=60.0):
    """`work()`'s result or exception, failing the test if it does not finish in `seconds`."""
    result = {}

    def run():
        try:
            result["value"] = work()
        except BaseException as exc:  # noqa: BLE001 - reported to the test below
            result["error"] = exc

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(seconds)
    assert not worker.is_alive(), "announcing or matching a micro-batch read the whole input"
    return result


def test_matching_a_forward_to_its_micro_batch_reads_a_fixed_number_of_elements():
    # Stride-0 views of 2**40 elements: comparing, copying or hashing them whole would not finish (or not allocate);
    # a signature reads a fixed number of elements whatever the size.
    rows, width = 2**20, 2**20

    def batch(fill):
        return {"pixel_values": torch.full((), float(fill)).expand(rows, width), "input_ids": torch.arange(rows)}

    keys = torch.zeros(rows, 1).expand(rows, 4)

    def window():
        return AccumulationWindow([BatchSignature(batch(0))], [rows], keys, keys, rank_offset=0, world_size=1)

    assert _within(lambda: window().claim(batch(0))) == {"value": 0}   # equal values, other storage
    assert isinstance(_within(lambda: window().claim(batch(1))).get("error"), ValueError)


def _record_forwards(wrapped, events):
    def hook(role):
        def record(module, args, kwargs):
            events.append((role, int(kwargs["pixel_values"].shape[0])))
        return record

    wrapped.student.register_forward_pre_hook(hook("student"), with_kwargs=True)
    wrapped.plugin.teacher.register_forward_pre_hook(hook("teacher"), with_kwargs=True)


def test_msd_step_moves_one_micro_batch_at_a_time(monkeypatch):
    """The teacher pass and each student forward see one micro-batch; each micro-batch moves to the device just
    before its own forward (on a GPU the previous one is freed by then), never the whole macro-batch."""
    events = []
    move = step_module.to_device

    def recording_move(value, device):
        events.append(("move", int(value["pixel_values"].shape[0])))
        return move(value, device)

    monkeypatch.setattr(step_module, "to_device", recording_move)
    torch.manual_seed(0)
    wrapped = vlmdistill.wrap(tiny_clip(), plugin="msd", **CONFIG)
    wrapped.train()
    _record_forwards(wrapped, events)
    optimizer = torch.optim.SGD(wrapped.parameters(), lr=0.1)
    msd_step(wrapped, optimizer, collate(examples(6, 0)), 2)
    assert events == [("teacher", 2)] * 3 + [("move", 2), ("student", 2)] * 3


def test_distillation_trainer_moves_one_micro_batch_at_a_time(tmp_path):
    """Under DistillationTrainer the window reaches the plugin on the host; the Trainer prepares (moves) each
    micro-batch in its own training_step, right before its forward."""
    events = []

    class Recording(vlmdistill.DistillationTrainer):
        def _prepare_inputs(self, inputs):
            events.append(("move", int(inputs["pixel_values"].shape[0])))
            return super()._prepare_inputs(inputs)

    torch.manual_seed(0)
    wrapped = vlmdistill.wrap(tiny_clip(), plugin="msd", **CONFIG)
    _record_forwards(wrapped, events)
    _trainer(wrapped, tmp_path, cls=Recording, max_steps=2, gradient_accumulation_steps=3).train()
    assert events == ([("teacher", 2)] * 3 + [("move", 2), ("student", 2)] * 3) * 2


def _clip_with_large_images(size=64):
    """Inputs dominate: 64 px images in four 32 px patches (48 KiB of pixels per row, a few activations)."""
    from transformers import CLIPConfig, CLIPModel

    reference = tiny_clip().config
    torch.manual_seed(0)
    vision = dict(reference.vision_config.to_dict(), image_size=size, patch_size=size // 2)
    return CLIPModel(CLIPConfig(text_config=reference.text_config.to_dict(), vision_config=vision,
                                projection_dim=reference.projection_dim))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="device memory needs a GPU")
def test_msd_step_device_memory_is_one_micro_batch_of_inputs_plus_the_keys():
    """Peak device memory of a step over 8 micro-batches exceeds that over 1 by no more than the extra keys and
    one micro-batch in flight: the other micro-batches' inputs (on the host) never sit on the device together."""
    rows, size, peaks = 4, 64, {}

    def batch(count, seed):
        out = collate(examples(rows * count, seed))
        out["pixel_values"] = torch.randn(rows * count, 3, size, size)
        return out

    for count in (1, 8):
        wrapped = vlmdistill.wrap(_clip_with_large_images(size).cuda(), plugin="msd", **{**CONFIG, "queue_size": 0})
        wrapped.train()
        optimizer = torch.optim.SGD(wrapped.parameters(), lr=0.1)
        msd_step(wrapped, optimizer, batch(1, 1), rows)   # warm-up: gradients and allocator in place
        macro = batch(count, 0)                           # on the host
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        msd_step(wrapped, optimizer, macro, rows)
        torch.cuda.synchronize()
        peaks[count] = torch.cuda.max_memory_allocated() - base
    micro_inputs = rows * 3 * size * size * 4
    keys = 2 * 8 * rows * 16 * 4   # two modalities, 32 rows, width 16, fp32
    # all 8 micro-batches on the device at once would add 7 × micro_inputs
    assert peaks[8] - peaks[1] <= 2 * keys + micro_inputs + 64 * 1024, peaks


def test_trainer_step_skipped_by_the_loss_scaler_moves_no_ema_and_enqueues_nothing(tmp_path):
    """A step the mixed-precision loss scaler skips (gradient overflow: accelerate's `step_was_skipped`) does no
    plugin work: the EMA teacher stays, the queue stays empty, the step counter stays; the next step runs.
    accelerate makes a scaler for fp16 on accelerators only; torch's CPU GradScaler drives the same path here."""
    torch.manual_seed(0)
    wrapped = vlmdistill.wrap(tiny_clip(), plugin="msd", **CONFIG)
    teacher_before = {k: v.clone() for k, v in wrapped.plugin.teacher.state_dict().items()}
    seen = []

    class Record(vlmdistill.DistillationCallback):
        def on_step_end(self, args, state, control, optimizer=None, **kwargs):
            out = super().on_step_end(args, state, control, optimizer=optimizer, **kwargs)
            seen.append((optimizer.step_was_skipped, int(wrapped.plugin.global_step),
                         int(wrapped.plugin.queues.filled),
                         {k: v.clone() for k, v in wrapped.plugin.teacher.state_dict().items()}))
            trainer.accelerator.scaler.update(1.0)   # the next step does not overflow
            return out

    trainer = _trainer(wrapped, tmp_path, callbacks=[Record()], max_steps=2)
    # 2**127 × the loss overflows float32 in the backward: the scaler finds inf gradients and skips the step.
    trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**127)
    trainer.train()
    (skipped, step, filled, teacher), (skipped_2, step_2, filled_2, teacher_2) = seen
    assert skipped and step == 0 and filled == 0
    for key, value in teacher_before.items():
        assert torch.equal(teacher[key], value), key
    assert not skipped_2 and step_2 == 1 and filled_2 == 4
    assert any(not torch.equal(teacher_2[k], v) for k, v in teacher_before.items())
