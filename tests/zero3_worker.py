"""DeepSpeed ZeRO-3 runs of every plugin on 2 CPU ranks (DeepSpeed's CPU accelerator, gloo), launched once by
tests/test_zero3.py:

    torchrun --standalone --nproc_per_node 2 zero3_worker.py OUT_DIR PLUGIN [PLUGIN ...]

Per plugin (its contract case, 3 optimizer steps on half of each global batch per rank), rank 0 writes to OUT_DIR:

* `engine-<plugin>-<placement>.pt`: the wrapper partitioned by `deepspeed.initialize` (the student and the plugin's
  parameters; every tensor of more than one element partitioned), trained through the engine; the gathered state
  and the logged terms. Placement 'replicate' (a full teacher per rank; EMA teachers updated from the gathered
  student) or 'partition' (the external teacher partitioned too, `vlmdistill.zero3.partition_teacher`);
* `export-<plugin>/`: `save_pretrained` of the partitioned model (gathered module by module, written by rank 0),
  and whether the raw student state dict was empty (what a plain save would silently write).
"""

import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))
from sharded_training import build, optimizer_for, train_steps  # noqa: E402

import vlmdistill  # noqa: E402
from vlmdistill.distributed import full_state_dict, is_zero3  # noqa: E402

# Parameters of one element stay whole on every rank, as DeepSpeed's default threshold (1e5 elements) keeps every
# small tensor: everything else of these tiny models is partitioned. DeepSpeed clips gradients at norm 1.0 unless
# told otherwise (the Trainer passes its max_grad_norm): the reference does not clip.
ENGINE_CONFIG = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "gradient_clipping": 0.0,
                 "zero_allow_untested_optimizer": True,
                 "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 2}}


def save(out_dir: str, name: str, payload: dict) -> None:
    if dist.get_rank() == 0:
        torch.save(payload, os.path.join(out_dir, name))


def engine_run(out_dir: str, plugin: str, placement: str, rank: int, world: int) -> None:
    import deepspeed

    from vlmdistill.zero3 import partition_teacher

    case, wrapped = build(plugin)
    if placement == "partition":
        partition_teacher(wrapped, config={"zero_optimization": {"stage3_param_persistence_threshold": 2}})
    engine, *_ = deepspeed.initialize(model=wrapped, optimizer=optimizer_for(wrapped), config=ENGINE_CONFIG)
    teacher = wrapped.teacher
    info = {"student_partitioned": all(is_zero3(p) for p in wrapped.parameters()),
            "teacher_partitioned": teacher is not None and all(is_zero3(p) for p in teacher.parameters()),
            "raw_student_empty": any(v.numel() == 0 for v in wrapped.student.state_dict().values())}
    train_steps(engine, wrapped, case, None, range(3), rank=rank, world=world)
    terms = wrapped.pop_logged_terms()
    save(out_dir, f"engine-{plugin}-{placement}.pt", {"state": full_state_dict(wrapped), "terms": terms, **info})
    if placement == "replicate":
        wrapped.save_pretrained(os.path.join(out_dir, f"export-{plugin}"))


def main(out_dir: str, plugins: list[str]) -> None:
    import deepspeed

    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    for plugin in plugins:
        own_teacher = vlmdistill.get_plugin(plugin).teacher_policy == "none"  # EMA teachers stay replicated
        placements = ["replicate"] if own_teacher else ["replicate", "partition"]
        for placement in placements:
            engine_run(out_dir, plugin, placement, rank, world)
    dist.barrier()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
