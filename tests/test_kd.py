"""The `kd` plugin on real tiny HF models: loss against a manual float64 computation, vocabularies,
feature matching, PEFT students, classifiers."""

import pytest
import torch
import torch.nn.functional as F
from tiny_models import tiny_llama, tiny_qwen2, token_batch

import vlmdistill
from vlmdistill.errors import ConfigError, IncompatibleTeacherError
from vlmdistill.losses import reference_divergence, standardize_logits


def _manual_kd(student, teacher, batch, alpha, temperature, kind="forward_kl", standardize=False):
    s = student(input_ids=batch["input_ids"]).logits[:, :-1]
    with torch.no_grad():
        t = teacher(input_ids=batch["input_ids"]).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    rows = labels != -100
    ce = F.cross_entropy(s[rows], labels[rows])
    s_sel, t_sel = s[rows], t[rows]
    if standardize:
        s_sel, t_sel = standardize_logits(s_sel), standardize_logits(t_sel)
    kd = reference_divergence(s_sel, t_sel, kind=kind, temperature=temperature).mean()
    return (1 - alpha) * ce + alpha * kd, ce, kd


@pytest.mark.parametrize("kind,standardize", [("forward_kl", False), ("reverse_kl", False), ("jsd", True)])
def test_loss_matches_manual_float64(kind, standardize):
    student = tiny_llama(seed=1).double()
    teacher = tiny_llama(layers=3, hidden=48, seed=2).double()
    batch = token_batch(3, seed=4)
    wrapped = vlmdistill.wrap(student, "kd", teacher=teacher, alpha=0.3, temperature=2.0, divergence=kind,
                              logit_standardization=standardize)
    out = wrapped(**batch)
    expected, ce, kd = _manual_kd(student, teacher, batch, 0.3, 2.0, kind, standardize)
    # transformers computes its CE in float32; the KD term stays in float64.
    torch.testing.assert_close(out.loss.double(), expected, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(out.loss_terms["task"].double(), ce, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(out.loss_terms["kd"], kd, rtol=1e-10, atol=1e-12)
    # CE and KD without standardization run as one fused pass with a hand-written gradient: check it too.
    params = list(student.parameters())
    for got, ref in zip(torch.autograd.grad(out.loss, params), torch.autograd.grad(expected, params)):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-9)


def test_unsupervised_positions_are_not_distilled():
    student, teacher = tiny_llama(seed=1), tiny_llama(seed=2)
    batch = token_batch(2, seed=3, prompt=6)
    wrapped = vlmdistill.wrap(student, "kd", teacher=teacher, alpha=1.0)
    base = wrapped(**batch).loss_terms["kd"]
    changed = dict(batch)
    ids = batch["input_ids"]
    changed["labels"] = batch["labels"].clone()
    changed["labels"][:, 6:9] = -100
    fewer = wrapped(**changed).loss_terms["kd"]
    assert not torch.isclose(base, fewer)
    s = student(input_ids=ids).logits[:, :-1]
    t = teacher(input_ids=ids).logits[:, :-1]
    rows = changed["labels"][:, 1:] != -100
    torch.testing.assert_close(fewer, reference_divergence(s[rows], t[rows]).mean(), rtol=1e-5, atol=1e-6)


def test_pure_distillation_without_labels_uses_all_non_padding_positions():
    student, teacher = tiny_llama(seed=1), tiny_llama(seed=2)
    batch = token_batch(2, seed=3)
    batch["attention_mask"][0, -3:] = 0
    del batch["labels"]
    wrapped = vlmdistill.wrap(student, "kd", teacher=teacher)
    out = wrapped(**batch)
    assert set(out.loss_terms) == {"kd"}
    s = student(**batch).logits[:, :-1]
    t = teacher(**batch).logits[:, :-1]
    rows = batch["attention_mask"][:, 1:].bool()
    torch.testing.assert_close(out.loss, reference_divergence(s[rows], t[rows]).mean(), rtol=1e-5, atol=1e-6)


def test_vocabulary_prefix_is_compared_and_mismatch_refused():
    student, teacher = tiny_llama(seed=1, vocab=64), tiny_llama(seed=2, vocab=72)
    with pytest.raises(IncompatibleTeacherError, match="64 vs teacher 72"):
        vlmdistill.wrap(student, "kd", teacher=teacher)
    wrapped = vlmdistill.wrap(student, "kd", teacher=teacher, alpha=1.0, trust_vocab_prefix=True)
    batch = token_batch(2, seed=3)
    out = wrapped(**batch)
    s = student(input_ids=batch["input_ids"]).logits[:, :-1]
    t = teacher(input_ids=batch["input_ids"]).logits[:, :-1, :64]
    rows = batch["labels"][:, 1:] != -100
    torch.testing.assert_close(out.loss, reference_divergence(s[rows], t[rows]).mean(), rtol=1e-5, atol=1e-6)


def test_tokenizers_decide_the_shared_prefix(tmp_path):
    from vlmdistill.data.text import train_tokenizer

    texts = ["the quick brown fox jumps over the lazy dog " * 3, "pack my box with five dozen liquor jugs"] * 5
    tok_a = train_tokenizer(texts, vocab_size=300)
    tok_b = train_tokenizer([t.upper() for t in texts], vocab_size=300)
    student, teacher = tiny_llama(seed=1, vocab=len(tok_a)), tiny_llama(seed=2, vocab=len(tok_a) + 8)
    vlmdistill.wrap(student, "kd", teacher=teacher, student_tokenizer=tok_a, teacher_tokenizer=tok_a)
    with pytest.raises(IncompatibleTeacherError, match="tokenizers disagree at id"):
        vlmdistill.wrap(tiny_llama(seed=1, vocab=len(tok_a)), "kd", teacher=tiny_llama(seed=2, vocab=len(tok_b)),
                        student_tokenizer=tok_a, teacher_tokenizer=tok_b)


def test_qwen2_teacher_student_pair_trains():
    student, teacher = tiny_qwen2(seed=1), tiny_qwen2(layers=3, hidden=48, seed=2)
    wrapped = vlmdistill.wrap(student, "kd", teacher=teacher, divergence="jsd", alpha=1.0)
    opt = torch.optim.AdamW(wrapped.parameters(), lr=3e-3)
    batch = token_batch(4, seed=5)
    losses = []
    for _ in range(5):
        out = wrapped(**batch)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(out.loss_terms["kd"].item())
    assert losses[-1] < losses[0]


def test_feature_projection_is_plugin_state_and_loss_is_projected_mse():
    student, teacher = tiny_llama(seed=1, hidden=32), tiny_llama(seed=2, hidden=48, heads=4)
    wrapped = vlmdistill.wrap(student, "kd", teacher=teacher, alpha=0.5,
                              features=[{"student": "model.norm", "teacher": "model.norm", "weight": 2.0}])
    assert "plugin.projections.0.weight" in wrapped.state_dict()
    assert not any("projections" in k for k in student.state_dict())
    batch = token_batch(2, seed=3)
    out = wrapped(**batch)
    s_feat = student.model(input_ids=batch["input_ids"]).last_hidden_state
    t_feat = teacher.model(input_ids=batch["input_ids"]).last_hidden_state
    proj = wrapped.plugin.projections["0"]
    torch.testing.assert_close(out.loss_terms["feature_0"], ((proj(s_feat) - t_feat) ** 2).mean(), rtol=1e-5,
                               atol=1e-6)
    expected_total = 0.5 * out.loss_terms["task"] + 0.5 * out.loss_terms["kd"] + 2.0 * out.loss_terms["feature_0"]
    torch.testing.assert_close(out.loss, expected_total)
    out.loss.backward()
    assert proj.weight.grad is not None and proj.weight.grad.abs().sum() > 0


def test_bad_feature_path_names_valid_ones():
    with pytest.raises(vlmdistill.UnsupportedModelError, match="model.layers"):
        vlmdistill.wrap(tiny_llama(seed=1), "kd", teacher=tiny_llama(seed=2),
                        features=[{"student": "model.layerz.0", "teacher": "model.norm"}])


def test_lora_student_with_explicit_and_base_teacher():
    from peft import LoraConfig, get_peft_model

    base = tiny_llama(seed=1)
    reference = tiny_llama(seed=1)  # the same weights, no adapters
    student = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                              init_lora_weights=False))
    batch = token_batch(2, seed=3)
    wrapped = vlmdistill.wrap(student, "kd", teacher="base", alpha=1.0)
    out = wrapped(**batch)
    # The 'base' teacher is the student's own weights with adapters disabled: the reference model.
    s = student(input_ids=batch["input_ids"]).logits[:, :-1]
    t = reference(input_ids=batch["input_ids"]).logits[:, :-1]
    rows = batch["labels"][:, 1:] != -100
    torch.testing.assert_close(out.loss, reference_divergence(s[rows], t[rows]).mean(), rtol=1e-5, atol=1e-6)
    out.loss.backward()
    trainable = {n for n, p in wrapped.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert all(p.grad is None for n, p in wrapped.named_parameters() if "lora_" not in n)
    assert student.training  # running the base teacher gave the student its mode back

    explicit = vlmdistill.wrap(get_peft_model(tiny_llama(seed=1), LoraConfig(r=4, target_modules=["q_proj"])),
                               "kd", teacher=tiny_llama(layers=3, seed=2))
    explicit(**batch).loss.backward()


def test_base_teacher_needs_adapters():
    with pytest.raises(ConfigError, match="PEFT adapters"):
        vlmdistill.wrap(tiny_llama(seed=1), "kd", teacher="base")


def test_classifier_logits_and_per_sample_ce():
    from transformers import LlamaConfig, LlamaForSequenceClassification

    def clf(seed, hidden):
        torch.manual_seed(seed)
        cfg = LlamaConfig(vocab_size=64, hidden_size=hidden, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, num_labels=5, pad_token_id=0)
        return LlamaForSequenceClassification(cfg)

    student, teacher = clf(1, 32), clf(2, 48)
    ids = torch.randint(1, 64, (4, 7))
    labels = torch.tensor([0, 3, -100, 4])
    wrapped = vlmdistill.wrap(student, "kd", teacher=teacher, alpha=0.25, temperature=3.0)
    out = wrapped(input_ids=ids, labels=labels)
    s = student(input_ids=ids).logits
    t = teacher(input_ids=ids).logits
    rows = labels != -100
    ce = F.cross_entropy(s[rows], labels[rows])
    kd = reference_divergence(s[rows], t[rows], temperature=3.0).mean()
    torch.testing.assert_close(out.loss, 0.75 * ce + 0.25 * kd, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bad,match", [({"alpha": 1.5}, "alpha: 1.5 must be <= 1.0"),
                                       ({"alpha": "high"}, "expected a number"),
                                       ({"divergence": "kl"}, "not one of"),
                                       ({"features": [{"student": "a", "teacher": "b", "wieght": 1}]}, "weight")])
def test_config_values_are_checked(bad, match):
    with pytest.raises(ConfigError, match=match):
        vlmdistill.wrap(tiny_llama(seed=1), "kd", teacher=tiny_llama(seed=2), **bad)


def test_wrap_refuses_a_second_wrap_and_the_student_as_its_own_teacher():
    student = tiny_llama(seed=1)
    wrapped = vlmdistill.wrap(student, "kd", teacher=tiny_llama(seed=2))
    with pytest.raises(ConfigError, match="already wrapped"):
        vlmdistill.wrap(wrapped, "kd", teacher=tiny_llama(seed=2))
    with pytest.raises(ConfigError, match="student object itself"):
        vlmdistill.wrap(student, "kd", teacher=student)
    with pytest.raises(ConfigError, match="needs a teacher"):
        vlmdistill.wrap(tiny_llama(seed=3), "kd")
