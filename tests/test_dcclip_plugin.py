"""dcclip wrap-time checks, model families, gradients, stage 2 and export."""

import math

import pytest
import torch
from torch import nn

import vlmdistill
from vlmdistill.errors import ConfigError, IncompatibleTeacherError, UnsupportedModelError
from vlmdistill.eval.tiny_models import tiny_hf_clip, tiny_open_clip
from image_text_fixtures import token_batch


def _hf_batch(n=3, seed=0, size=32, length=9):
    g = torch.Generator().manual_seed(seed + 100)
    return {**token_batch(n, length=length, seed=seed), "pixel_values": torch.randn(n, 3, size, size, generator=g)}


def _open_clip_batch(n=3, seed=0, size=32, context=16):
    tokens = token_batch(n, length=context, seed=seed)
    g = torch.Generator().manual_seed(seed + 100)
    return {"image": torch.randn(n, 3, size, size, generator=g), "text": tokens["input_ids"]}


def test_gradients_reach_only_the_student_and_the_adapters():
    student = tiny_hf_clip(hidden=16, layers=1, patch=8, seed=1)
    teacher = tiny_hf_clip(hidden=32, layers=2, patch=4, projection=24, seed=2)
    wrapped = vlmdistill.wrap(student, plugin="dcclip", teacher=teacher, embedding_weight=0.5)
    wrapped(**_hf_batch()).loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert set(wrapped.plugin.adapters) == {"image", "text", "image_embed", "text_embed"}
    for name, p in wrapped.plugin.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    encoders = ("vision_model.encoder", "text_model.encoder")
    towers = {n: p for n, p in student.named_parameters() if n.startswith(encoders)}
    assert towers and all(p.grad.abs().sum() > 0 for p in towers.values())
    # Stage 1 does not train the logit scale: no gradient at all (not a zero one, which would move AdamW's state).
    assert student.logit_scale.grad is None


def _fresh(optimizer, param) -> bool:
    """The state a fresh Adam starts from (step 0, zero moments): there is one to checkpoint, and it has not moved."""
    state = optimizer.state.get(param)
    return bool(state) and int(state["step"]) == 0 and all(not v.any() for k, v in state.items() if k != "step")


def test_idle_parameters_get_no_optimizer_update_and_start_stage_2_as_a_fresh_adam():
    """Stage 1 leaves the logit scale, the projections and the vision pooling norm idle (no embedding term): AdamW
    with weight decay must neither decay them nor advance their state, so that their first stage-2 update is a
    fresh AdamW's, even in one optimizer run across the switch (the restart off). Stage 2 leaves the adapters idle."""
    student = tiny_hf_clip(hidden=16, layers=1, patch=8, seed=1)
    teacher = tiny_hf_clip(hidden=32, layers=2, patch=4, projection=24, seed=2)
    wrapped = vlmdistill.wrap(student, plugin="dcclip", teacher=teacher, switch_at_step=3,
                              restart_optimizer_at_switch=False)
    idle = {"logit_scale": student.logit_scale, "visual_projection": student.visual_projection.weight,
            "text_projection": student.text_projection.weight,
            "post_layernorm": student.vision_model.post_layernorm.weight}
    before = {name: p.detach().clone() for name, p in idle.items()}
    lr, decay = 1e-2, 0.1
    optimizer = torch.optim.AdamW([p for p in wrapped.parameters() if p.requires_grad], lr=lr, weight_decay=decay)
    for step in range(3):
        wrapped(**_hf_batch(seed=step)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        wrapped.step_end()
        for name, p in idle.items():
            assert torch.equal(p.detach(), before[name]), f"{name} moved in stage 1 (step {step})"
            assert _fresh(optimizer, p), f"{name}'s AdamW state advanced in stage 1 (step {step})"
    assert int(wrapped.plugin.stage) == 2
    adapters = {name: p.detach().clone() for name, p in wrapped.plugin.adapters.named_parameters()}

    wrapped(**_hf_batch(seed=3)).loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in idle.items()}
    optimizer.step()
    for name, p in idle.items():
        reference = nn.Parameter(before[name].double())
        reference.grad = grads[name].double()
        torch.optim.AdamW([reference], lr=lr, weight_decay=decay).step()
        assert not torch.equal(p.detach(), before[name]), name
        torch.testing.assert_close(p.detach().double(), reference.detach(), rtol=1e-6, atol=1e-8, msg=name)
        assert int(optimizer.state[p]["step"]) == 1, name
    for name, p in wrapped.plugin.adapters.named_parameters():
        assert p.grad is None and torch.equal(p.detach(), adapters[name]), f"adapter {name} moved in stage 2"


