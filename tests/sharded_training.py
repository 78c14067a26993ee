"""The training run the sharded tests repeat: each plugin's contract case, a global batch of 4 per optimizer step,
split across the ranks; one process with the whole batch is the reference."""

from __future__ import annotations

import functools

import torch
from contract_cases import load_case

import vlmdistill

GLOBAL_BATCH = 4
# as the DDP test: the ranks' gradients are averaged in another order than one process sums them
RTOL, ATOL = 1e-4, 1e-6


def build(plugin: str):
    """(case, wrapper), built the same way on every rank (same seeds)."""
    case = load_case(plugin)
    torch.manual_seed(0)
    student = case.make_student()
    wrapped = vlmdistill.wrap(student, plugin=plugin, teacher=case.make_teacher(student), config=dict(case.config),
                              **case.runtime)
    return case, wrapped


def optimizer_for(model: torch.nn.Module) -> torch.optim.Optimizer:
    # Momentum gives the optimizer a state that a resumed run must restore; SGD keeps the update linear in the
    # gradient, so the rank-order rounding of averaged gradients stays at the rounding level.
    return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9)


def global_batch(case, step: int) -> dict:
    return case.batch(GLOBAL_BATCH, seed=7 + step)


def train_steps(model, wrapped, case, optimizer, steps, *, rank: int = 0, world: int = 1) -> list[float]:
    """Optimizer steps `steps` (an iterable of step indices) on this rank's rows of each global batch, the loss
    normalised as the Trainer does. `model` is the wrapper, its FSDP2 form, or a DeepSpeed engine (which then
    does backward and step; `optimizer` is None). Returns this rank's losses."""
    per = GLOBAL_BATCH // world
    model.train()
    losses = []
    for step in steps:
        big = global_batch(case, step)
        local = {k: v[rank * per:(rank + 1) * per] for k, v in big.items()}
        wrapped.plugin.on_accumulation_window([local])
        num_items = case.num_items([big])  # the Trainer gathers the window's count across processes
        out = model(**local, num_items_in_batch=num_items)
        # As the Trainer does: a count-normalised loss is multiplied by the world size (gradients are averaged).
        loss = out.loss * world if num_items is not None else out.loss
        if optimizer is None:  # a DeepSpeed engine
            model.backward(loss)
            model.step()
        else:
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        vlmdistill.step_end(model)
        losses.append(float(out.loss.detach()))
    return losses


@functools.cache
def reference(plugin: str):
    """One process, the whole global batch, the same 3 optimizer steps."""
    case, wrapped = build(plugin)
    train_steps(wrapped, wrapped, case, optimizer_for(wrapped), range(3))
    return wrapped, {k: v.detach().clone() for k, v in wrapped.state_dict().items()}, wrapped.pop_logged_terms()


def max_abs_diff(got: dict, want: dict) -> float:
    return max((float((got[k].double() - want[k].double()).abs().max()) for k in want
                if want[k].is_floating_point() and want[k].numel()), default=0.0)


def assert_states_close(got: dict, want: dict, rtol=RTOL, atol=ATOL) -> None:
    assert sorted(got) == sorted(want)
    for key, value in want.items():
        other = got[key]
        if {tuple(value.shape), tuple(other.shape)} == {(), (1,)}:
            # a 0-dim parameter (CLIP's logit_scale) is a 1-element shard: DCP's full state dict keeps that shape
            value, other = value.reshape(1), other.reshape(1)
        torch.testing.assert_close(other, value, rtol=rtol, atol=atol, msg=key)
