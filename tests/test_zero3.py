"""DeepSpeed ZeRO-3 on 2 CPU ranks (DeepSpeed's CPU accelerator, gloo): every plugin trains through the engine like
one process on the doubled batch, with the teacher replicated or partitioned too (EMA teachers replicated, updated
from the gathered student), and `save_pretrained` writes the gathered weights, never the empty partitions.

Parameters without a gradient in a step must not move (ZeRO-3 steps them with a zero gradient): ccd crosses its
prototype freeze (step 0) and the switch to predicted masks (the ViT's final norm unused from step 2), dcclip its
stage switch (adapters idle from step 2, logit scales before), so their equality tests `vlmdistill/frozen.py`.

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
from sharded_training import assert_states_close, reference

import vlmdistill
from vlmdistill.io import PLUGIN_STATE_NAME, load_tensors

PLUGINS = vlmdistill.list_plugins()
WORKER = os.path.join(os.path.dirname(__file__), "zero3_worker.py")
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


def test_save_pretrained_refuses_empty_partitions(tmp_path):
    """What a ZeRO-3 student's own state dict holds outside a gather: never written silently."""
    from contract_cases import load_case

    case = load_case("kd")
    student = case.make_student()
    wrapped = vlmdistill.wrap(student, plugin="kd", teacher=case.make_teacher(student), config=dict(case.config))
    placeholders = {k: torch.empty(0) for k in wrapped.state_dict()}
    with pytest.raises(RuntimeError, match="partitioned"):
        wrapped.save_pretrained(str(tmp_path / "out"), state_dict=placeholders)