FAMILY_PAIRS = [
    ("clip", "altclip"), ("chinese_clip", "clip"), ("siglip", "clip"), ("clip", "siglip"), ("altclip", "chinese_clip"),
]


@pytest.mark.parametrize("student_family,teacher_family", FAMILY_PAIRS)
def test_hf_family_pairs_train_in_both_stages(student_family, teacher_family):
    student = tiny_hf_clip(student_family, hidden=16, layers=1, patch=8, seed=1)
    teacher = tiny_hf_clip(teacher_family, hidden=32, layers=1, patch=4, projection=24, seed=2)
    wrapped = vlmdistill.wrap(student, plugin="dcclip", teacher=teacher, switch_at_step=1, embedding_weight=0.5)
    optimizer = torch.optim.SGD([p for p in wrapped.parameters() if p.requires_grad], lr=0.1)
    for expected in ({"image", "text", "image_embed", "text_embed"}, {"contrastive"}):
        out = wrapped(**_hf_batch())
        assert set(out.loss_terms) == expected
        assert torch.isfinite(out.loss)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        wrapped.step_end()


@pytest.mark.parametrize("kind", ["vit", "resnet"])
def test_open_clip_student_with_hf_teacher_and_open_clip_teacher(kind):
    student, _ = tiny_open_clip(kind, width=32, layers=1, image_size=32, seed=1)
    hf_teacher = tiny_hf_clip(hidden=32, layers=1, patch=4, vocab=64, seed=2)
    batch = _open_clip_batch()
    # Different ways of calling the two models: the teacher reads its own columns.
    hf_tokens = {"teacher_input_ids": batch["text"][:, :9],
                 "teacher_attention_mask": torch.ones(3, 9, dtype=torch.long)}
    wrapped = vlmdistill.wrap(student, plugin="dcclip", teacher=hf_teacher, text_level="pooled")
    out = wrapped(**batch, **hf_tokens)
    assert set(out.loss_terms) == {"image", "text"} and torch.isfinite(out.loss)
    out.loss.backward()
    assert wrapped.plugin.adapters["image"].weight.grad.abs().sum() > 0
    vlmdistill.unwrap(wrapped)

    oc_teacher, _ = tiny_open_clip("vit", width=48, layers=2, patch=4, image_size=32, seed=3)
    wrapped = vlmdistill.wrap(student, plugin="dcclip", teacher=oc_teacher)  # same tokenizer: token level
    out = wrapped(**batch)
    assert set(out.loss_terms) == {"image", "text"} and torch.isfinite(out.loss)
    if kind == "resnet":  # a 1x1 feature map of the ResNet is interpolated onto the 8x8 teacher grid
        assert wrapped.plugin.student_spec.family == "open_clip:resnet"


def test_unsupported_model_and_missing_tap_are_clear_errors():
    with pytest.raises(UnsupportedModelError, match="not a supported CLIP-style model"):
        vlmdistill.wrap(nn.Linear(2, 2), plugin="dcclip", teacher=tiny_hf_clip())
    with pytest.raises(UnsupportedModelError, match="no submodule 'vision_model.no_such'"):
        vlmdistill.wrap(tiny_hf_clip(seed=1), plugin="dcclip", teacher=tiny_hf_clip(),
                        teacher_taps={"image_module": "vision_model.no_such"})
    with pytest.raises(ConfigError, match="needs teacher"):
        vlmdistill.wrap(tiny_hf_clip(), plugin="dcclip")


def test_tap_override_reads_another_layer():
    teacher = tiny_hf_clip(hidden=32, layers=2, patch=4, seed=2)
    wrapped = vlmdistill.wrap(tiny_hf_clip(hidden=16, layers=1, seed=1), plugin="dcclip", teacher=teacher,
                              teacher_taps={"image_module": "vision_model.encoder.layers.0", "image_prefix_tokens": 1})
    seen = []
    teacher.vision_model.encoder.layers[0].register_forward_hook(lambda m, i, o: seen.append(o))
    wrapped(**_hf_batch())
    assert wrapped.plugin.teacher_spec.image_module == "vision_model.encoder.layers.0" and len(seen) == 1


