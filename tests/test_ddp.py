"""Contract point 7: two CPU processes under accelerate (gloo DDP) equal one process with the doubled batch."""

import os
import shutil
import subprocess
import sys

import pytest
import torch
from contract_cases import load_case

import vlmdistill

PLUGINS = vlmdistill.list_plugins()
WORKER = os.path.join(os.path.dirname(__file__), "ddp_worker.py")


def _single_process(plugin):
    case = load_case(plugin)
    torch.manual_seed(0)
    student = case.make_student()
    wrapped = vlmdistill.wrap(student, plugin=plugin, teacher=case.make_teacher(student), config=dict(case.config),
                              **case.runtime)
    optimizer = torch.optim.SGD([p for p in wrapped.parameters() if p.requires_grad], lr=0.1)
    big = case.batch(4, seed=7)
    wrapped.train()
    wrapped.plugin.on_accumulation_window([big])
    out = wrapped(**big, num_items_in_batch=case.num_items([big]))
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in wrapped.named_parameters() if p.grad is not None}
    optimizer.step()
    wrapped.step_end()
    return grads, {n: p.detach().clone() for n, p in wrapped.named_parameters()}, wrapped.pop_logged_terms()


@pytest.mark.slow
@pytest.mark.parametrize("plugin", PLUGINS)
def test_two_process_ddp_equals_doubled_batch(plugin, tmp_path):
    accelerate = shutil.which("accelerate", path=os.path.dirname(sys.executable)) or shutil.which("accelerate")
    out = tmp_path / "rank0.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no",
           "--dynamo_backend", "no", "--main_process_port", "0", WORKER, plugin, str(out)]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    ddp = torch.load(out)
    grads, params, terms = _single_process(plugin)
    assert ddp["global_step"] == 1
    # logged terms are reduced over the ranks: what one process logs for the whole batch
    assert ddp["terms"].keys() == terms.keys()
    for name, value in terms.items():
        assert ddp["terms"][name] == pytest.approx(value, rel=1e-5, abs=1e-7), name
    assert grads.keys() == ddp["grads"].keys()
    for name in grads:
        torch.testing.assert_close(ddp["grads"][name], grads[name], rtol=1e-4, atol=1e-6, msg=name)
    for name in params:
        torch.testing.assert_close(ddp["params"][name], params[name], rtol=1e-4, atol=1e-6, msg=name)
