"""FSDP2 runs of every plugin on 2 CPU ranks (gloo), launched once by tests/test_fsdp.py:

    torchrun --standalone --nproc_per_node 2 fsdp_worker.py OUT_DIR PLUGIN [PLUGIN ...]

Per plugin (its contract case, 3 optimizer steps on half of each global batch per rank), rank 0 writes to OUT_DIR:

* `equiv-<plugin>-<placement>.pt`: the gathered wrapper state (student, plugin parameters, EMA teachers, queues,
  centre, stage, step) and the logged terms after `vlmdistill.shard(model, teacher=placement)`, placement
  'replicate', 'shard' or 'offload' (CPU-offloaded teacher shards);
* `resume-<plugin>.pt`: a fresh sharded model and optimizer resumed from a DCP checkpoint (sharded model and
  optimizer state dicts, `torch.distributed.checkpoint.state_dict`) taken after step 1, then steps 2 and 3;
* `fullsd-<plugin>.pt`: DCP's full model state dict of the trained model, and the state of a fresh sharded model
  that loaded it back (`set_model_state_dict(full_state_dict=True, broadcast_from_rank0=True)`);
* `export-<plugin>/`: `save_pretrained` of the sharded model (gathered, written by rank 0);
* `accelerate-<plugin>.pt`: accelerate's own FSDP2 preparation (`fsdp2_prepare_model`, with the FSDP plugin the
  HF Trainer builds from `TrainingArguments(fsdp=True, fsdp_config={"version": 2, ...})`) and accelerate's
  checkpoint functions the Trainer calls for FSDP (`save_fsdp_model` / `save_fsdp_optimizer` and their loaders,
  sharded state dicts): the state after 3 steps uninterrupted, and after resuming a fresh prepared model at step 3.

accelerate turns FSDP on only for GPU-like devices, so the Trainer itself cannot run FSDP on a CPU; these runs call
the functions it would call, with real objects, on a real gloo process group. Its full-state-dict loader branches on
that device check (rank 0 alone would wait in the broadcast), so the full state dict is exercised through the DCP
calls accelerate makes for it (`get_model_state_dict` / `set_model_state_dict` with `broadcast_from_rank0`).
"""

import os
import sys

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_model_state_dict, set_state_dict)
from torch.distributed.fsdp import FSDPModule

sys.path.insert(0, os.path.dirname(__file__))
from sharded_training import build, optimizer_for, train_steps  # noqa: E402

from vlmdistill.distributed import full_state_dict, is_dtensor  # noqa: E402
from vlmdistill.sharding import block_classes, shard, shard_blocks  # noqa: E402

PLACEMENTS = ("replicate", "shard", "offload")
FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def save(out_dir: str, name: str, payload: dict) -> None:
    if dist.get_rank() == 0:
        torch.save(payload, os.path.join(out_dir, name))


def sharded(plugin: str, placement: str):
    case, wrapped = build(plugin)
    shard(wrapped, teacher=placement)
    return case, wrapped, optimizer_for(wrapped)