def test_token_level_text_refused_across_tokenizers_pooled_allowed():
    student = tiny_hf_clip(vocab=64, seed=1)
    teacher = tiny_hf_clip("altclip", vocab=250, hidden=32, projection=24, seed=2)
    with pytest.raises(IncompatibleTeacherError, match=r"student vocabulary .*64 tokens.* teacher vocabulary .*250"):
        vlmdistill.wrap(student, plugin="dcclip", teacher=teacher)
    wrapped = vlmdistill.wrap(student, plugin="dcclip", teacher=teacher, text_level="pooled")
    assert "text" not in wrapped.plugin.adapters and "text_embed" in wrapped.plugin.adapters
    vlmdistill.unwrap(wrapped)
    # Equal vocabulary sizes but different tokenizers (given to wrap): refused as well.
    from vlmdistill.data.text import train_caption_tokenizer

    tok_a = train_caption_tokenizer(["a photo of a seven", "数字七"], vocab_size=300)
    tok_b = train_caption_tokenizer(["a handwritten nine", "手写的九"], vocab_size=300)
    with pytest.raises(IncompatibleTeacherError, match="tokenizer"):
        vlmdistill.wrap(student, plugin="dcclip", teacher=tiny_hf_clip(vocab=64, seed=2), student_tokenizer=tok_a,
                        teacher_tokenizer=tok_b)
    vlmdistill.wrap(student, plugin="dcclip", teacher=tiny_hf_clip(vocab=64, seed=2), student_tokenizer=tok_a,
                    teacher_tokenizer=tok_a)


def test_token_level_refuses_teacher_ids_that_differ():
    wrapped = vlmdistill.wrap(tiny_hf_clip(seed=1), plugin="dcclip", teacher=tiny_hf_clip(seed=2))
    batch = _hf_batch()
    other = batch["input_ids"].clone()
    other[:, 1] = (other[:, 1] + 1) % 60 + 4
    with pytest.raises(IncompatibleTeacherError, match="teacher_input_ids differ"):
        wrapped(**batch, teacher_input_ids=other, teacher_attention_mask=batch["attention_mask"])


def test_stage2_uses_the_students_logit_scale_and_clamps_it():
    student = tiny_hf_clip(seed=1)
    wrapped = vlmdistill.wrap(student, plugin="dcclip", stage=2)
    assert wrapped.plugin.teacher is None and not list(wrapped.plugin.parameters())
    out = wrapped(**_hf_batch())
    out.loss.backward()
    assert student.logit_scale.grad is not None and float(student.logit_scale.grad) != 0.0
    with torch.no_grad():
        student.logit_scale.fill_(10.0)
    wrapped.step_end()
    assert float(student.logit_scale.detach()) == pytest.approx(math.log(100.0))

    own = vlmdistill.wrap(tiny_hf_clip(seed=1), plugin="dcclip", stage=2, logit_scale="plugin")
    assert float(own.plugin.own_logit_scale.detach()) == pytest.approx(math.log(1 / 0.07))
    own(**_hf_batch()).loss.backward()
    assert float(own.plugin.own_logit_scale.grad) != 0.0


def test_export_hf_student_is_plain_transformers_without_adapters(tmp_path):
    from transformers import CLIPModel

    student = tiny_hf_clip(hidden=16, layers=1, seed=1)
    keys = list(student.state_dict())
    wrapped = vlmdistill.wrap(student, plugin="dcclip", teacher=tiny_hf_clip(hidden=32, patch=4, seed=2))
    wrapped(**_hf_batch()).loss.backward()
    exported = vlmdistill.unwrap(wrapped)
    assert list(exported.state_dict()) == keys
    exported.save_pretrained(tmp_path / "student")
    loaded = CLIPModel.from_pretrained(tmp_path / "student")
    assert set(loaded.state_dict()) == set(keys)
    batch = _hf_batch()
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval().get_image_features(pixel_values=batch["pixel_values"]).pooler_output,
                                   exported.eval().get_image_features(pixel_values=batch["pixel_values"]).pooler_output)


def test_export_open_clip_student_loads_with_open_clip_alone(tmp_path):
    import open_clip

    # the real CLIP BPE vocabulary size, so that open_clip's own tokenizer can drive the exported model
    student, name = tiny_open_clip("vit", width=32, layers=1, seed=1, vocab=49408)
    teacher, _ = tiny_open_clip("vit", width=48, layers=1, patch=4, seed=2, vocab=49408)
    wrapped = vlmdistill.wrap(student, plugin="dcclip", teacher=teacher, open_clip_config=name)
    wrapped(**_open_clip_batch()).loss.backward()
    wrapped.save_pretrained(str(tmp_path / "ckpt"))
    model, _, _ = open_clip.create_model_and_transforms("local-dir:" + str(tmp_path / "ckpt"))
    assert set(model.state_dict()) == set(student.state_dict())
    images = _open_clip_batch()["image"]
    student.eval()
    with torch.no_grad():
        torch.testing.assert_close(model.eval().encode_image(images), student.encode_image(images))
    # ...and the zero-shot harness reads the folder as it is
    from vlmdistill.eval.elevater.adapters import load_model

    adapter = load_model(str(tmp_path / "ckpt"))
    assert adapter.kind == "open_clip" and adapter.encode_texts(["a photo of a seven"]).shape == (1, 16)


