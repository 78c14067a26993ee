"""bf16 mixed precision (`Trainer(bf16=True)`: CPU autocast here) for every plugin, against fp32.

Stated tolerances (bf16 keeps 8 mantissa bits, ~0.4 % per rounding): with the contract cases, the loss under
autocast is within 1 % of the fp32 loss, every loss term within 2 % (or 2e-3 absolute), and the gradient within
3 % (relative L2 norm over all trainable parameters). What a method needs in fp32 stays fp32: msd's
similarities and queues, ccd's heads and centre, the fused CE + KD accumulation."""

import pytest
import torch
from contract_cases import load_case
from trainer_data import ExampleList
from transformers import TrainingArguments

import vlmdistill
from vlmdistill.losses import task_and_distill_sums

PLUGINS = vlmdistill.list_plugins()
LOSS_RTOL, TERM_RTOL, TERM_ATOL, GRAD_RTOL = 1e-2, 2e-2, 2e-3, 3e-2


def _wrapped(case, plugin):
    torch.manual_seed(0)
    student = case.make_student()
    return vlmdistill.wrap(student, plugin=plugin, teacher=case.make_teacher(student), config=dict(case.config),
                           **case.runtime)


def _step(case, plugin, autocast: bool):
    wrapped = _wrapped(case, plugin)
    wrapped.train()
    batch = case.batch(4, seed=7)
    wrapped.plugin.on_accumulation_window([batch])
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = wrapped(**batch, num_items_in_batch=case.num_items([batch]))
    out.loss.backward()
    grads = {n: p.grad.float() for n, p in wrapped.named_parameters() if p.grad is not None}
    return wrapped, out, grads


@pytest.mark.parametrize("plugin", PLUGINS)
def test_autocast_bf16_matches_fp32_within_tolerance(plugin):
    case = load_case(plugin)
    _, ref, ref_grads = _step(case, plugin, autocast=False)
    _, got, grads = _step(case, plugin, autocast=True)
    assert got.loss.dtype == torch.float32  # the total is accumulated in fp32 whatever the activations
    torch.testing.assert_close(got.loss.detach(), ref.loss.detach(), rtol=LOSS_RTOL, atol=0.0)
    assert got.loss_terms.keys() == ref.loss_terms.keys()
    for name in ref.loss_terms:
        torch.testing.assert_close(got.loss_terms[name].float(), ref.loss_terms[name].float(), rtol=TERM_RTOL,
                                   atol=TERM_ATOL, msg=name)
    assert grads.keys() == ref_grads.keys()
    flat_ref = torch.cat([ref_grads[n].flatten() for n in ref_grads])
    flat = torch.cat([grads[n].flatten() for n in ref_grads])
    assert torch.isfinite(flat).all()
    assert float((flat - flat_ref).norm() / flat_ref.norm()) < GRAD_RTOL


@pytest.mark.parametrize("plugin", PLUGINS)
def test_trainer_bf16_runs_and_follows_fp32(plugin, tmp_path):
    case = load_case(plugin)
    losses = {}
    for bf16 in (False, True):
        args = TrainingArguments(output_dir=str(tmp_path / str(bf16)), per_device_train_batch_size=2,
                                 gradient_accumulation_steps=2, max_steps=2, learning_rate=1e-3, report_to=[],
                                 use_cpu=True, logging_steps=1, save_strategy="no", disable_tqdm=True, seed=0,
                                 bf16=bf16)
        trainer = vlmdistill.DistillationTrainer(model=_wrapped(case, plugin), args=args,
                                                 train_dataset=ExampleList(case.examples(16, 11)),
                                                 data_collator=case.collate)
        trainer.train()
        assert trainer.args.bf16 == bf16 and trainer.accelerator.mixed_precision == ("bf16" if bf16 else "no")
        logged = [h for h in trainer.state.log_history if "loss" in h]
        assert len(logged) == 2 and all(any(k.startswith("distill/") for k in h) for h in logged)
        losses[bf16] = torch.tensor([h["loss"] for h in logged])
    assert torch.isfinite(losses[True]).all()
    torch.testing.assert_close(losses[True][0], losses[False][0], rtol=LOSS_RTOL, atol=0.0)


