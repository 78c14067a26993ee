"""Wrapping LinguDistill: compatibility refusals, unsupported models, PEFT base teachers, attention backends."""

from __future__ import annotations

import pytest
import torch
from contract_cases.lingudistill import (collate, independent_teacher, language_model_copy, text_config, tiny_llava,
                                         vlm_example)

import vlmdistill
from vlmdistill.errors import ConfigError, IncompatibleTeacherError, UnsupportedModelError


def _batch(dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    batch = collate([vlm_example("llava", g, image_at=2), vlm_example("llava", g, image_at=3)])
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in batch.items()}


def _llama_teacher(**changes):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(3)
    return LlamaForCausalLM(LlamaConfig(**{**text_config(), **changes}))


@pytest.mark.parametrize("changes,message", [
    ({"num_hidden_layers": 3}, "num_hidden_layers differs (student 2 vs teacher 3)"),
    ({"num_key_value_heads": 1}, "num_key_value_heads differs (student 2 vs teacher 1)"),
    ({"head_dim": 16}, "head_dim differs (student 8 vs teacher 16)"),
    ({"hidden_size": 48, "num_attention_heads": 6}, "hidden_size differs (student 32 vs teacher 48)"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}},
     "rope_theta (RoPE base) differs (student 10000.0 vs teacher 500000.0)"),
    ({"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}},
     "rope_type differs (student 'default' vs teacher 'linear')"),
])
def test_incompatible_teacher_is_refused_naming_both_values(changes, message):
    student = tiny_llava()
    with pytest.raises(IncompatibleTeacherError) as err:
        vlmdistill.wrap(student, plugin="lingudistill", teacher=_llama_teacher(**changes))
    assert message in str(err.value)
    assert student.config.text_config._attn_implementation == "sdpa"  # nothing was attached


def test_qwen2_vl_student_takes_a_qwen2_teacher_despite_mrope():
    from contract_cases.lingudistill import tiny_qwen2_vl

    student = tiny_qwen2_vl()
    vlmdistill.wrap(student, plugin="lingudistill", teacher=independent_teacher(student)).unwrap()


def test_text_only_student_is_refused():
    student = _llama_teacher()
    with pytest.raises(UnsupportedModelError, match="LlamaForCausalLM.config names no image or video token id.*kd"):
        vlmdistill.wrap(student, plugin="lingudistill", teacher=_llama_teacher())


def test_paligemma_is_refused_with_the_reason():
    from transformers import PaliGemmaConfig, PaliGemmaForConditionalGeneration

    cfg = PaliGemmaConfig(text_config=dict(model_type="gemma", vocab_size=80, hidden_size=32, intermediate_size=64,
                                           num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                           head_dim=8),
                          vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                             num_attention_heads=2, image_size=16, patch_size=8),
                          image_token_id=79, projection_dim=32)
    with pytest.raises(UnsupportedModelError, match="cannot distil into 'paligemma' students.*bidirectionally"):
        vlmdistill.wrap(PaliGemmaForConditionalGeneration(cfg), plugin="lingudistill", teacher=_llama_teacher())


def _tiny_gemma3():
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    return Gemma3ForConditionalGeneration(Gemma3Config(
        text_config=dict(head_dim=8, **text_config()), mm_tokens_per_image=4,
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=16, patch_size=8)))


def _tiny_mllama():
    from transformers import MllamaConfig, MllamaForConditionalGeneration

    return MllamaForConditionalGeneration(MllamaConfig(
        text_config=dict(cross_attention_layers=[1], **text_config()), image_token_index=79,
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_global_layers=1,
                           attention_heads=2, image_size=16, patch_size=8, vision_output_dim=32, max_num_tiles=1,
                           supported_aspect_ratios=[[1, 1]])))


def _tiny_qwen3_vl():
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]}
    return Qwen3VLForConditionalGeneration(Qwen3VLConfig(
        text_config=dict(head_dim=8, rope_parameters=rope, **text_config()),
        vision_config=dict(depth=2, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32,
                           patch_size=4, spatial_merge_size=2, temporal_patch_size=2, deepstack_visual_indexes=[1],
                           num_position_embeddings=16)))


