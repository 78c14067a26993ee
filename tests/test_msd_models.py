"""msd on every kind of dual encoder it supports: transformers CLIP / SigLIP / VisionTextDualEncoder, open_clip,
and embeddings read through hooks."""

import copy

import pytest
import torch
import torch.nn.functional as F
from contract_cases.msd import IMAGE, LENGTH, VOCAB, collate, examples, tiny_clip

import vlmdistill
from vlmdistill.plugins.msd import msd_step


def _infonce(image, text, scale):
    v, t = F.normalize(image, dim=-1), F.normalize(text, dim=-1)
    labels = torch.arange(v.shape[0])
    return 0.5 * (F.cross_entropy(v @ t.T * scale, labels) + F.cross_entropy(t @ v.T * scale, labels))


def _first_loss(model, batch, **config):
    wrapped = vlmdistill.wrap(model, plugin="msd", alpha=0.0, queue_size=0, **config)
    wrapped.train()
    return wrapped, wrapped(**batch).loss


def _train_two_steps(wrapped, make_batch):
    optimizer = torch.optim.SGD(wrapped.parameters(), lr=0.1)
    before = {n: p.detach().clone() for n, p in wrapped.plugin.teacher.named_parameters()}
    losses = [msd_step(wrapped, optimizer, make_batch(4, seed), 2) for seed in range(2)]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert int(wrapped.plugin.queues.filled) == 8
    moved = [n for n, p in wrapped.plugin.teacher.named_parameters() if not torch.equal(p, before[n])]
    assert moved, "the EMA teacher did not move"


def _open_clip():
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    torch.manual_seed(0)
    vision = CLIPVisionCfg(layers=1, width=32, head_width=16, patch_size=8, image_size=IMAGE)
    return CLIP(embed_dim=16, vision_cfg=vision,
                text_cfg=CLIPTextCfg(context_length=LENGTH, vocab_size=VOCAB, width=32, heads=2, layers=1))


def _open_clip_batch(n, seed=0):
    b = collate(examples(n, seed))
    return {"image": b["pixel_values"], "text": b["input_ids"]}


def test_open_clip_student(tmp_path):
    from open_clip.loss import ClipLoss

    model = _open_clip()
    batch = _open_clip_batch(5)
    with torch.no_grad():
        image, text, scale = copy.deepcopy(model)(**batch)
        expected = ClipLoss()(image, text, scale)
    wrapped, loss = _first_loss(model, batch)
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=1e-6)
    wrapped = vlmdistill.wrap(vlmdistill.unwrap(wrapped), plugin="msd", queue_size=8, alpha_warmup_steps=0)
    wrapped.train()
    _train_two_steps(wrapped, _open_clip_batch)
    wrapped.save_pretrained(tmp_path / "ckpt")           # not a transformers model: generic safetensors
    resumed = vlmdistill.load(str(tmp_path / "ckpt"), model=_open_clip())
    for key, value in wrapped.plugin.hidden_state().items():
        assert torch.equal(resumed.plugin.hidden_state()[key], value), key


def _siglip():
    from transformers import SiglipConfig, SiglipModel

    torch.manual_seed(0)
    return SiglipModel(SiglipConfig(
        text_config=dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=LENGTH),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=IMAGE, patch_size=8)))


def _hf_batch(n, seed=0):
    return collate(examples(n, seed))


def test_siglip_student_uses_its_logit_scale():
    model = _siglip()
    batch = _hf_batch(4)
    with torch.no_grad():
        out = copy.deepcopy(model)(**batch)
        expected = _infonce(out.image_embeds, out.text_embeds, model.logit_scale.exp())
    wrapped, loss = _first_loss(model, batch)
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=1e-6)
    wrapped = vlmdistill.wrap(vlmdistill.unwrap(wrapped), plugin="msd", queue_size=8)
    wrapped.train()
    _train_two_steps(wrapped, _hf_batch)


def _dual_encoder():
    from transformers import BertConfig, CLIPVisionConfig, VisionTextDualEncoderConfig, VisionTextDualEncoderModel

    torch.manual_seed(0)
    config = VisionTextDualEncoderConfig.from_vision_text_configs(
        CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         image_size=IMAGE, patch_size=8),
        BertConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                   num_attention_heads=2, max_position_embeddings=16, hidden_dropout_prob=0.0,
                   attention_probs_dropout_prob=0.0),
        projection_dim=16)
    return VisionTextDualEncoderModel(config)


def test_vision_text_dual_encoder_student():
    model = _dual_encoder()
    batch = _hf_batch(4)
    with torch.no_grad():
        expected = copy.deepcopy(model)(**batch, return_loss=True).loss
    wrapped, loss = _first_loss(model, batch)
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=1e-6)
    wrapped = vlmdistill.wrap(vlmdistill.unwrap(wrapped), plugin="msd", queue_size=8)
    wrapped.train()
    _train_two_steps(wrapped, _hf_batch)


def test_embeddings_through_hooks_match_the_output_path():
    batch = _hf_batch(4)
    results = {}
    for mode, config in (("output", {}), ("hooks", dict(image_embeds_module="visual_projection",
                                                        text_embeds_module="text_projection"))):
        student = tiny_clip()
        wrapped = vlmdistill.wrap(student, plugin="msd", alpha=0.4, alpha_warmup_steps=0, queue_size=0, **config)
        wrapped.train()
        loss = wrapped(**batch).loss
        loss.backward()
        grads = {n: p.grad.clone() for n, p in wrapped.named_parameters() if p.grad is not None}
        results[mode] = (loss.detach(), grads)
        if mode == "hooks":
            teacher = wrapped.plugin.teacher
            assert wrapped.student.visual_projection._forward_hooks and teacher.visual_projection._forward_hooks
            vlmdistill.unwrap(wrapped)
            assert not student.visual_projection._forward_hooks and not teacher.visual_projection._forward_hooks
    torch.testing.assert_close(results["hooks"][0], results["output"][0])
    for name, grad in results["output"][1].items():
        torch.testing.assert_close(results["hooks"][1][name], grad, msg=name)


def test_hook_paths_are_checked_at_wrap_time():
    from vlmdistill.errors import UnsupportedModelError

    with pytest.raises(UnsupportedModelError, match="no submodule 'visual_proj'"):
        vlmdistill.wrap(tiny_clip(), plugin="msd", image_embeds_module="visual_proj",
                        text_embeds_module="text_projection")


def test_plugin_owned_temperature_is_trained():
    student = tiny_clip()
    wrapped = vlmdistill.wrap(student, plugin="msd", temperature=0.07, queue_size=0)
    wrapped.train()
    wrapped(**_hf_batch(4)).loss.backward()
    assert wrapped.plugin.temp.grad is not None and wrapped.plugin.temp.grad.abs() > 0
    assert student.logit_scale.grad is None     # the model's own scale is not used
