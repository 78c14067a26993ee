"""Stage 2 under DDP: embeddings gathered with gradient, so two gloo processes with half a batch each
get the gradient of one process with the whole batch (the generic DDP contract test covers stage 1); with a
ragged last batch (3 + 1 rows) as well, where an all-gather of unequal shapes used to fail or hang."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import vlmdistill
from vlmdistill.eval.tiny_models import tiny_hf_clip
from image_text_fixtures import token_batch


def _batch():
    g = torch.Generator().manual_seed(5)
    return {**token_batch(4, seed=3), "pixel_values": torch.randn(4, 3, 32, 32, generator=g)}


def _wrapped():
    torch.manual_seed(0)
    return vlmdistill.wrap(tiny_hf_clip(hidden=16, layers=1, seed=1), plugin="dcclip", stage=2)


def _worker(rank, world, init_file, out_path, first_rows):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        wrapped = _wrapped()
        model = torch.nn.parallel.DistributedDataParallel(wrapped)
        rows = slice(0, first_rows) if rank == 0 else slice(first_rows, 4)
        local = {k: v[rows] for k, v in _batch().items()}
        out = model(**local)
        out.loss.backward()
        if rank == 0:
            torch.save({"loss": out.loss.detach(), "grads": {n: p.grad.clone() for n, p in wrapped.named_parameters()
                                                             if p.grad is not None}}, out_path)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("first_rows", [2, 3], ids=["even", "ragged"])
def test_stage2_two_processes_equal_one_process_with_the_whole_batch(tmp_path, first_rows):
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "rank0.pt"), first_rows), nprocs=2, join=True)
    ddp = torch.load(tmp_path / "rank0.pt")
    single = _wrapped()
    out = single(**_batch())
    out.loss.backward()
    torch.testing.assert_close(ddp["loss"], out.loss.detach(), rtol=1e-5, atol=1e-6)
    grads = {n: p.grad for n, p in single.named_parameters() if p.grad is not None}
    assert grads.keys() == ddp["grads"].keys()
    for name, grad in grads.items():
        # Gradients here reach ~25; summation order differs between gather and one process: atol 1e-5.
        torch.testing.assert_close(ddp["grads"][name], grad, rtol=1e-4, atol=1e-5, msg=name)
    # Without the gather each rank would only see its own two pairs: a different loss.
    half = {k: v[:2] for k, v in _batch().items()}
    assert abs(float(_wrapped()(**half).loss.detach()) - float(ddp["loss"])) > 1e-3
