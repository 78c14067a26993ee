"""The `ccd` plugin end to end on tiny ViTs: teacher, EMA, centre, stages, backbones, export."""

import json
import os

import numpy as np
import pytest
import torch

import vlmdistill
from vlmdistill.errors import UnsupportedModelError
from vlmdistill.eval.ctc_recognizer import CTCRecognizer
from vlmdistill.plugins.ccd import CCDViT, ccd_vit, export_teacher_encoder, teacher_encoder
from vlmdistill.plugins.ccd.losses import teacher_momentum
from vlmdistill.data.rendered_words import render_words, to_pixel_values

TINY = dict(embed_dim=32, depth=3, num_heads=2, drop_path_rate=0.0)
CONFIG = dict(seg_blocks=[1, 2, 3], seg_hidden_channels=16, seg_map_channels=8, seg_groups=4, out_dim=64,
              head_hidden_dim=32, bottleneck_dim=16, freeze_last_layer_fraction=0.0, teacher_momentum=0.9,
              total_steps=10)
WORDS = ["model", "token", "vision", "scene", "glyph", "text", "paired", "slot"]


def batch(n=4, seed=0):
    words = [WORDS[i % len(WORDS)] for i in range(n)]
    return {"pixel_values": to_pixel_values(render_words(words, seed)), "ccd_seed": torch.arange(n) + 100 * seed}


def wrapped_tiny(**overrides):
    torch.manual_seed(0)
    return vlmdistill.wrap(ccd_vit("tiny", **TINY), plugin="ccd", **{**CONFIG, **overrides})


def teacher_tensors(w):
    plugin = w.plugin
    return list(plugin.teacher.parameters()) + list(plugin._ema_head.module.parameters())


def test_teacher_gets_no_gradients_and_moves_only_at_step_end():
    w = wrapped_tiny()
    w.train()
    out = w(**batch())
    assert out.metrics["paired_characters"] > 2
    out.loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in teacher_tensors(w))
    assert w.student.pos_embed.grad is not None and w.plugin.student_head.mlp[0].weight.grad is not None
    assert w.plugin.seg_head.classify.weight.grad is not None
    before = [t.clone() for t in teacher_tensors(w)]
    opt = torch.optim.SGD([p for p in w.parameters() if p.requires_grad], lr=0.5)
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, teacher_tensors(w)))  # the optimizer never touches it
    w.step_end()
    m = teacher_momentum(0, 10, 0.9)
    student = [p for p in w.student.parameters()] + [p for p in w.plugin.student_head.parameters()]
    for old, new, s in zip(before, teacher_tensors(w), student):
        torch.testing.assert_close(new, m * old + (1 - m) * s.detach())


def test_centre_follows_teacher_outputs_once_per_step():
    w = wrapped_tiny(center_momentum=0.5)
    w.train()
    w(**batch(seed=1))
    w(**batch(seed=2))
    centre = w.plugin._centre
    assert torch.equal(centre.value, torch.zeros(64)) and centre.pending_count > 0
    mean = (centre.pending_sum / centre.pending_count).float()
    w.step_end()
    torch.testing.assert_close(centre.value, 0.5 * mean)
    w.eval()
    w(**batch(seed=3))
    assert centre.pending_count == 0  # evaluation forwards do not feed the centre


