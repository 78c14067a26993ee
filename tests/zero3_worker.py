"""DeepSpeed ZeRO-3 runs of every plugin on 2 CPU ranks (DeepSpeed's CPU accelerator, gloo), launched once by
tests/test_zero3.py:

    torchrun --standalone --nproc_per_node 2 zero3_worker.py OUT_DIR PLUGIN [PLUGIN ...]

Per plugin (its contract case, 3 optimizer steps on half of each global batch per rank), rank 0 writes to OUT_DIR:

* `engine-<plugin>-<placement>.pt`: the wrapper partitioned by `deepspeed.initialize` (the student and the plugin's
  parameters; every tensor of more than one element partitioned), trained through the engine; the gathered state
  and the logged terms. Placement 'replicate' (a full teacher per rank; EMA teachers updated from the gathered
  student) or 'partition' (the external teacher partitioned too, `vlmdistill.zero3.partition_teacher`);
* `export-<plugin>/`: `save_pretrained` of the partitioned model (gathered module by module, written by rank 0),
  and whether the raw student state dict was empty (what a plain save would silently write);
* `ema-msd.pt` (from the msd 'replicate' run): what the EMA teacher's update saw of the student: per fused
  update, whether every ZeRO-3 student parameter it read was gathered (full size), how many elements it read at
  once, and whether every parameter was a partition again after the update.

Then the HF Trainer under ZeRO-3 (`TrainingArguments(deepspeed=zero3_config(...))`, DeepSpeed's CPU accelerator,
accelerate's state from `vlmdistill.zero3.cpu_accelerator_state`), for each plugin named in TRAINER_PLUGINS:
`trainer-<plugin>.pt`: the gathered wrapper state after 4 optimizer steps run at once, after 2 steps with a
checkpoint at step 2 (and that checkpoint's `model.safetensors`), and after resuming that checkpoint to step 4 (with
the number of forwards the resumed run made); and `trainer-plain-refused.txt`: the error a plain Trainer (with
`DistillationCallback`) gets under DeepSpeed.
"""

import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))
from sharded_training import build, optimizer_for, train_steps  # noqa: E402
from trainer_data import ExampleList  # noqa: E402

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


class EMAReads:
    """Records what `EMATeacher` reads of the ZeRO-3 student during each update (its class methods wrapped)."""

    NAMES = ("_lerp", "update", "gather_numel")

    def __init__(self, gather_numel: int) -> None:
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

        from vlmdistill.teachers import EMATeacher

        self.gather_numel = gather_numel
        self.lerps: list[dict] = []  # one per fused lerp: the ZeRO-3 student parameters it read
        self.after: list[bool] = []  # one per update: every partitioned parameter released again
        self._saved = {name: EMATeacher.__dict__[name] for name in self.NAMES}
        lerp, update = EMATeacher._lerp, EMATeacher.update

        def recording_lerp(pairs, weight):
            read = [s for _, s in pairs if is_zero3(s)]
            self.lerps.append({"zero3": len(read), "numel": sum(int(s.ds_numel) for s in read),
                               "gathered": all(s.ds_status == ZeroParamStatus.AVAILABLE and s.numel() == s.ds_numel
                                               for s in read)})
            return lerp(pairs, weight)

        def recording_update(ema, momentum):
            update(ema, momentum)
            self.after.append(all(p.ds_status == ZeroParamStatus.NOT_AVAILABLE for p in ema.source.parameters()
                                  if not p.ds_persist))

        EMATeacher._lerp, EMATeacher.update = staticmethod(recording_lerp), recording_update
        EMATeacher.gather_numel = gather_numel  # small: the update gathers the student in several pieces

    def restore(self) -> None:
        from vlmdistill.teachers import EMATeacher

        for name, value in self._saved.items():
            setattr(EMATeacher, name, value)


# ---------------------------------------------------------------------------------------------- HF Trainer
TRAINER_PLUGINS = ("kd", "msd")  # kd: an external teacher; msd: an EMA teacher and key queues in the plugin state
TRAINER_STEPS, CHECKPOINT_STEP = 4, 2


