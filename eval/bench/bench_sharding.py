"""Cost of distillation under FSDP2 or DeepSpeed ZeRO-3: the lingudistill step against the plain student step, both
sharded the same way, teacher sharded like the student.

    python -m vlmdistill.eval.bench.bench_sharding [--engine fsdp2|zero3] [--steps 6] [--hidden 256] [--layers 4]

runs one process (the single-process step-time ratio), then launches itself on 2 CPU ranks (gloo) under torchrun
for the sharded ratio and the per-rank memory. FSDP2: one unit per block (accelerate's layout), the teacher sharded
by `vlmdistill.sharding.shard(..., teacher="shard")`. ZeRO-3 (DeepSpeed's CPU accelerator; needs the [deepspeed]
extra): both models through `deepspeed.initialize` with DeepSpeed's default partitioning, the teacher partitioned by
`vlmdistill.zero3.partition_teacher`. Per rank, memory = persistent tensors this rank holds (parameter shards or
partitions, gradients, optimizer state and, under ZeRO-3, the engine's flat buffers; the teacher's shard) + the peak
of torch's live allocations during one step above its start (CPU profiler events). The distillation step's extra over
the plain step should be about the teacher's shard + the K/V stash + one gathered teacher block; its time ratio should
stay within 5% of the single-process one (sharding adds the same communication per student block to both). Ratios
are measured in one run, the steps interleaved, so machine noise hits both alike.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

from .output import add_out_argument, write_results


IMAGE_TOKENS = 4  # a 16-pixel image in 8-pixel patches
IMAGE_TOKEN_ID = 1


def _text_config(args) -> dict:
    return dict(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                num_key_value_heads=max(1, args.hidden // 128), max_position_embeddings=args.seq,
                attention_dropout=0.0, pad_token_id=0)


def _student(args):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(0)
    vision = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                              image_size=16, patch_size=8)
    return LlavaForConditionalGeneration(LlavaConfig(
        text_config=LlamaConfig(**_text_config(args)).to_dict(), vision_config=vision.to_dict(),
        image_token_id=IMAGE_TOKEN_ID, vision_feature_layer=-1, vision_feature_select_strategy="default"))


def _models(args):
    """(plain student, lingudistill wrapper of an identical student with an LM teacher of its text architecture,
    a batch of `args.batch` rows)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    import vlmdistill

    torch.manual_seed(1)
    teacher = LlamaForCausalLM(LlamaConfig(**_text_config(args)))
    wrapped = vlmdistill.wrap(_student(args), plugin="lingudistill", teacher=teacher)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(2, args.vocab, (args.batch, args.seq), generator=g)
    ids[:, 2:2 + IMAGE_TOKENS] = IMAGE_TOKEN_ID
    labels = ids.clone()
    labels[:, : args.seq // 2] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
             "pixel_values": torch.rand(args.batch, 3, 16, 16, generator=g)}
    return _student(args), wrapped, batch


def _persistent_bytes(tensors) -> int:
    from vlmdistill.distributed import local_shard

    seen, total = set(), 0
    for tensor in tensors:
        local = local_shard(tensor)
        key = (local.untyped_storage().data_ptr(), local.storage_offset())
        if local.numel() and key not in seen:
            seen.add(key)
            total += local.numel() * local.element_size()
    return total


def _state_tensors(model, optimizer, teacher=None):
    out = [p for p in model.parameters()] + [b for b in model.buffers()]
    out += [p.grad for p in model.parameters() if p.grad is not None]
    out += [v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)]
    if teacher is not None:
        out += list(teacher.parameters()) + list(teacher.buffers())
    return out


def _step(model, batch, optimizer):
    loss = model(**batch).loss
    if optimizer is None:  # a DeepSpeed engine: its backward and step
        model.backward(loss)
        model.step()
        return
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


# ZeRO-3 as a user's config has it (DeepSpeed's default partitioning thresholds); no clipping, as the torch steps
ZERO3_CONFIG = {"train_micro_batch_size_per_gpu": 1, "gradient_clipping": 0.0, "zero_allow_untested_optimizer": True,
                "zero_optimization": {"stage": 3}}


def _engine_tensors(engine, teacher=None) -> list:
    """What a ZeRO-3 rank holds for `engine` (its module's partitions and buffers, every tensor the ZeRO-3 optimizer
    keeps: flat fp32 partitions, gradient partitions, buffers, the inner optimizer's state) and the teacher's
    partitions."""
    out = [p.ds_tensor for p in engine.module.parameters()] + list(engine.module.buffers())
    zero = engine.optimizer
    for value in vars(zero).values():
        items = value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple)) else [value]
        for item in items:
            out += item if isinstance(item, (list, tuple)) else [item]
    out += [v for state in zero.optimizer.state.values() for v in state.values()]
    if teacher is not None:
        out += [p.ds_tensor for p in teacher.parameters()] + list(teacher.buffers())
    return [t for t in out if isinstance(t, torch.Tensor)]


