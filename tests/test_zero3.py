"""DeepSpeed ZeRO-3 on 2 CPU ranks (DeepSpeed's CPU accelerator, gloo): every plugin trains through the engine like
one process on the doubled batch, with the teacher replicated or partitioned too (EMA teachers replicated, updated
from the gathered student), and `save_pretrained` writes the gathered weights, never the empty partitions.

Parameters without a gradient in a step must not move (ZeRO-3 steps them with a zero gradient): ccd crosses its
prototype freeze (step 0) and the switch to predicted masks (the ViT's final norm unused from step 2), dcclip its
stage switch (adapters idle from step 2, logit scales before), so their equality tests `vlmdistill/frozen.py`.

The EMA teacher under ZeRO-3 (msd) is held against the float64 EMA of the one-process student's weights, and
its update is seen to read the student gathered, a few parameters at a time.

The HF Trainer runs ZeRO-3 on CPUs as a user without GPUs would set it up: `TrainingArguments(deepspeed=
zero3_config(...), accelerator_config=cpu_accelerator_state())` under torchrun (without the accelerator state,
accelerate counts one process where DeepSpeed has two and the Trainer's batch-size check fails before training;
see `vlmdistill.zero3.cpu_accelerator_state`). A run interrupted by a checkpoint at step 2 (DeepSpeed's partitioned
checkpoint, which the Trainer resumes from, and the gathered `model.safetensors`) resumes to step 4 equal to the
uninterrupted run, weights, optimizer and plugin state (msd's EMA teacher and queues) alike.

One torchrun launch runs tests/zero3_worker.py. DeepSpeed builds its CPU communication op on first use (cached in
the torch extensions folder afterwards)."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys

import pytest
import torch
from sharded_training import assert_states_close, build, max_abs_diff, optimizer_for, reference, train_steps

import vlmdistill
from vlmdistill.io import PLUGIN_STATE_NAME, load_tensors

PLUGINS = vlmdistill.list_plugins()
WORKER = os.path.join(os.path.dirname(__file__), "zero3_worker.py")
TRAINER_PLUGINS = ("kd", "msd")  # as in the worker
pytestmark = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                reason="needs the [deepspeed] extra (make install has it)")


def _placements(plugin):
    return ["replicate"] if vlmdistill.get_plugin(plugin).teacher_policy == "none" else ["replicate", "partition"]


CASES = [(plugin, placement) for plugin in PLUGINS for placement in _placements(plugin)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("zero3")
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or shutil.which("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [torchrun, "--standalone", "--nproc_per_node", "2", WORKER, str(out), *PLUGINS]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("plugin,placement", CASES)
def test_zero3_equals_one_process_on_the_doubled_batch(runs, plugin, placement):
    got = torch.load(runs / f"engine-{plugin}-{placement}.pt", weights_only=False)
    _, state, terms = reference(plugin)
    assert got["student_partitioned"], "every parameter of the wrapper should be a ZeRO-3 partition"
    assert got["teacher_partitioned"] == (placement == "partition")
    assert_states_close(got["state"], state)  # EMA teachers, queues, centre, stage, plugin parameters included
    assert got["terms"].keys() == terms.keys()
    for name, value in terms.items():
        assert got["terms"][name] == pytest.approx(value, rel=1e-5, abs=1e-7), name


@pytest.mark.slow
@pytest.mark.parametrize("plugin", PLUGINS)
def test_zero3_save_pretrained_writes_the_gathered_weights(runs, plugin):
    got = torch.load(runs / f"engine-{plugin}-replicate.pt", weights_only=False)
    assert got["raw_student_empty"], "the partitioned student's own state dict should be empty placeholders"
    wrapped, state, _ = reference(plugin)
    export = runs / f"export-{plugin}"
    plain = type(wrapped.student).from_pretrained(export).state_dict()
    for key, value in state.items():
        if key.startswith("student."):
            name = key[len("student."):]
            torch.testing.assert_close(plain[name], value.reshape(plain[name].shape), rtol=1e-4, atol=1e-6, msg=name)
    plugin_state = {k[len("plugin."):]: v for k, v in state.items() if k.startswith("plugin.")}
    assert_states_close(load_tensors(str(export / PLUGIN_STATE_NAME)), plugin_state)


@pytest.mark.slow
def test_zero3_ema_teacher_is_the_float64_ema_of_the_one_process_student(runs):
    got = torch.load(runs / "engine-msd-replicate.pt", weights_only=False)
    prefix = "plugin.hidden.teacher."
    ema = {k[len(prefix):]: v for k, v in got["state"].items() if k.startswith(prefix)}
    # the reference: the one-process student after each optimizer step, averaged in float64 (teacher starts as it)
    case, wrapped = build("msd")
    optimizer, momentum = optimizer_for(wrapped), wrapped.plugin.config.momentum
    names = [n for n, _ in wrapped.student.named_parameters()]
    want = {n: p.detach().double().clone() for n, p in wrapped.student.named_parameters()}
    for step in range(3):
        train_steps(wrapped, wrapped, case, optimizer, [step])
        for n, p in wrapped.student.named_parameters():
            want[n] = momentum * want[n] + (1 - momentum) * p.detach().double()
    student = {n: p.detach() for n, p in wrapped.student.named_parameters()}
    assert max_abs_diff(student, want) > 1e-3, "the EMA should lag the student (else this test shows nothing)"
    for name in names:
        torch.testing.assert_close(ema[name].double().reshape(want[name].shape), want[name], rtol=1e-4, atol=1e-6,
                                   msg=name)
    # every update read the student's ZeRO-3 partitions gathered, in pieces of at most gather_numel elements (or
    # one larger parameter), each parameter once per update, and left them partitioned again
    reads = torch.load(runs / "ema-msd.pt", weights_only=False)
    lerps = [r for r in reads["lerps"] if r["zero3"]]
    assert reads["after"] == [True] * 3
    assert all(r["gathered"] for r in lerps)
    assert all(r["numel"] <= reads["gather_numel"] or r["zero3"] == 1 for r in lerps)
    assert len(lerps) > 3 and sum(r["zero3"] for r in lerps) == 3 * len(names)
    assert sum(r["numel"] for r in lerps) == 3 * sum(p.numel() for p in wrapped.student.parameters())


@pytest.mark.slow
@pytest.mark.parametrize("plugin", TRAINER_PLUGINS)
def test_trainer_zero3_checkpoint_resumes_exactly(runs, plugin):
    got = torch.load(runs / f"trainer-{plugin}.pt", weights_only=False)
    _, state, _ = reference(plugin)
    assert got["student_partitioned"]
    assert "global_step2" in got["checkpoint_files"]  # DeepSpeed's checkpoint: partitions and optimizer state
    # the resumed run made only the 2 steps after the checkpoint (2 micro-batches each), and counts on from there
    assert got["resumed_forwards"] == 2 * 2
    assert got["resumed_global_step"] == got["trainer_global_step"] == 4
    assert sorted(got["resumed"]) == sorted(state)  # the whole wrapper state: student, plugin, plugin.hidden.*
    assert max_abs_diff(got["interrupted"], got["uninterrupted"]) > 1e-4  # steps 3-4 moved it
    assert_states_close(got["resumed"], got["uninterrupted"], rtol=0, atol=1e-7)
    if plugin == "msd":  # the EMA teacher and the queues moved too, and resumed exactly
        hidden = [k for k in state if k.startswith("plugin.hidden.")]
        teacher = [k for k in hidden if k.startswith("plugin.hidden.teacher.")]
        assert teacher and len(hidden) > len(teacher)
        for keys in (teacher, sorted(set(hidden) - set(teacher))):
            moved = max_abs_diff({k: got["interrupted"][k] for k in keys}, {k: got["uninterrupted"][k] for k in keys})
            assert moved > 1e-4, keys[:3]
    # the checkpoint's model.safetensors is the wrapper's gathered state at step 2 (what it is without DeepSpeed)
    assert_states_close(got["checkpoint_model"], got["interrupted"], rtol=0, atol=0)


@pytest.mark.slow
def test_plain_trainer_under_deepspeed_is_refused_naming_the_fix(runs):
    message = (runs / "trainer-plain-refused.txt").read_text()
    assert "DistillationTrainer" in message and "DistillationTrainerMixin" in message


def test_save_pretrained_refuses_empty_partitions(tmp_path):
    """What a ZeRO-3 student's own state dict holds outside a gather: never written silently."""
    from contract_cases import load_case

    case = load_case("kd")
    student = case.make_student()
    wrapped = vlmdistill.wrap(student, plugin="kd", teacher=case.make_teacher(student), config=dict(case.config))
    placeholders = {k: torch.empty(0) for k in wrapped.state_dict()}
    with pytest.raises(RuntimeError, match="partitioned"):
        wrapped.save_pretrained(str(tmp_path / "out"), state_dict=placeholders)
