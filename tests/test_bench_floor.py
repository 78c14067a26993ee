"""The FLOP counts behind the floors the step benchmarks print: against torch's FLOP counter on the same models
(eager attention, whose matrix products the counter sees), and the teacher's needed work against what the
lingudistill plugin actually runs."""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import vlmdistill
from vlmdistill.eval.bench import floor as flops
from vlmdistill.eval.bench.presets import get_preset, make_batch, shared_token_ids, smolvlm_student, text_teacher
from vlmdistill.plugins.lingudistill.two_source import PackedAttention


def _counted(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def _eager(model):
    model.set_attn_implementation("eager")
    return model


def _full_pairs(model, batch, images):
    """The analytic count with attention over every (query, key) pair, as eager attention computes it."""
    b, t = batch["input_ids"].shape
    text = model.config.get_text_config()
    return flops.vision_tower(model.config, images) + flops.decoder(text, tokens=b * t, pairs=b * t * t,
                                                                    head_rows=b * t)


def test_vlm_forward_and_training_flops_equal_the_counter():
    preset = get_preset("tiny")
    student = _eager(smolvlm_student(preset))
    batch = make_batch(preset)
    images = sum(preset.images_per_row)
    analytic = _full_pairs(student, batch, images)
    with torch.no_grad():
        assert _counted(lambda: student(**batch)) == analytic.forward
    assert _counted(lambda: student(**batch).loss.backward()) == analytic.training
    assert analytic.matmul_no_input_grad > 0  # the patch embedding: no gradient for the pixels


def test_llava_and_text_decoder_flops_equal_the_counter():
    from vlmdistill.eval.bench import bench_lingudistill

    args = bench_lingudistill.parse_args(["--layers", "2", "--hidden", "64", "--heads", "4", "--kv-heads", "2",
                                          "--vocab", "256", "--batch", "2", "--seq", "36"])
    setup = bench_lingudistill.build(args, torch.device("cpu"), torch.float32)
    student, teacher, batch = _eager(setup.student), _eager(setup.teacher), setup.batch
    with torch.no_grad():
        assert _counted(lambda: student(**batch)) == _full_pairs(student, batch, setup.images).forward
        b, t = batch["input_ids"].shape
        lm = flops.decoder(teacher.config, tokens=b * t, pairs=b * t * t, head_rows=b * t)
        text_ids = batch["input_ids"].clamp(max=teacher.config.vocab_size - 1)  # the image id is the student's
        assert _counted(lambda: teacher(input_ids=text_ids)) == lm.forward


def test_lingudistill_teacher_needs_are_what_the_plugin_runs():
    """From the batch alone: the teacher's tokens, visible pairs and head rows; the plugin's packed pass queries
    exactly those tokens and its attention masks admit exactly those pairs (no padding, no wasted query)."""
    preset = get_preset("tiny")
    student, teacher = smolvlm_student(preset), text_teacher(preset)
    batch = make_batch(preset)
    shared = shared_token_ids(preset) + [preset.image_token_id]
    need = flops.lingudistill_teacher_needs(batch, shared, preset.teacher_vocab)
    wrapped = vlmdistill.wrap(student, plugin="lingudistill", teacher=teacher, trust_vocab_prefix=True,
                              extra_shared_token_ids=shared_token_ids(preset))
    plan = wrapped.plugin.plan(batch, {})
    layout = plan.state.layout
    assert layout.num_queries == need["tokens"] and layout.num_distilled == need["head_rows"]
    blocks = PackedAttention(layout, "cpu", full_length=False).blocks()
    assert sum(int(block.allowed.sum()) for block in blocks) == need["pairs"]
    assert need["head_rows"] == 2 * preset.supervised


def test_floor_is_one_plus_teacher_over_student_training():
    student = flops.Flops(matmul=300.0, attention=30.0, matmul_no_input_grad=30.0)
    teacher = flops.Flops(matmul=90.0, attention=9.0)
    assert student.training == 3 * 330 - 30
    assert flops.step_floor(teacher, student) == 1 + 99 / 960
    assert flops.causal_pairs([3, 2]) == 6 + 3


@pytest.mark.slow
def test_preset_benchmarks_report_floor_and_memory_per_arm(tmp_path, capsys):
    """The real-size code path at the tiny preset, peak resident memory of one subprocess per arm included."""
    from vlmdistill.eval.bench import bench_kd, bench_lingudistill

    assert bench_lingudistill.main(["--preset", "tiny", "--steps", "1", "--warmup", "0", "--threads", "1",
                                    "--teacher-pass", "--breakdown", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "results.json").read_text())
    assert set(result["rss"]) == {"plain", "torch"} and result["rss"]["torch"]["peak"] > 0
    assert result["teacher_pass"]["cpu"]["n"] == 1
    phases = result["breakdown"]
    assert set(phases["plain"]) == {"student forward", "backward", "optimizer"}
    assert set(phases["lingudistill"]) == set(bench_lingudistill.PHASES) and phases["lingudistill"]["teacher pass"] > 0
    assert bench_kd.main(["--preset", "tiny", "--steps", "1", "--warmup", "0", "--memory",
                          "--out", str(tmp_path / "kd")]) == 0
    kd = json.loads((tmp_path / "kd" / "results.json").read_text())
    assert "floor from the shapes" in (tmp_path / "kd" / "results.md").read_text()
    assert set(kd["rss"]) == {"plain", "kd"} and kd["floor"]["floor"] > 1.0
    out = capsys.readouterr().out
    assert "floor from the shapes" in out and "resident memory" in out and "| teacher pass |" in out