def _storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors` (flat buffers count once, whatever views they have)."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors if t.numel()}
    return sum(storages.values())


def _zero3(plain, wrapped, args):
    import deepspeed

    from vlmdistill.zero3 import partition_teacher

    partition_teacher(wrapped)
    config = {**ZERO3_CONFIG, "train_micro_batch_size_per_gpu": args.batch}
    plain, *_ = deepspeed.initialize(model=plain, optimizer=torch.optim.AdamW(plain.parameters(), lr=1e-4),
                                     config=config)
    optimizer = torch.optim.AdamW([p for p in wrapped.parameters() if p.requires_grad], lr=1e-4)
    engine, *_ = deepspeed.initialize(model=wrapped, optimizer=optimizer, config=config)
    return plain, engine


def measure(args, *, sharded: bool) -> dict:
    from vlmdistill.eval.bench.bench_msd import allocator_peak_mb
    from vlmdistill.sharding import shard, shard_blocks

    plain, wrapped, batch = _models(args)
    teacher = wrapped.teacher
    zero3 = sharded and args.engine == "zero3"
    if zero3:
        plain_engine, distill_engine = _zero3(plain, wrapped, args)
        wrapped = distill_engine  # the steps run through the engines
        plain, opt_plain, opt_distill = plain_engine, None, None
    else:
        if sharded:
            shard_blocks(plain)
            shard(wrapped, teacher="shard")
        opt_plain = torch.optim.AdamW(plain.parameters(), lr=1e-4)
        opt_distill = torch.optim.AdamW([p for p in wrapped.parameters() if p.requires_grad], lr=1e-4)
    plain.train()
    wrapped.train()
    plain_batch = batch
    for _ in range(2):  # warm-up; optimizer state allocated
        _step(plain, plain_batch, opt_plain)
        _step(wrapped, batch, opt_distill)
    times = {"plain": [], "distill": []}
    for _ in range(args.steps):
        for name, model, b, opt in (("plain", plain, plain_batch, opt_plain), ("distill", wrapped, batch, opt_distill)):
            start = time.perf_counter()
            _step(model, b, opt)
            times[name].append(time.perf_counter() - start)
    peak_plain = allocator_peak_mb(lambda: _step(plain, plain_batch, opt_plain))
    peak_distill = allocator_peak_mb(lambda: _step(wrapped, batch, opt_distill))
    mib = 2 ** 20
    if zero3:
        persistent = {"plain": _storage_bytes(_engine_tensors(plain)) / mib,
                      "distill": _storage_bytes(_engine_tensors(wrapped, teacher)) / mib}
        teacher_mib = _storage_bytes([p.ds_tensor for p in teacher.parameters()]) / mib
    else:
        persistent = {"plain": _persistent_bytes(_state_tensors(plain, opt_plain)) / mib,
                      "distill": _persistent_bytes(_state_tensors(wrapped, opt_distill, teacher)) / mib}
        teacher_mib = _persistent_bytes(list(teacher.parameters())) / mib
    out = {"step_s": {k: statistics.median(v) for k, v in times.items()}, "persistent_mib": persistent,
           "step_peak_mib": {"plain": peak_plain, "distill": peak_distill}, "teacher_shard_mib": teacher_mib}
    out["time_ratio"] = out["step_s"]["distill"] / out["step_s"]["plain"]
    out["total_mib"] = {k: out["persistent_mib"][k] + out["step_peak_mib"][k] for k in ("plain", "distill")}
    out["extra_mib"] = out["total_mib"]["distill"] - out["total_mib"]["plain"]
    return out


def kv_stash_mib(args) -> float:
    """Upper bound of the K/V stash per rank: every layer's K and V at the shared (image) positions of every
    distilled sample, fp32."""
    kv_heads, head_dim = max(1, args.hidden // 128), 64
    return args.layers * 2 * args.batch * kv_heads * IMAGE_TOKENS * head_dim * 4 / 2 ** 20


def _worker(args) -> None:
    import torch.distributed as dist

    if args.engine == "zero3":
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")
    else:
        dist.init_process_group("gloo")
    try:
        result = measure(args, sharded=True)
        results = [None] * dist.get_world_size()
        dist.all_gather_object(results, result)
        if dist.get_rank() == 0:
            with open(args.worker_out, "w") as fh:
                json.dump(results, fh)
    finally:
        dist.destroy_process_group()


INTERNAL = ("worker", "worker_out", "out")  # not passed on to the ranks


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engine", choices=("fsdp2", "zero3"), default="fsdp2")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--seq", type=int, default=96)
    parser.add_argument("--batch", type=int, default=4, help="rows per rank (the single process takes the same)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", default="", help=argparse.SUPPRESS)
    add_out_argument(parser)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.worker:
        _worker(args)
        return 0
    single = measure(args, sharded=False)
    out = os.path.abspath(f"bench_sharding_{os.getpid()}.json")
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    cmd = [torchrun, "--standalone", "--nproc_per_node", "2", "-m", "vlmdistill.eval.bench.bench_sharding",
           "--worker", "--worker-out", out,
           *[f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k not in INTERNAL and v is not None]]
    subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    with open(out) as fh:
        ranks = json.load(fh)
    os.remove(out)
    report = {"config": {k: v for k, v in vars(args).items() if k not in INTERNAL},
              "single_process": single, f"{args.engine}_2_ranks": ranks,
              "time_ratio_change": ranks[0]["time_ratio"] / single["time_ratio"] - 1.0,
              "kv_stash_bound_mib": kv_stash_mib(args)}
    print(json.dumps(report, indent=2))
    r0 = ranks[0]
    engine = {"fsdp2": "FSDP2", "zero3": "ZeRO-3"}[args.engine]
    text = "\n".join([
        f"single process: distill/plain step time {single['time_ratio']:.3f}",
        f"{engine}, 2 ranks: distill/plain step time {r0['time_ratio']:.3f} "
        f"({100 * report['time_ratio_change']:+.1f}% vs one process)",
        f"per-rank memory (rank 0): plain {r0['total_mib']['plain']:.1f} MiB, distill {r0['total_mib']['distill']:.1f}"
        f" MiB, extra {r0['extra_mib']:.1f} MiB = teacher shard {r0['teacher_shard_mib']:.1f} MiB + "
        f"{r0['extra_mib'] - r0['teacher_shard_mib']:.1f} MiB in the step (K/V stash bound "
        f"{report['kv_stash_bound_mib']:.1f} MiB, one gathered teacher block, teacher activations)"])
    print("\n" + text)
    write_results(args.out, report, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
