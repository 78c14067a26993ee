"""FSDP2 on 2 CPU ranks (gloo): every plugin trains like one process on the doubled batch, with the teacher
replicated, sharded like the student, or CPU-offloaded, and its checkpoints (DCP sharded and full state dicts,
accelerate's FSDP checkpoint functions the Trainer uses, `save_pretrained`) save and resume exactly.

One torchrun launch runs every scenario of tests/fsdp_worker.py (see there for what each covers and why the HF
Trainer itself is not run); the single-process references run here."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch
from sharded_training import assert_states_close, build, reference

import vlmdistill
from vlmdistill.io import PLUGIN_STATE_NAME, load_tensors

PLUGINS = vlmdistill.list_plugins()
PLACEMENTS = ("replicate", "shard", "offload")
WORKER = os.path.join(os.path.dirname(__file__), "fsdp_worker.py")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or shutil.which("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [torchrun, "--standalone", "--nproc_per_node", "2", WORKER, str(out), *PLUGINS]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1500)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return out


def load(runs, name):
    return torch.load(runs / name, weights_only=False)


@pytest.mark.slow
@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("plugin", PLUGINS)
def test_fsdp2_equals_one_process_on_the_doubled_batch(runs, plugin, placement):
    got = load(runs, f"equiv-{plugin}-{placement}.pt")
    _, state, terms = reference(plugin)
    assert got["student_sharded"], "every trainable parameter of the wrapper should be an FSDP2 shard"
    assert got["teacher_sharded"] == (placement != "replicate")
    # EMA teachers, queues, the DINO centre, the stage and plugin parameters are all in the wrapper's state
    assert_states_close(got["state"], state)
    assert got["terms"].keys() == terms.keys()
    for name, value in terms.items():  # logged terms are reduced over ranks: the one-process values
        assert got["terms"][name] == pytest.approx(value, rel=1e-5, abs=1e-7), name


@pytest.mark.slow
@pytest.mark.parametrize("plugin", PLUGINS)
def test_dcp_sharded_checkpoint_resumes_exactly(runs, plugin):
    uninterrupted = load(runs, f"equiv-{plugin}-shard.pt")
    resumed = load(runs, f"resume-{plugin}.pt")
    assert_states_close(resumed["state"], uninterrupted["state"], rtol=0, atol=1e-7)
    _, state, _ = reference(plugin)
    assert uninterrupted["state_dict_keys"] == sorted(state)  # wrapped.state_dict() works on DTensors


@pytest.mark.slow
@pytest.mark.parametrize("plugin", PLUGINS)
def test_dcp_full_state_dict_round_trip(runs, plugin):
    got = load(runs, f"fullsd-{plugin}.pt")
    _, state, _ = reference(plugin)
    assert_states_close(got["full"], state)
    assert_states_close(got["loaded"], got["full"], rtol=0, atol=0)


@pytest.mark.slow
@pytest.mark.parametrize("plugin", PLUGINS)
def test_save_pretrained_gathers_the_student_and_the_plugin_state(runs, plugin):
    export = runs / f"export-{plugin}"
    wrapped, state, _ = reference(plugin)
    student_state = {k[len("student."):]: v for k, v in state.items() if k.startswith("student.")}
    plugin_state = {k[len("plugin."):]: v for k, v in state.items() if k.startswith("plugin.")}
    # plain transformers reads the student; the plugin file holds the plugin state (EMA, queues), nothing else
    plain = type(wrapped.student).from_pretrained(export)
    plain_state = plain.state_dict()
    for key, value in student_state.items():
        torch.testing.assert_close(plain_state[key], value.reshape(plain_state[key].shape), rtol=1e-4, atol=1e-6,
                                   msg=key)
    assert_states_close(load_tensors(str(export / PLUGIN_STATE_NAME)), plugin_state)
    # and the folder resumes in one process
    case, fresh = build(plugin)
    teacher = None if fresh.plugin.teacher_policy == "none" else fresh.teacher
    resumed = vlmdistill.load(str(export), model=vlmdistill.unwrap(fresh), teacher=teacher, **case.runtime)
    assert_states_close(resumed.state_dict(), state)


@pytest.mark.slow
@pytest.mark.parametrize("plugin", PLUGINS)
def test_accelerate_fsdp2_preparation_and_trainer_checkpoints(runs, plugin):
    got = load(runs, f"accelerate-{plugin}.pt")
    layout = got["layout"]
    # accelerate's auto-wrap policy, through the wrapper: every student block its own unit, the wrapper the root
    assert layout["root"] and layout["blocks"] > 0 and layout["sharded_blocks"] == layout["blocks"]
    _, state, _ = reference(plugin)
    assert_states_close(got["state"], state)
    assert_states_close(got["resumed"], got["uninterrupted"], rtol=0, atol=1e-7)


@pytest.mark.slow
def test_lingudistill_student_sharded_before_wrap(runs):
    got = load(runs, "prewrap-lingudistill.pt")
    _, state, _ = reference("lingudistill")
    assert_states_close(got["state"], state)
