"""Training in stages (`vlmdistill.stages`): each stage trains with a fresh optimizer state and its own schedule,
as a separate run would; through a hand-written loop and through DistillationTrainer, resumable in either stage."""

import math
import types

import pytest
import torch

import vlmdistill
from vlmdistill.eval.tiny_models import tiny_hf_clip
from image_text_fixtures import token_batch
from vlmdistill.stages import reset_optimizer_state, stage_spans, staged_lambda, staged_scheduler


def _linear_with_warmup(warmup):
    """transformers' linear schedule, restated: warm up from 0, then decay to 0 at the end of the span."""
    def factory(length):
        return lambda s: s / warmup if s < warmup else max(0.0, (length - s) / max(1, length - warmup))
    return factory


def test_stage_spans():
    assert stage_spans([3], 8) == [(0, 3), (3, 5)]
    assert stage_spans([], 8) == [(0, 8)]
    assert stage_spans([8, 0, 12], 8) == [(0, 8)]  # boundaries outside the run are no stages
    assert stage_spans([5, 2], 9) == [(0, 2), (2, 3), (5, 4)]


def test_staged_schedule_restarts_its_warm_up_at_each_boundary():
    multiplier = staged_lambda(stage_spans([4], 10), _linear_with_warmup(2))
    assert [multiplier(s) for s in range(10)] == pytest.approx(
        [0, 0.5, 1, 0.5, 0, 0.5, 1, 0.75, 0.5, 0.25])


def _student():
    return tiny_hf_clip(hidden=16, layers=1, patch=8, seed=1)


def _teacher():
    return tiny_hf_clip(hidden=32, layers=1, patch=4, projection=24, seed=2)


def _batch(step):
    g = torch.Generator().manual_seed(step + 100)
    return {**token_batch(4, seed=step), "pixel_values": torch.randn(4, 3, 32, 32, generator=g)}


def _wrapped(**config):
    torch.manual_seed(0)
    return vlmdistill.wrap(_student(), plugin="dcclip", teacher=_teacher(), switch_at_step=3, **config)


def _trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


def test_reset_at_the_switch_equals_a_fresh_optimizer_and_schedule_for_stage_2():
    """One optimizer + staged schedule + reset_optimizer_state at step_end()'s signal == two separate runs (a new
    AdamW and a new schedule built for stage 2), to the bit."""
    total, switch, factory = 6, 3, _linear_with_warmup(1)

    staged = _wrapped(embedding_weight=0.5)
    optimizer = torch.optim.AdamW(_trainable(staged), lr=1e-2, weight_decay=0.1)
    schedule = staged_scheduler(optimizer, staged.plugin.stage_boundaries(), total, factory)
    ended = []
    for step in range(total):
        staged(**_batch(step)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        schedule.step()
        ended.append(staged.step_end())
        if ended[-1]:
            reset_optimizer_state(optimizer)
    assert ended == [False, False, True, False, False, False]

    separate = _wrapped(embedding_weight=0.5)
    for start, length in stage_spans([switch], total):
        optimizer = torch.optim.AdamW(_trainable(separate), lr=1e-2, weight_decay=0.1)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factory(length))
        for step in range(start, start + length):
            separate(**_batch(step)).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            schedule.step()
            separate.step_end()
    for (name, a), b in zip(staged.named_parameters(), separate.parameters()):
        assert torch.equal(a, b), name


def _trainer(model, out, trainer_class, **kw):
    from transformers import TrainingArguments

    class Examples(torch.utils.data.Dataset):
        def __len__(self):
            return 24

        def __getitem__(self, i):
            return {k: v[0] for k, v in _batch(i).items()}

    defaults = dict(per_device_train_batch_size=2, learning_rate=1e-2, lr_scheduler_type="linear", warmup_steps=1,
                    weight_decay=0.1, max_steps=6, report_to=[], use_cpu=True, logging_steps=1, disable_tqdm=True,
                    seed=0, save_strategy="no")
    args = TrainingArguments(output_dir=str(out), **{**defaults, **kw})
    return trainer_class(model=model, args=args, train_dataset=Examples(),
                         callbacks=[vlmdistill.DistillationCallback()] if trainer_class is not
                         vlmdistill.DistillationTrainer else None)


