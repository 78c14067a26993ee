"""Resuming a CCD run from a Trainer checkpoint reproduces the uninterrupted run when both runs share the
learning-rate schedule (the interrupted run stops at the checkpoint instead of having a shorter max_steps)."""

import pytest
import torch
from contract_cases import load_case
from trainer_data import ExampleList
from transformers import Trainer, TrainerCallback, TrainingArguments

import vlmdistill


class _StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True
        return control


def _run(case, out, *, resume=None, stop_at=None):
    torch.manual_seed(0)
    student = case.make_student()
    wrapped = vlmdistill.wrap(student, plugin="ccd", config=dict(case.config))
    args = TrainingArguments(output_dir=str(out), per_device_train_batch_size=2, gradient_accumulation_steps=2,
                             max_steps=4, learning_rate=1e-3, report_to=[], use_cpu=True, logging_steps=1,
                             save_strategy="steps", save_steps=2, disable_tqdm=True, dataloader_num_workers=0, seed=0)
    callbacks = [vlmdistill.DistillationCallback()] + ([_StopAt(stop_at)] if stop_at else [])
    trainer = Trainer(model=wrapped, args=args, train_dataset=ExampleList(case.examples(16, 11)),
                      data_collator=case.collate, callbacks=callbacks)
    trainer.train(resume_from_checkpoint=resume)
    return [h["loss"] for h in trainer.state.log_history if "loss" in h], wrapped


@pytest.mark.slow
def test_trainer_resume_with_the_same_schedule_is_exact(tmp_path):
    case = load_case("ccd")  # crosses the prototype freeze (step 1) and the switch to predicted masks (step 2)
    full, _ = _run(case, tmp_path / "full")
    _run(case, tmp_path / "part", stop_at=2)
    resumed, model = _run(case, tmp_path / "part", resume=str(tmp_path / "part" / "checkpoint-2"))
    assert int(model.plugin.global_step) == 4
    torch.testing.assert_close(torch.tensor(resumed[-2:]), torch.tensor(full[-2:]), rtol=1e-5, atol=1e-6)
