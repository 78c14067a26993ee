"""Run one distillation step of a plugin's contract case under accelerate DDP (2 CPU processes).

Launched by tests/test_ddp.py as `accelerate launch --multi_gpu --num_processes 2 ddp_worker.py PLUGIN OUT`
(torchrun-style processes; `Accelerator(cpu=True)` makes them a gloo group).
Each process takes its half of a fixed batch; rank 0 saves the gradients and updated parameters.
"""

import os
import sys

import torch
from accelerate import Accelerator, DistributedDataParallelKwargs
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, os.path.dirname(__file__))
from contract_cases import load_case  # noqa: E402

import vlmdistill  # noqa: E402


def main(plugin: str, out_path: str) -> None:
    # As the Trainer sets it for a wrapper (not a PreTrainedModel): stages may leave parameters without gradient.
    accelerator = Accelerator(cpu=True, kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
    rank, world = accelerator.process_index, accelerator.num_processes
    case = load_case(plugin)
    torch.manual_seed(0)
    student = case.make_student()
    wrapped = vlmdistill.wrap(student, plugin=plugin, teacher=case.make_teacher(student), config=dict(case.config),
                              **case.runtime)
    optimizer = torch.optim.SGD([p for p in wrapped.parameters() if p.requires_grad], lr=0.1)
    model, optimizer = accelerator.prepare(wrapped, optimizer)
    assert isinstance(model, DistributedDataParallel), type(model)
    teacher = wrapped.teacher
    if not wrapped.plugin.teacher_is_student_base:
        assert not isinstance(teacher, DistributedDataParallel)
        ddp_params = {p.data_ptr() for p in model.parameters()}
        assert not ddp_params & {p.data_ptr() for p in teacher.parameters()}, "teacher parameters under DDP"

    big = case.batch(4, seed=7)
    per = 4 // world
    local = {k: v[rank * per:(rank + 1) * per] for k, v in big.items()}
    model.train()
    wrapped.plugin.on_accumulation_window([local])
    num_items = case.num_items([big])  # the Trainer gathers the window's count across processes
    out = model(**local, num_items_in_batch=num_items)
    # As the Trainer does: a count-normalised loss is multiplied by the world size (DDP averages grads).
    loss = out.loss * world if num_items is not None else out.loss
    accelerator.backward(loss)
    grads = {n: p.grad.clone() for n, p in wrapped.named_parameters() if p.grad is not None}
    optimizer.step()
    vlmdistill.step_end(model)
    terms = wrapped.pop_logged_terms()  # a collective: reduced over the ranks
    if rank == 0:
        params = {n: p.detach().clone() for n, p in wrapped.named_parameters()}
        torch.save({"grads": grads, "params": params, "global_step": int(wrapped.plugin.global_step),
                    "terms": terms}, out_path)
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