class OptimizerProbe:
    """Records, after every optimizer step, the Adam step count of each parameter (None: no state at all) and the
    parameter values."""

    def __init__(self):
        from transformers import TrainerCallback

        probe = self

        class Callback(TrainerCallback):
            def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
                inner = vlmdistill.api.unwrap_parallel(model)
                probe.steps.append({n: (int(optimizer.state[p]["step"]) if p in optimizer.state else None)
                                    for n, p in inner.named_parameters()})
                probe.values.append({n: p.detach().clone() for n, p in inner.named_parameters()})

        self.callback = Callback()
        self.steps, self.values = [], []


def test_distillation_trainer_gives_each_stage_a_fresh_optimizer_and_its_own_warm_up(tmp_path):
    model = _wrapped()
    trainer = _trainer(model, tmp_path, vlmdistill.DistillationTrainer)
    probe = OptimizerProbe()
    trainer.add_callback(probe.callback)  # after the restart: sees the state the next step starts from
    trainer.train()
    lrs = [h["learning_rate"] for h in trainer.state.log_history if "learning_rate" in h]
    # linear, 1 warm-up step, per stage of 3 steps: [0, 1, 0.5] x 1e-2, twice (one schedule would decay to 0 once)
    assert lrs == pytest.approx([0.0, 1e-2, 5e-3, 0.0, 1e-2, 5e-3])
    scale, adapter = "student.logit_scale", "plugin.adapters.image.weight"
    # stage 1: the idle logit scale holds a fresh Adam state (nothing advanced, nothing decayed)
    assert all(steps[scale] == 0 for steps in probe.steps[:2])
    assert probe.steps[1][adapter] == 2
    # the switch (after step 3) forgets every state: stage 2 starts as a fresh AdamW would
    assert all(v is None for v in probe.steps[2].values())
    assert probe.steps[3][scale] == 1 and probe.steps[5][scale] == 3
    # stage 2: the idle adapters get no update (a fresh state, and no weight decay either)
    assert probe.steps[5][adapter] == 0
    assert torch.equal(probe.values[5][adapter], probe.values[2][adapter])
    assert torch.equal(probe.values[2][scale], probe.values[0][scale])


def test_one_stage_per_run_when_the_restart_is_off(tmp_path):
    trainer = _trainer(_wrapped(restart_optimizer_at_switch=False), tmp_path, vlmdistill.DistillationTrainer)
    trainer.train()
    lrs = [h["learning_rate"] for h in trainer.state.log_history if "learning_rate" in h]
    assert lrs == pytest.approx([0.0, 1e-2, 0.8e-2, 0.6e-2, 0.4e-2, 0.2e-2])


def test_plain_trainer_warns_that_it_runs_one_schedule_across_the_stages(tmp_path):
    from transformers import Trainer

    trainer = _trainer(_wrapped(), tmp_path, Trainer, max_steps=1)
    with pytest.warns(RuntimeWarning, match="DistillationTrainer"):
        trainer.train()


@pytest.mark.parametrize("checkpoint", [2, 4])
def test_distillation_trainer_resumes_exactly_from_either_stage(tmp_path, checkpoint):
    full = _wrapped()
    _trainer(full, tmp_path / "run", vlmdistill.DistillationTrainer, save_strategy="steps", save_steps=1).train()
    resumed = _wrapped()
    trainer = _trainer(resumed, tmp_path / "run", vlmdistill.DistillationTrainer)
    trainer.train(resume_from_checkpoint=str(tmp_path / "run" / f"checkpoint-{checkpoint}"))
    assert int(resumed.plugin.switched_at_step) == 3
    lrs = [h["learning_rate"] for h in trainer.state.log_history if "learning_rate" in h and h["step"] > checkpoint]
    assert lrs == pytest.approx([0.0, 1e-2, 5e-3, 0.0, 1e-2, 5e-3][checkpoint:])
    for (name, a), b in zip(full.named_parameters(), resumed.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7, msg=name)


def test_restart_refuses_an_optimizer_it_cannot_reset():
    from vlmdistill.errors import ConfigError

    with pytest.raises(ConfigError, match="cannot restart the optimizer state of a SimpleNamespace"):
        reset_optimizer_state(types.SimpleNamespace(state={}))
    adam = torch.optim.Adam([torch.nn.Parameter(torch.ones(2))])
    adam.param_groups[0]["params"][0].grad = torch.ones(2)
    adam.step()
    reset_optimizer_state(adam)
    assert not adam.state and math.isclose(adam.param_groups[0]["lr"], 1e-3)