def test_msd_similarities_and_queues_stay_fp32():
    from vlmdistill.plugins.msd.losses import momentum_contrastive_rows

    case = load_case("msd")
    wrapped = _wrapped(case, "msd")
    wrapped.train()
    plugin = wrapped.plugin
    seen = []
    run = plugin._student_reader.run
    plugin._student_reader.run = lambda *a, **kw: seen.append(run(*a, **kw)) or seen[-1]  # keep the embeddings
    for step in range(3):  # the queue fills: later steps compare against queued keys too
        batch = case.batch(4, seed=step)
        plugin.on_accumulation_window([batch])
        window = plugin._window
        queued = plugin.queues.keys()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = wrapped(**batch)
        out.loss.backward()
        _, image, text = seen[-1]
        assert image.dtype == torch.float32
        # Recompute the loss in float64 from the very embeddings and keys the plugin used.
        image_keys, text_keys = window.image_keys.double(), window.text_keys.double()
        if queued[0] is not None:
            image_keys = torch.cat([image_keys, queued[0].T.double()])
            text_keys = torch.cat([text_keys, queued[1].T.double()])
        i2t, t2i = momentum_contrastive_rows(image.detach().double(), text.detach().double(), image_keys, text_keys,
                                             torch.arange(4), alpha=plugin.current_alpha(),
                                             logit_scale=plugin.logit_scale().detach().double())
        expected = 0.5 * (i2t + t2i).mean()
        # bf16 similarities would be off by ~1e-2 here; fp32 ones agree to float rounding.
        torch.testing.assert_close(out.loss.detach().double(), expected, rtol=1e-5, atol=1e-6)
        wrapped.step_end()
        assert plugin.queues.image.dtype == plugin.queues.text.dtype == torch.float32
    assert int(plugin.queues.filled) == 8


def test_ccd_heads_and_centre_stay_fp32():
    case = load_case("ccd")
    wrapped = _wrapped(case, "ccd")
    wrapped.train()
    plugin = wrapped.plugin
    dtypes = {}
    for name, head in (("seg", plugin.seg_head), ("student", plugin.student_head),
                       ("teacher", plugin._ema_head.module)):
        head.register_forward_hook(lambda m, a, out, name=name: dtypes.update({name: out.dtype}) and None)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = wrapped(**case.batch(4, seed=3))
    out.loss.backward()
    wrapped.step_end()
    assert dtypes == {"seg": torch.float32, "student": torch.float32, "teacher": torch.float32}
    assert plugin._centre.value.dtype == torch.float32 and bool(plugin._centre.value.abs().sum() > 0)


def test_fused_loss_accumulates_bf16_logits_in_fp32():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 9, 50, generator=g).bfloat16().requires_grad_()
    labels = torch.randint(0, 50, (3, 9), generator=g)
    labels[:, :2] = -100
    distilled = torch.zeros(3, 9, dtype=torch.bool)
    distilled[:, 2:8] = True
    teacher = torch.randn(int(distilled.sum()), 50, generator=g).bfloat16()
    weight = torch.where(distilled, 0.5, 1.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        total, ce, kd = task_and_distill_sums(logits, labels, weight, distilled, torch.arange(teacher.shape[0]),
                                              lambda ids: teacher[ids], alpha=0.5, width=50, kind="forward_kl",
                                              temperature=2.0, jsd_beta=0.5, chunk_rows=5)
    assert total.dtype == ce.dtype == kd.dtype == torch.float32
    # Reference in float64 from the same (bf16-valued) logits.
    s, t = logits.detach().double(), teacher.double()
    rows = torch.zeros(3, 9, dtype=torch.bool)
    rows[:, :-1] = labels[:, 1:] != -100
    b, p = rows.nonzero(as_tuple=True)
    ce_ref = torch.nn.functional.cross_entropy(s[b, p], labels[b, p + 1], reduction="none")
    kd_rows = distilled[b, p]
    log_ps, log_pt = (s[b, p][kd_rows] / 2).log_softmax(-1), (t / 2).log_softmax(-1)
    kd_ref = 4 * (log_pt.exp() * (log_pt - log_ps)).sum()
    torch.testing.assert_close(ce.double(), ce_ref.sum(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(kd.double(), kd_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(total.double(), (weight[b, p].double() * ce_ref).sum() + 0.5 * kd_ref, rtol=1e-6,
                               atol=1e-6)