@pytest.mark.parametrize("build,message", [
    (_tiny_gemma3, "'gemma3' students: its image tokens attend bidirectionally"),
    (_tiny_mllama, "'mllama' students: images enter through cross-attention layers"),
    (_tiny_qwen3_vl, "'qwen3_vl' students: it injects visual features into several decoder layers \\(deep-stack"),
])
def test_structural_misfits_are_refused_with_the_reason(build, message):
    with pytest.raises(UnsupportedModelError, match=message):
        vlmdistill.wrap(build(), plugin="lingudistill", teacher=_llama_teacher())


def test_sliding_window_students_run_up_to_their_window():
    """Mistral-style sliding-window attention equals full causal attention on sequences no longer than the
    window; a longer batch is refused naming the window."""
    from contract_cases.lingudistill import tiny_mistral3

    student = tiny_mistral3(sliding_window=20, dtype=torch.float64).eval()
    teacher = language_model_copy(student)
    g = torch.Generator().manual_seed(0)
    wrapped = vlmdistill.wrap(student, plugin="lingudistill", teacher=teacher)
    fits = collate([vlm_example("mistral3", g, length=20)])
    fits = {k: v.double() if v.is_floating_point() else v for k, v in fits.items()}
    got = wrapped.plugin.paired_logits(student, fits)
    torch.testing.assert_close(got["teacher"], got["student"], rtol=1e-9, atol=1e-10)
    with pytest.raises(UnsupportedModelError, match="sliding window of 20 tokens and this batch has 21 positions"):
        wrapped.plugin.paired_logits(student, collate([vlm_example("mistral3", g, length=21)]))
    vlmdistill.unwrap(wrapped)


def test_visual_ids_come_from_the_config_attributes_whatever_the_family():
    from vlmdistill.plugins.lingudistill.families import config_visual_ids

    from contract_cases.lingudistill import FAMILY_BUILDERS, QWEN_IDS

    for family, build in FAMILY_BUILDERS.items():
        ids = set(config_visual_ids(build().config).values())
        if family.startswith("qwen2"):
            assert ids == set(QWEN_IDS.values()), family
        elif family == "llava_onevision":
            assert ids == {79, QWEN_IDS["video_token_id"]}, family
        else:
            assert ids == {79}, family


def test_unsupported_attention_implementation_is_refused():
    student = tiny_llava()
    student.set_attn_implementation({"text_config": "flex_attention"})
    with pytest.raises(UnsupportedModelError, match="'flex_attention'.*set_attn_implementation"):
        vlmdistill.wrap(student, plugin="lingudistill", teacher=independent_teacher(student))


def _lora_student():
    from peft import LoraConfig, get_peft_model

    student = tiny_llava(seed=1, dtype=torch.float64)
    base_copy = language_model_copy(student)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|down_proj)")
    peft_student = get_peft_model(student, lora)
    torch.manual_seed(5)
    with torch.no_grad():
        for name, p in peft_student.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)  # adapters that actually change the language model
    return peft_student, base_copy


@pytest.mark.parametrize("teacher_arg", ["base", None])
def test_peft_student_distils_from_its_own_base_weights(teacher_arg):
    peft_student, base_copy = _lora_student()
    batch = _batch()
    explicit = vlmdistill.wrap(peft_student, plugin="lingudistill", teacher=base_copy)
    want = explicit.plugin.paired_logits(peft_student, batch)
    vlmdistill.unwrap(explicit)

    params_before = {p.data_ptr() for p in peft_student.parameters()}
    wrapped = vlmdistill.wrap(peft_student, plugin="lingudistill", teacher=teacher_arg)
    plugin = wrapped.plugin
    assert plugin.teacher_is_student_base and plugin.teacher is peft_student
    # No second copy: every tensor the teacher reads is one of the student's own parameters.
    teacher_params = {p.data_ptr() for p in plugin._teacher_lm.decoder.parameters()}
    teacher_params |= {p.data_ptr() for p in plugin._teacher_lm.head.parameters()}
    assert teacher_params <= params_before
    assert {p.data_ptr() for p in wrapped.parameters()} == params_before
    got = plugin.paired_logits(peft_student, batch)
    torch.testing.assert_close(got["teacher"], want["teacher"], rtol=1e-9, atol=1e-10)
    assert (got["teacher"] - got["student"]).abs().max() > 1e-3  # the adapters do change the student

    peft_student.train()
    out = wrapped(**batch)
    out.loss.backward()
    assert peft_student.training  # the teacher pass gave the student its mode back
    lora_grads = [p.grad for n, p in peft_student.named_parameters() if "lora_" in n]
    assert lora_grads and all(g is not None for g in lora_grads)


