"""Two gloo processes with different local batch sizes equal one process with the whole batch (keys all-gathered,
rows weighted by M·W/B, gradients averaged as DDP does)."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from contract_cases.msd import collate, examples, tiny_clip

import vlmdistill

CONFIG = dict(alpha=0.4, alpha_warmup_steps=0, momentum=0.8, queue_size=8)
SPLIT = (3, 1)   # rows of rank 0 and rank 1


def _gradients(wrapped, batches):
    wrapped.train()
    wrapped.plugin.on_accumulation_window(batches)
    for batch in batches:
        (wrapped(**batch).loss / len(batches)).backward()
    return {n: p.grad for n, p in wrapped.named_parameters() if p.grad is not None}


def _worker(rank, store, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        torch.manual_seed(rank)   # different students on purpose: the teachers must still agree
        student = tiny_clip(seed=1 + rank)
        wrapped = vlmdistill.wrap(student, plugin="msd", **CONFIG)
        reference = tiny_clip(seed=1)   # rank 0's weights, as DDP would broadcast them
        student.load_state_dict(reference.state_dict())
        big = collate(examples(4, 7))
        start = sum(SPLIT[:rank])
        local = {k: v[start:start + SPLIT[rank]] for k, v in big.items()}
        grads = _gradients(wrapped, [local])
        for grad in grads.values():
            dist.all_reduce(grad)
            grad /= 2
        if rank == 0:
            torch.save({k: v.clone() for k, v in grads.items()}, out)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_uneven_processes_equal_the_whole_batch(tmp_path):
    out = tmp_path / "grads.pt"
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_worker, args=(str(tmp_path / "store"), str(out)), nprocs=2, join=True)
    ddp = torch.load(out)
    torch.manual_seed(0)
    single = vlmdistill.wrap(tiny_clip(seed=1), plugin="msd", **CONFIG)
    grads = _gradients(single, [collate(examples(4, 7))])
    assert grads.keys() == ddp.keys()
    for name in grads:
        torch.testing.assert_close(ddp[name], grads[name], rtol=1e-4, atol=1e-6, msg=name)