def test_loss_decreases_on_a_fixed_batch():
    w = wrapped_tiny(teacher_momentum=0.99)
    w.train()
    data = batch(4)
    opt = torch.optim.AdamW([p for p in w.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(8):
        out = w(**data)
        losses.append((float(out.loss_terms["seg"]), float(out.loss_terms["distill"])))
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        w.step_end()
    seg, dis = zip(*losses)
    assert np.mean(seg[-3:]) < 0.8 * seg[0]
    assert np.mean(dis[-3:]) < dis[0]


def test_frozen_prototypes_get_no_optimizer_update_and_a_fresh_adam_after():
    """During the freeze the prototypes get gradients (DDP and accumulation see every parameter) but no optimizer
    update: AdamW holds a fresh state for them (step 0, zero moments: checkpointable), applies no weight decay; the
    first update after the freeze is a fresh Adam's on the same gradient."""
    w = wrapped_tiny(freeze_last_layer_fraction=0.2)   # steps 0 and 1 of 10
    w.train()
    head = w.plugin.student_head
    start = head.last_direction.detach().clone()
    opt = torch.optim.AdamW([p for p in w.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    for step in range(2):
        w(**batch(seed=step)).loss.backward()
        assert head.last_direction.grad.abs().sum() > 0      # computed and, under DDP, reduced
        opt.step()
        opt.zero_grad()
        w.step_end()
        for frozen in (head.last_direction, head.last_gain):
            assert opt.state[frozen]["step"] == 0
            assert not opt.state[frozen]["exp_avg"].any() and not opt.state[frozen]["exp_avg_sq"].any()
        assert torch.equal(head.last_direction.detach(), start)
    assert opt.state[head.mlp[0].weight]["step"] == 2        # the rest trains
    w(**batch(seed=2)).loss.backward()
    grad, before = head.last_direction.grad.clone(), head.last_direction.detach().clone()
    opt.step()
    assert opt.state[head.last_direction]["step"] == 1
    fresh = torch.nn.Parameter(before.clone())
    fresh.grad = grad
    reference = torch.optim.AdamW([fresh], lr=1e-2, weight_decay=0.1)
    reference.step()
    torch.testing.assert_close(head.last_direction.detach(), fresh.detach(), rtol=0, atol=0)


def test_prototype_freeze_under_the_trainer_uses_its_max_steps(tmp_path):
    from trainer_data import ExampleList
    from transformers import Trainer, TrainingArguments

    w = wrapped_tiny(freeze_last_layer_fraction=0.5, total_steps=None)
    start = w.plugin.student_head.last_direction.detach().clone()
    seen = []

    class Watch(vlmdistill.DistillationCallback):
        def on_step_end(self, args, state, control, **kwargs):
            seen.append(torch.equal(w.plugin.student_head.last_direction.detach(), start))
            return super().on_step_end(args, state, control, **kwargs)

    examples = [{k: v[i] for k, v in batch(8, seed=1).items()} for i in range(8)]
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=4, learning_rate=1e-2,
                             weight_decay=0.1, report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True)
    trainer = Trainer(model=w, args=args, train_dataset=ExampleList(examples),
                      data_collator=lambda items: {k: torch.stack([it[k] for it in items]) for k in items[0]},
                      callbacks=[Watch()])
    trainer.train()
    assert w.plugin.total_steps() == 4
    assert seen == [True, True, False, False]   # frozen for half of max_steps, then trained
    assert trainer.optimizer.state[w.plugin.student_head.last_direction]["step"] == 2


def test_a_hand_written_loop_without_the_run_length_is_told_to_set_it():
    w = wrapped_tiny(total_steps=None)
    w.train()
    with pytest.raises(RuntimeError, match="total_steps"):
        w(**batch())


def test_masks_switch_from_pseudo_to_predicted():
    w = wrapped_tiny(pseudo_mask_fraction=0.1)
    with torch.no_grad():  # a segmentation head that calls everything background
        w.plugin.seg_head.classify.bias.copy_(torch.tensor([50.0, -50.0]))
    w.train()
    assert w(**batch()).metrics["paired_characters"] > 2  # k-means characters
    w.step_end()
    out = w(**batch())
    assert out.metrics["paired_characters"] == 0  # the student's own (empty) prediction
    out.loss.backward()  # still a valid graph: the head gets zero gradient
    assert w.plugin.student_head.mlp[0].weight.grad.abs().sum() == 0


def test_timm_vit_attaches_through_hooks():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=(32, 128), patch_size=4, embed_dim=32,
                            depth=3, num_heads=2, num_classes=0)
    w = vlmdistill.wrap(vit, plugin="ccd", **CONFIG)
    assert w.plugin.spec.kind == "timm" and w.plugin.spec.input_name == "x"
    data = batch()
    out = w(x=data["pixel_values"], ccd_seed=data["ccd_seed"])
    assert out.metrics["paired_characters"] > 2
    out.loss.backward()
    assert vit.blocks[0].attn.qkv.weight.grad is not None
    assert vlmdistill.unwrap(w) is vit and not any(m._forward_hooks for m in vit.modules())


def test_unsupported_models_and_blocks_are_refused_at_wrap():
    with pytest.raises(UnsupportedModelError, match="ccd needs a ViT"):
        vlmdistill.wrap(torch.nn.Linear(3, 3), plugin="ccd")
    with pytest.raises(UnsupportedModelError, match="only 3 blocks"):
        vlmdistill.wrap(ccd_vit("tiny", **TINY), plugin="ccd", seg_blocks=[2, 4, 6])


def test_save_pretrained_writes_the_teacher_encoder_and_load_resumes(tmp_path):
    w = wrapped_tiny()
    w.train()
    opt = torch.optim.SGD([p for p in w.parameters() if p.requires_grad], lr=0.1)
    for seed in range(2):
        w(**batch(seed=seed)).loss.backward()
        opt.step()
        opt.zero_grad()
        w.step_end()
    w.save_pretrained(str(tmp_path / "ckpt"))
    note = json.loads((tmp_path / "ckpt" / "ccd_export.json").read_text())
    assert note["use_for_downstream"] == "ccd_teacher_encoder"
    exported = CCDViT.from_pretrained(str(tmp_path / "ckpt" / "ccd_teacher_encoder"))
    for (name, a), b in zip(exported.state_dict().items(), w.teacher.state_dict().values()):
        assert torch.equal(a, b), name
    assert not torch.equal(exported.pos_embed, w.student.pos_embed)  # the teacher, not the student

    resumed = vlmdistill.load(str(tmp_path / "ckpt"), model=ccd_vit("tiny", **TINY))
    assert int(resumed.plugin.global_step) == 2
    torch.testing.assert_close(resumed.plugin._centre.value, w.plugin._centre.value)
    for a, b in zip(teacher_tensors(resumed), teacher_tensors(w)):
        assert torch.equal(a, b)
    resumed.eval()
    w.eval()
    data = batch(seed=5)
    torch.testing.assert_close(resumed(**data).loss, w(**data).loss)


def test_teacher_encoder_export_for_a_recogniser(tmp_path):
    w = wrapped_tiny()
    encoder = teacher_encoder(w)
    assert encoder is not w.teacher and all(p.requires_grad for p in encoder.parameters())
    assert all(torch.equal(a, b) for a, b in zip(encoder.parameters(), w.teacher.parameters()))
    path = export_teacher_encoder(w, str(tmp_path / "enc"))
    assert os.path.isfile(os.path.join(path, "model.safetensors"))
    recogniser = CTCRecognizer(CCDViT.from_pretrained(path))
    assert recogniser(batch()["pixel_values"]).shape == (4, 32, 37)
    with pytest.raises(TypeError, match="plugin='ccd'"):
        teacher_encoder(torch.nn.Linear(2, 2))


def test_ctc_recogniser_learns_and_decodes():
    torch.manual_seed(0)
    recogniser = CTCRecognizer(ccd_vit("tiny", **TINY))
    words = ["abc", "hello", "text", "zoo"]
    pixels = to_pixel_values(render_words(words, 0))
    opt = torch.optim.AdamW(recogniser.parameters(), lr=3e-3)
    first = None
    for _ in range(20):
        loss = recogniser.loss(pixels, words)
        first = first if first is not None else float(loss.detach())
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert float(loss.detach()) < 0.5 * first
    # greedy decoding merges repeats and drops blanks: "aa-b-bb" -> "abb"
    log_probs = torch.full((1, 7, 37), -10.0)
    for t, k in enumerate([1 + 10, 1 + 10, 0, 1 + 11, 0, 1 + 11, 1 + 11]):
        log_probs[0, t, k] = 0.0
    recogniser.forward = lambda pixel_values: log_probs
    assert recogniser.decode(torch.zeros(1, 3, 32, 128)) == ["abb"]


def test_trocr_style_deit_encoder_with_two_prefix_tokens():
    from transformers import DeiTConfig, DeiTModel

    torch.manual_seed(0)
    deit = DeiTModel(DeiTConfig(image_size=(32, 128), patch_size=4, hidden_size=32, num_hidden_layers=3,
                                num_attention_heads=2, intermediate_size=64), add_pooling_layer=False)
    w = vlmdistill.wrap(deit, plugin="ccd", **CONFIG)
    out = w(**batch())
    assert out.last_hidden_state.shape == (8, 258, 32)  # both views; CLS + distillation token + 256 patches
    assert out.metrics["paired_characters"] > 2
    out.loss.backward()
    assert deit.embeddings.position_embeddings.grad is not None
    with pytest.raises(UnsupportedModelError):
        vlmdistill.wrap(torch.nn.ModuleDict({"encoder": deit}), plugin="ccd")  # pass the encoder itself


@pytest.mark.parametrize("make_optimizer", [
    lambda params: torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1),
    lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9, nesterov=True),
], ids=["adamw", "sgd-momentum"])
def test_a_checkpoint_taken_during_the_freeze_loads_strictly_and_unfreezes_fresh(make_optimizer):
    """torch.distributed.checkpoint's state-dict API (what accelerate's FSDP2 resume calls) refuses a trainable
    parameter without optimizer state; the frozen prototypes hold a fresh one, so the strict load works and the
    first update after the freeze is the fresh optimizer's."""
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    def trained(steps):
        torch.manual_seed(0)
        w = wrapped_tiny(freeze_last_layer_fraction=0.2)
        w.train()
        opt = make_optimizer([p for p in w.parameters() if p.requires_grad])
        for step in steps:
            w(**batch(seed=step)).loss.backward()
            opt.step()
            opt.zero_grad()
            w.step_end()
        return w, opt

    saved_model, saved_optim = get_state_dict(*trained([0]))
    resumed, opt = trained([])
    set_state_dict(resumed, opt, model_state_dict=saved_model, optim_state_dict=saved_optim)
    for step in (1, 2):
        resumed(**batch(seed=step)).loss.backward()
        opt.step()
        opt.zero_grad()
        resumed.step_end()
    uninterrupted, _ = trained([0, 1, 2])
    for (name, a), b in zip(resumed.named_parameters(), uninterrupted.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_slice_instances_pair_strips_by_position():
    from vlmdistill.errors import ConfigError
    from vlmdistill.plugins.ccd.masks import slice_token_weights

    weights, present = slice_token_weights(2, (8, 32), 4)
    assert weights.shape == (2, 4, 256) and present.all()
    grid = weights[0].view(4, 8, 32)
    for k in range(4):   # strip k covers token columns 8k .. 8k+7 of every row, uniformly
        assert torch.equal(grid[k] > 0, torch.zeros(8, 32, dtype=torch.bool).index_fill_(1, torch.arange(8 * k,
                                                                                              8 * k + 8), True))
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 4))
    w = wrapped_tiny(instances="slices", slices=4)
    w.train()
    out = w(**batch())
    assert out.metrics["paired_characters"] == 4           # every strip of every image, even a blank one
    assert torch.isfinite(out.loss) and out.loss_terms["distill"] > 0
    assert 0 < out.metrics["teacher_entropy"] <= np.log(CONFIG["out_dim"]) + 1e-4
    out.loss.backward()
    assert w.plugin.student_head.mlp[0].weight.grad.abs().sum() > 0
    with pytest.raises(ConfigError, match="instances.*characters, slices"):
        wrapped_tiny(instances="words")