# ------------------------------------------------------------------ end-of-text pooling of CLIP text towers

def _captions():
    return ["a photo of the digit seven.", "数字七的照片。", "a photo of the digit one.", "数字一的照片。"]


def test_clip_text_tower_that_would_pool_a_word_is_refused():
    """An XLM-R tokenizer's </s> is id 2, which transformers' CLIP reads as 'pool at the highest id' (a word)."""
    from vlmdistill.data.text import train_caption_tokenizer

    xlmr = train_caption_tokenizer(_captions(), vocab_size=300, layout="xlm-r")
    student = tiny_hf_clip(vocab=len(xlmr), eos_token_id=xlmr.eos_token_id, pad_token_id=xlmr.pad_token_id, seed=1)
    ids = xlmr(_captions()[0], return_tensors="pt")["input_ids"]
    pooled = student.text_model.eos_token_id == 2 and int(ids.argmax(-1)) != ids.shape[1] - 1
    assert pooled  # the trap is real: the legacy rule lands on a word, not on </s>
    with pytest.raises(IncompatibleTeacherError, match="legacy rule 'pool at the highest token id'"):
        vlmdistill.wrap(student, plugin="dcclip", stage=2, student_tokenizer=xlmr)
    # a tower that pools the first token (AltCLIP's XLM-R) takes the same tokenizer
    altclip = tiny_hf_clip("altclip", vocab=len(xlmr), pad_token_id=xlmr.pad_token_id, seed=1)
    vlmdistill.unwrap(vlmdistill.wrap(altclip, plugin="dcclip", stage=2, student_tokenizer=xlmr))
    # a config that pools at an id the tokenizer does not end captions with
    from vlmdistill.data.text import train_caption_tokenizer as train

    tok = train(_captions(), vocab_size=300)  # </eos> = 3
    with pytest.raises(IncompatibleTeacherError, match=r"pools at token id 5 .* ends captions with id 3"):
        vlmdistill.wrap(tiny_hf_clip(vocab=len(tok), eos_token_id=5, seed=1), plugin="dcclip", stage=2,
                        student_tokenizer=tok)
    # the teacher, which reads the student's ids unless it has its own tokenizer, is checked the same way
    with pytest.raises(IncompatibleTeacherError, match="the teacher's CLIP text tower"):
        vlmdistill.wrap(altclip, plugin="dcclip", text_level="pooled", student_tokenizer=xlmr,
                        teacher=tiny_hf_clip(vocab=len(xlmr), eos_token_id=2, hidden=32, seed=2))


def test_legacy_pooling_is_right_when_end_of_text_has_the_highest_id():
    """OpenAI's CLIP checkpoints keep eos_token_id=2 in their config and work: their <|endoftext|> is the last id."""
    from vlmdistill.data.text import train_caption_tokenizer

    tok = train_caption_tokenizer(_captions(), vocab_size=300)
    tok.add_special_tokens({"eos_token": "<|endoftext|>"})
    assert tok.eos_token_id == len(tok) - 1
    student = tiny_hf_clip(vocab=len(tok), eos_token_id=2, seed=1)
    vlmdistill.unwrap(vlmdistill.wrap(student, plugin="dcclip", stage=2, student_tokenizer=tok))


def test_first_batch_pooled_away_from_the_caption_end_is_refused_without_a_tokenizer():
    from vlmdistill.errors import DataError

    legacy = vlmdistill.wrap(tiny_hf_clip(eos_token_id=2, seed=1), plugin="dcclip", stage=2)
    with pytest.raises(DataError, match=r"legacy rule .* not the vocabulary's last id 63 .* but a word in caption 0"):
        legacy(**_hf_batch())  # captions end with id 3; the legacy rule pools their highest-id word
    other = vlmdistill.wrap(tiny_hf_clip(eos_token_id=5, seed=1), plugin="dcclip", stage=2)
    batch = _hf_batch()
    batch["input_ids"][batch["input_ids"] == 5] = 6
    with pytest.raises(DataError, match=r"first id 5 .* absent: it pools position 0 in caption 0"):
        other(**batch)
    right = vlmdistill.wrap(tiny_hf_clip(seed=1), plugin="dcclip", stage=2)
    assert torch.isfinite(right(**_hf_batch()).loss)