def equivalence(out_dir: str, plugin: str, placement: str, rank: int, world: int) -> None:
    case, wrapped, optimizer = sharded(plugin, placement)
    teacher = wrapped.teacher
    info = {"student_sharded": all(is_dtensor(p) for p in wrapped.parameters()),
            "teacher_sharded": teacher is not None and all(is_dtensor(p) for p in teacher.parameters())}
    if placement != "shard":
        train_steps(wrapped, wrapped, case, optimizer, range(3), rank=rank, world=world)
        save(out_dir, f"equiv-{plugin}-{placement}.pt", {"state": full_state_dict(wrapped),
                                                         "terms": wrapped.pop_logged_terms(), **info})
        return
    train_steps(wrapped, wrapped, case, optimizer, [0], rank=rank, world=world)
    info["state_dict_keys"] = sorted(wrapped.state_dict())  # the wrapper's own state dict, on DTensors
    model_state, optim_state = get_state_dict(wrapped, optimizer)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=os.path.join(out_dir, f"dcp-{plugin}"))
    train_steps(wrapped, wrapped, case, optimizer, [1, 2], rank=rank, world=world)
    terms = wrapped.pop_logged_terms()
    state = full_state_dict(wrapped)
    save(out_dir, f"equiv-{plugin}-{placement}.pt", {"state": state, "terms": terms, **info})

    full = get_model_state_dict(wrapped, options=FULL)  # on rank 0; {} elsewhere
    saved = dict(full)  # set_model_state_dict fills the dict it is given with the new shards
    _, fresh, _ = sharded(plugin, "shard")
    set_model_state_dict(fresh, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    save(out_dir, f"fullsd-{plugin}.pt", {"full": saved, "loaded": full_state_dict(fresh)})
    wrapped.save_pretrained(os.path.join(out_dir, f"export-{plugin}"))


def resume(out_dir: str, plugin: str, rank: int, world: int) -> None:
    case, wrapped, optimizer = sharded(plugin, "shard")
    model_state, optim_state = get_state_dict(wrapped, optimizer)
    checkpoint = {"model": model_state, "optim": optim_state}
    # Strict: DCP's optimizer template has a state for every trainable parameter, and so does the checkpoint, also
    # for the parameters a plugin holds still (dcclip's logit scale in stage 1, ccd's frozen prototypes): they
    # get no update but a fresh optimizer state (`frozen_parameters()`, vlmdistill.frozen).
    dcp.load(checkpoint, checkpoint_id=os.path.join(out_dir, f"dcp-{plugin}"))
    set_state_dict(wrapped, optimizer, model_state_dict=checkpoint["model"], optim_state_dict=checkpoint["optim"])
    train_steps(wrapped, wrapped, case, optimizer, [1, 2], rank=rank, world=world)
    save(out_dir, f"resume-{plugin}.pt", {"state": full_state_dict(wrapped)})


def accelerate_prepared(plugin: str, fsdp_plugin, accelerator):
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model

    case, wrapped = build(plugin)
    model = fsdp2_prepare_model(accelerator, wrapped)
    return case, model, optimizer_for(model)


def accelerate_path(out_dir: str, plugin: str, state_dict_type: str, rank: int, world: int) -> None:
    from accelerate import Accelerator
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import load_fsdp_model, load_fsdp_optimizer, save_fsdp_model, save_fsdp_optimizer
    from transformers import TrainingArguments

    args = TrainingArguments(output_dir=os.path.join(out_dir, "trainer"), use_cpu=True, report_to=[], fsdp=True,
                             fsdp_config={"version": 2, "state_dict_type": state_dict_type})
    fsdp_plugin = FullyShardedDataParallelPlugin(**args.fsdp_plugin_args)
    accelerator = Accelerator(cpu=True)
    accelerator.state.fsdp_plugin = fsdp_plugin  # what accelerate sets up on GPU-like devices only
    case, model, optimizer = accelerate_prepared(plugin, fsdp_plugin, accelerator)
    blocks = [m for m in model.student.modules() if isinstance(m, tuple(block_classes(model.student)))]
    layout = {"root": isinstance(model, FSDPModule), "blocks": len(blocks),
              "sharded_blocks": sum(isinstance(m, FSDPModule) for m in blocks)}
    train_steps(model, model, case, optimizer, range(3), rank=rank, world=world)
    after_three = {k: v.clone() for k, v in full_state_dict(model).items()}  # buffers come by reference
    # Checkpoint after step 3, resume for a 4th step (accelerate's optimizer loader builds its template with a
    # state for every trainable parameter; the DCP resume scenario covers a checkpoint taken in dcclip's stage 1).
    checkpoint = os.path.join(out_dir, f"accelerate-{plugin}")
    save_fsdp_model(fsdp_plugin, accelerator, model, checkpoint)
    save_fsdp_optimizer(fsdp_plugin, accelerator, optimizer, model, checkpoint)
    train_steps(model, model, case, optimizer, [3], rank=rank, world=world)
    uninterrupted = full_state_dict(model)

    case, fresh, fresh_optimizer = accelerate_prepared(plugin, fsdp_plugin, accelerator)
    load_fsdp_model(fsdp_plugin, accelerator, fresh, checkpoint)
    load_fsdp_optimizer(fsdp_plugin, accelerator, fresh_optimizer, fresh, checkpoint)
    train_steps(fresh, fresh, case, fresh_optimizer, [3], rank=rank, world=world)
    save(out_dir, f"accelerate-{plugin}.pt", {"state": after_three, "uninterrupted": uninterrupted,
                                              "resumed": full_state_dict(fresh), "layout": layout})


def sharded_before_wrap(out_dir: str, rank: int, world: int) -> None:
    """lingudistill on a student the user sharded (blocks and the student as root) before calling wrap()."""
    import vlmdistill
    from contract_cases import load_case

    case = load_case("lingudistill")
    torch.manual_seed(0)
    student = case.make_student()
    teacher = case.make_teacher(student)
    shard_blocks(student)
    wrapped = vlmdistill.wrap(student, plugin="lingudistill", teacher=teacher, config=dict(case.config))
    optimizer = optimizer_for(wrapped)
    train_steps(wrapped, wrapped, case, optimizer, range(3), rank=rank, world=world)
    save(out_dir, "prewrap-lingudistill.pt", {"state": full_state_dict(wrapped)})


def main(out_dir: str, plugins: list[str]) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        for plugin in plugins:
            for placement in PLACEMENTS:
                equivalence(out_dir, plugin, placement, rank, world)
            resume(out_dir, plugin, rank, world)
            accelerate_path(out_dir, plugin, "SHARDED_STATE_DICT", rank, world)
        if "lingudistill" in plugins:
            sharded_before_wrap(out_dir, rank, world)
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