def trainer_for(out_dir: str, plugin: str, max_steps: int, *, save: bool, trainer_class=None):
    from transformers import TrainingArguments
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    from vlmdistill.zero3 import cpu_accelerator_state, zero3_config

    # The last run's TrainingArguments may still be alive (reference cycles): while they are, transformers builds
    # models partitioned (zero.Init), which an EMA teacher cannot copy. Build the model first, as a user would.
    unset_hf_deepspeed_config()
    case, wrapped = build(plugin)
    # stage3_param_persistence_threshold as in ENGINE_CONFIG: every tensor of these tiny models is partitioned
    config = zero3_config(zero_optimization={"stage3_param_persistence_threshold": 2})
    args = TrainingArguments(output_dir=out_dir, deepspeed=config, accelerator_config=cpu_accelerator_state(),
                             per_device_train_batch_size=2, gradient_accumulation_steps=2, learning_rate=1e-3,
                             lr_scheduler_type="constant", max_steps=max_steps, logging_steps=1,
                             save_strategy="steps" if save else "no", save_steps=CHECKPOINT_STEP, report_to=[],
                             disable_tqdm=True, dataloader_num_workers=0, seed=0, remove_unused_columns=False)
    cls = trainer_class or vlmdistill.DistillationTrainer
    callbacks = [vlmdistill.DistillationCallback()] if cls is not vlmdistill.DistillationTrainer else []
    trainer = cls(model=wrapped, args=args, train_dataset=ExampleList(case.examples(32, 11)),
                  data_collator=case.collate, callbacks=callbacks)
    return trainer, wrapped


def trainer_runs(out_dir: str, plugin: str) -> None:
    from safetensors.torch import load_file

    root = os.path.join(out_dir, f"trainer-{plugin}")
    trainer, wrapped = trainer_for(os.path.join(root, "full"), plugin, TRAINER_STEPS, save=False)
    trainer.train()
    full = full_state_dict(wrapped)
    trainer, wrapped = trainer_for(os.path.join(root, "part"), plugin, CHECKPOINT_STEP, save=True)
    trainer.train()
    part = full_state_dict(wrapped)
    checkpoint = os.path.join(root, "part", f"checkpoint-{CHECKPOINT_STEP}")
    trainer, wrapped = trainer_for(os.path.join(root, "part"), plugin, TRAINER_STEPS, save=False)
    forwards = []
    wrapped.register_forward_pre_hook(lambda module, args: forwards.append(1))
    trainer.train(resume_from_checkpoint=checkpoint)
    resumed = full_state_dict(wrapped)
    save(out_dir, f"trainer-{plugin}.pt", {
        "uninterrupted": full, "interrupted": part, "resumed": resumed, "resumed_forwards": len(forwards),
        "resumed_global_step": int(wrapped.plugin.global_step), "trainer_global_step": trainer.state.global_step,
        "checkpoint_files": sorted(os.listdir(checkpoint)),
        "checkpoint_model": load_file(os.path.join(checkpoint, "model.safetensors")) if dist.get_rank() == 0 else {},
        "student_partitioned": all(is_zero3(p) for p in wrapped.parameters())})


def plain_trainer_refused(out_dir: str) -> None:
    from transformers import Trainer

    trainer, _ = trainer_for(os.path.join(out_dir, "trainer-plain"), "kd", 1, save=False, trainer_class=Trainer)
    try:
        trainer.train()
    except vlmdistill.ConfigError as exc:
        if dist.get_rank() == 0:
            with open(os.path.join(out_dir, "trainer-plain-refused.txt"), "w") as fh:
                fh.write(str(exc))


def main(out_dir: str, plugins: list[str]) -> None:
    import deepspeed

    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    for plugin in plugins:
        own_teacher = vlmdistill.get_plugin(plugin).teacher_policy == "none"  # EMA teachers stay replicated
        placements = ["replicate"] if own_teacher else ["replicate", "partition"]
        for placement in placements:
            reads = EMAReads(gather_numel=4096) if (plugin, placement) == ("msd", "replicate") else None
            try:
                engine_run(out_dir, plugin, placement, rank, world)
            finally:
                if reads is not None:
                    reads.restore()
            if reads is not None:
                save(out_dir, "ema-msd.pt", {"lerps": reads.lerps, "after": reads.after,
                                             "gather_numel": reads.gather_numel})
    for plugin in TRAINER_PLUGINS:
        if plugin in plugins:
            trainer_runs(out_dir, plugin)
    plain_trainer_refused(out_dir)
    dist.barrier()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