# ------------------------------------------------------------------ the teacher's own tokenizer on every path

def test_teacher_with_its_own_tokenizer_must_get_its_own_token_ids():
    from vlmdistill.errors import DataError
    from vlmdistill.data.text import train_caption_tokenizer

    tok_s = train_caption_tokenizer(_captions(), vocab_size=300)
    tok_t = train_caption_tokenizer(_captions()[::-1] + ["a handwritten nine"], vocab_size=300)
    student = tiny_hf_clip(vocab=300, seed=1)
    teacher = tiny_hf_clip(vocab=300, hidden=32, projection=24, seed=2)
    wrapped = vlmdistill.wrap(student, plugin="dcclip", teacher=teacher, text_level="pooled",
                              student_tokenizer=tok_s, teacher_tokenizer=tok_t)
    captions = _captions()
    s = tok_s(captions, padding=True, return_tensors="pt")
    t = tok_t(captions, padding=True, return_tensors="pt")
    pixels = torch.randn(4, 3, 32, 32)
    with pytest.raises(DataError, match="no 'teacher_input_ids': the teacher would read the student's token ids"):
        wrapped(pixel_values=pixels, **s)
    out = wrapped(pixel_values=pixels, **s, teacher_input_ids=t["input_ids"],
                  teacher_attention_mask=t["attention_mask"])
    assert torch.isfinite(out.loss)


# ------------------------------------------------------------------ VisionTextDualEncoderModel students

def _dual_encoder(vision: str = "clip", seed: int = 1):
    import transformers as T

    torch.manual_seed(seed)
    tower = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                 patch_size=8)
    vision_config = T.CLIPVisionConfig(**tower) if vision == "clip" else T.ViTConfig(**tower)
    text_config = T.BertConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                               vocab_size=64, max_position_embeddings=40, pad_token_id=0)
    config = T.VisionTextDualEncoderConfig.from_vision_text_configs(vision_config, text_config, projection_dim=16)
    return T.VisionTextDualEncoderModel(config)


@pytest.mark.parametrize("vision", ["clip", "vit"])
def test_vision_text_dual_encoder_student_trains_both_stages_and_exports(tmp_path, vision):
    from transformers import VisionTextDualEncoderModel

    student = _dual_encoder(vision)
    keys = dict(student.state_dict())
    teacher = tiny_hf_clip(hidden=32, layers=1, patch=4, projection=24, seed=2)
    wrapped = vlmdistill.wrap(student, plugin="dcclip", teacher=teacher, switch_at_step=1, embedding_weight=0.5)
    spec = wrapped.plugin.student_spec
    assert spec.family == "hf:vision-text-dual-encoder" and spec.image_dim == 16 and spec.text_dim == 16
    captured = {}

    def batch_pixels():
        return _hf_batch()["pixel_values"]

    student.vision_model.register_forward_hook(lambda m, i, o: captured.update(image=o.last_hidden_state))
    optimizer = torch.optim.AdamW([p for p in wrapped.parameters() if p.requires_grad], lr=1e-2)
    for expected in ({"image", "text", "image_embed", "text_embed"}, {"contrastive"}):
        out = wrapped(**_hf_batch())
        assert set(out.loss_terms) == expected and torch.isfinite(out.loss)
        out.loss.backward()
        if expected == {"contrastive"}:
            assert student.logit_scale.grad is not None
        else:  # the image map is the tower's patch tokens (its class token dropped), laid on the 4x4 grid
            assert captured["image"].shape[1] == 1 + 4 * 4
            image_map = wrapped.plugin.student_spec.image_map(captured["image"], batch_pixels())
            torch.testing.assert_close(image_map[:, :, 1, 2], captured["image"][:, 1 + 4 * 1 + 2])
            assert all(p.grad is not None for p in student.vision_model.parameters() if p.requires_grad)
        optimizer.step()
        optimizer.zero_grad()
        wrapped.step_end()
    exported = vlmdistill.unwrap(wrapped)
    assert list(exported.state_dict()) == list(keys)
    exported.save_pretrained(tmp_path / "student")
    loaded = VisionTextDualEncoderModel.from_pretrained(tmp_path / "student").eval()
    batch = _hf_batch()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).image_embeds, exported.eval()(**batch).image_embeds)