def test_base_teacher_refuses_the_undetached_ablation():
    peft_student, _ = _lora_student()
    with pytest.raises(ConfigError, match="detach_shared_kv=False needs a separate teacher"):
        vlmdistill.wrap(peft_student, plugin="lingudistill", teacher="base", detach_shared_kv=False)


def test_triton_kernel_refuses_head_dims_past_the_kernels_limit():
    """One policy with the dispatcher: head dims up to 128 run (zero-padded), wider ones are refused at wrap."""
    pytest.importorskip("triton")
    student = tiny_llava(hidden=160, heads=1, kv_heads=1)
    with pytest.raises(ConfigError, match="head_dim up to 128; got 160"):
        vlmdistill.wrap(student, plugin="lingudistill", teacher=independent_teacher(student), kernel="triton")
    small = tiny_llava()  # head_dim 8: zero-padded to 16 by the kernel
    vlmdistill.unwrap(vlmdistill.wrap(small, plugin="lingudistill", teacher=independent_teacher(small),
                                      kernel="triton"))


def test_triton_kernel_gives_the_torch_teacher_logits():
    """End to end: the teacher's two-source attention through the fused Triton kernel (the interpreter on the
    CPU) equals the masked-SDPA path."""
    pytest.importorskip("triton")
    student = tiny_llava(seed=1, hidden=64, heads=2, kv_heads=1)  # head_dim 32: a kernel size
    teacher = independent_teacher(student)
    batch = _batch(torch.float32)
    got = {}
    for kernel in ("torch", "triton"):
        wrapped = vlmdistill.wrap(student, plugin="lingudistill", teacher=teacher, kernel=kernel)
        got[kernel] = wrapped.plugin.paired_logits(student, batch)
        vlmdistill.unwrap(wrapped)
    assert torch.equal(got["torch"]["rows"], got["triton"]["rows"])
    torch.testing.assert_close(got["triton"]["teacher"], got["torch"]["teacher"], rtol=1e-4, atol=1e-5)
    assert (got["torch"]["teacher"] - got["torch"]["student"]).abs().max() > 1e-3


def test_idefics3_structure_tokens_are_shared_through_the_tokenizer():
    """`<fake_token_around_image>`, `<row_i_col_j>`, `<global-img>` are only known to the tokenizer: with it they
    count as visual (shared, never distilled); without it only the config's `<image>` id does."""
    from contract_cases.lingudistill import tiny_idefics3
    from test_lingudistill_loss import _Tok

    words = [f"w{i}" for i in range(80)]
    words[70:73] = ["<fake_token_around_image>", "<row_1_col_1>", "<global-img>"]
    student = tiny_idefics3()
    teacher = independent_teacher(student)
    batch = collate([vlm_example("idefics3", torch.Generator().manual_seed(0), image_at=3)])
    batch["input_ids"][0, 2] = 70
    batch["input_ids"][0, 7:9] = torch.tensor([71, 72])
    plain = vlmdistill.wrap(student, plugin="lingudistill", teacher=teacher)
    assert plain.plugin.plan(batch, {}).unreadable[0].nonzero().squeeze(1).tolist() == [3, 4, 5, 6]
    vlmdistill.unwrap(plain)
    wrapped = vlmdistill.wrap(student, plugin="lingudistill", teacher=teacher, student_tokenizer=_Tok(words),
                              teacher_tokenizer=_Tok(words))
    plan = wrapped.plugin.plan(batch, {})
    assert plan.unreadable[0].nonzero().squeeze(1).tolist() == [2, 3, 4, 5, 6, 7, 8]
    assert not plan.distilled[0, 7:9].any()


def test_a_teacher_cannot_serve_two_wrappers_at_once():
    first, second = tiny_llava(seed=1), tiny_llava(seed=2)
    teacher = independent_teacher(first)
    wrapped = vlmdistill.wrap(first, plugin="lingudistill", teacher=teacher)
    with pytest.raises(UnsupportedModelError, match="teacher is already attached to another lingudistill wrapper"):
        vlmdistill.wrap(second, plugin="lingudistill", teacher=teacher)
    vlmdistill.unwrap(wrapped)
    vlmdistill.wrap(second, plugin="lingudistill", teacher=teacher).unwrap()
