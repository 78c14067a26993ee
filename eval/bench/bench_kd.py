"""Cost of `wrap(..., plugin="kd")`: a training step against the plain student step, same batch, with a
teacher the same size as the student. Both are timed in this process, interleaved, so machine noise
hits them alike; the ratio is what to read.

    python -m vlmdistill.eval.bench.bench_kd [--device cpu|cuda] [--steps 20]

Memory: the bytes autograd keeps for backward are counted exactly (saved-tensor hooks), so "no
retained teacher activations" is checked, not assumed; on CUDA the peak allocation is printed too.
Target: step ratio ≤ 1.4 (the floor is ~1.33: one extra no-grad forward on top of forward+backward).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def _llama(seed: int, args):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
        num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64, num_key_value_heads=args.hidden // 128,
        max_position_embeddings=args.seq, tie_word_embeddings=False)).to(args.device)


class SavedBytes:
    """Bytes of all tensors autograd saves for backward while active (distinct storages)."""

    def __init__(self):
        self.storages: dict[int, int] = {}

    def pack(self, tensor):
        storage = tensor.untyped_storage()
        self.storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    @property
    def total(self) -> int:
        return sum(self.storages.values())


def _step(model, batch, optimizer, counter: SavedBytes | None = None):
    if counter is not None:
        with torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda t: t):
            loss = model(**batch).loss
    else:
        loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run(args) -> dict:
    import vlmdistill

    torch.set_num_threads(max(1, torch.get_num_threads()))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g).to(args.device)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}

    plain = _llama(0, args)
    distilled = vlmdistill.wrap(_llama(0, args), plugin="kd", teacher=_llama(1, args), alpha=0.5, temperature=2.0)
    opt_plain = torch.optim.AdamW(plain.parameters(), lr=1e-4)
    opt_kd = torch.optim.AdamW([p for p in distilled.parameters() if p.requires_grad], lr=1e-4)

    saved = {}
    for name, model, opt in (("plain", plain, opt_plain), ("kd", distilled, opt_kd)):
        counter = SavedBytes()
        _step(model, batch, opt, counter)  # also the warm-up
        saved[name] = counter.total
    for _ in range(2):
        _step(plain, batch, opt_plain)
        _step(distilled, batch, opt_kd)

    times = {"plain": [], "kd": []}
    for _ in range(args.steps):
        for name, model, opt in (("plain", plain, opt_plain), ("kd", distilled, opt_kd)):
            _sync(args.device)
            t0 = time.perf_counter()
            _step(model, batch, opt)
            _sync(args.device)
            times[name].append(time.perf_counter() - t0)

    peak = {}
    if args.device.startswith("cuda"):
        for name, model, opt in (("plain", plain, opt_plain), ("kd", distilled, opt_kd)):
            torch.cuda.reset_peak_memory_stats()
            _step(model, batch, opt)
            peak[name] = torch.cuda.max_memory_allocated()

    med = {k: statistics.median(v) for k, v in times.items()}
    teacher_bytes = sum(p.numel() * p.element_size() for p in distilled.teacher.parameters())
    logits_bytes = args.batch * (args.seq - 1) * args.vocab * 4
    result = {
        "device": args.device, "shape": vars(args),
        "median_step_s": med, "ratio_kd_over_plain": med["kd"] / med["plain"],
        "saved_for_backward_bytes": saved, "extra_saved_bytes": saved["kd"] - saved["plain"],
        "student_logit_rows_fp32_bytes": logits_bytes, "teacher_weight_bytes": teacher_bytes,
        "cuda_peak_bytes": peak,
    }
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--json", help="also write the result here")
    args = parser.parse_args(argv)
    r = run(args)
    mb = 1 / 2 ** 20
    print(f"device {r['device']}  batch {args.batch}x{args.seq}  hidden {args.hidden}  layers {args.layers}  "
          f"vocab {args.vocab}  (teacher = student size)")
    print(f"median step: plain {r['median_step_s']['plain'] * 1e3:.1f} ms, kd {r['median_step_s']['kd'] * 1e3:.1f} ms"
          f"  -> ratio {r['ratio_kd_over_plain']:.3f}  (target <= 1.4)")
    print(f"saved for backward: plain {r['saved_for_backward_bytes']['plain'] * mb:.1f} MiB, kd "
          f"{r['saved_for_backward_bytes']['kd'] * mb:.1f} MiB, extra {r['extra_saved_bytes'] * mb:.1f} MiB "
          f"(one fp32 [N,V] logit-row block = {r['student_logit_rows_fp32_bytes'] * mb:.1f} MiB); "
          f"teacher weights {r['teacher_weight_bytes'] * mb:.1f} MiB")
    if r["cuda_peak_bytes"]:
        p = r["cuda_peak_bytes"]
        print(f"CUDA peak: plain {p['plain'] * mb:.1f} MiB, kd {p['kd'] * mb:.1f} MiB")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(r, fh, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
