"""The stage switch: once, at the configured optimizer step, driven by step_end / DistillationCallback,
and resumable on either side of it."""

import pytest
import torch

import vlmdistill
from vlmdistill.errors import ConfigError
from vlmdistill.eval.tiny_models import tiny_hf_clip
from image_text_fixtures import token_batch


def _student():
    return tiny_hf_clip(hidden=16, layers=1, patch=8, seed=1)


def _teacher():
    return tiny_hf_clip(hidden=32, layers=1, patch=4, projection=24, seed=2)


def _batch(seed):
    g = torch.Generator().manual_seed(seed + 100)
    return {**token_batch(4, seed=seed), "pixel_values": torch.randn(4, 3, 32, 32, generator=g)}


class TeacherCalls:
    def __init__(self, teacher):
        self.count = 0
        teacher.register_forward_pre_hook(self)

    def __call__(self, *_):
        self.count += 1


def _steps(wrapped, n, start=0, optimizer=None, micro_batches=1):
    optimizer = optimizer or torch.optim.AdamW([p for p in wrapped.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for step in range(start, start + n):
        stages = set()
        for micro in range(micro_batches):
            out = wrapped(**_batch(10 * step + micro))
            (out.loss / micro_batches).backward()
            stages.add(frozenset(out.loss_terms))
        optimizer.step()
        optimizer.zero_grad()
        wrapped.step_end()
        assert len(stages) == 1, "micro-batches of one optimizer step trained in different stages"
        losses.append(float(out.loss.detach()))
    return losses, optimizer


def test_switch_happens_once_at_the_configured_optimizer_step():
    teacher = _teacher()
    calls = TeacherCalls(teacher)
    wrapped = vlmdistill.wrap(_student(), plugin="dcclip", teacher=teacher, switch_at_step=3,
                              release_teacher_at_switch=False)
    seen = []
    for step in range(6):
        for _ in range(2):  # gradient accumulation: the stage may only change between optimizer steps
            out = wrapped(**_batch(step))
            out.loss.backward()
            seen.append((step, "contrastive" in out.loss_terms))
        wrapped.step_end()
        if step + 1 < 3:
            assert int(wrapped.plugin.stage) == 1
    assert [s for s, stage2 in seen if not stage2] == [0, 0, 1, 1, 2, 2]
    assert int(wrapped.plugin.switched_at_step) == 3 and int(wrapped.plugin.stage) == 2
    assert calls.count == 6  # teacher forwards only in the 3 stage-1 steps x 2 micro-batches


def test_switch_by_epoch_and_teacher_release():
    teacher = _teacher()
    wrapped = vlmdistill.wrap(_student(), plugin="dcclip", teacher=teacher, switch_at_epoch=2, steps_per_epoch=2)
    _steps(wrapped, 4)
    assert int(wrapped.plugin.switched_at_step) == 4
    assert wrapped.plugin.teacher is None  # released at the switch: stage 2 never needs it
    with pytest.raises(ConfigError, match="steps_per_epoch"):
        vlmdistill.wrap(_student(), plugin="dcclip", teacher=_teacher(), switch_at_epoch=1)


@pytest.mark.parametrize("save_after", [2, 4])
def test_save_and_resume_on_either_side_of_the_switch(tmp_path, save_after):
    torch.manual_seed(0)
    reference = vlmdistill.wrap(_student(), plugin="dcclip", teacher=_teacher(), switch_at_step=3)
    ref_losses, _ = _steps(reference, 6)
    assert int(reference.plugin.switched_at_step) == 3

    torch.manual_seed(0)
    first = vlmdistill.wrap(_student(), plugin="dcclip", teacher=_teacher(), switch_at_step=3)
    losses_a, optimizer = _steps(first, save_after)
    first.save_pretrained(str(tmp_path / "ckpt"))
    torch.save(optimizer.state_dict(), tmp_path / "opt.pt")

    teacher = _teacher()
    calls = TeacherCalls(teacher)
    resumed = vlmdistill.load(str(tmp_path / "ckpt"), model=_student(), teacher=teacher)
    assert int(resumed.plugin.stage) == (2 if save_after >= 3 else 1)
    opt = torch.optim.AdamW([p for p in resumed.parameters() if p.requires_grad], lr=1e-2)
    opt.load_state_dict(torch.load(tmp_path / "opt.pt"))
    losses_b, _ = _steps(resumed, 6 - save_after, start=save_after, optimizer=opt)
    torch.testing.assert_close(torch.tensor(losses_a + losses_b), torch.tensor(ref_losses), rtol=1e-5, atol=1e-6)
    assert int(resumed.plugin.switched_at_step) == 3  # switched once, at step 3, whichever side we resumed on
    assert calls.count == max(0, 3 - save_after)


def test_trainer_resume_across_the_switch(tmp_path):
    from transformers import Trainer, TrainingArguments

    class Examples(torch.utils.data.Dataset):
        def __len__(self):
            return 16

        def __getitem__(self, i):
            b = _batch(i)
            return {k: v[0] for k, v in b.items()}

    def trainer(model, out, **kw):
        args = TrainingArguments(output_dir=str(out), per_device_train_batch_size=2, gradient_accumulation_steps=2,
                                 learning_rate=1e-3, lr_scheduler_type="constant", report_to=[], use_cpu=True,
                                 logging_steps=1, disable_tqdm=True, seed=0, **kw)
        return Trainer(model=model, args=args, train_dataset=Examples(),
                       callbacks=[vlmdistill.DistillationCallback()])

    def wrapped():  # a plain Trainer: one optimizer and schedule across the switch (DistillationTrainer: test_stages)
        torch.manual_seed(0)
        return vlmdistill.wrap(_student(), plugin="dcclip", teacher=_teacher(), switch_at_step=2,
                               restart_optimizer_at_switch=False)

    full = trainer(wrapped(), tmp_path / "a", max_steps=4, save_strategy="no")
    full.train()
    ref = [h for h in full.state.log_history if "loss" in h]
    assert ["distill/contrastive" in h for h in ref] == [False, False, True, True]
    part = trainer(wrapped(), tmp_path / "b", max_steps=4, save_strategy="steps", save_steps=3)
    part.train()
    model = wrapped()
    resumed = trainer(model, tmp_path / "b", max_steps=4, save_strategy="no")
    resumed.train(resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-3"))
    assert int(model.plugin.stage) == 2 and int(model.plugin.switched_at_step) == 2
    got = [h["loss"] for h in resumed.state.log_history if "loss" in h]
    torch.testing.assert_close(torch.tensor(got[-1:]), torch.tensor([ref[-1]["loss"]]), rtol=1e-4, atol=1e-6)
