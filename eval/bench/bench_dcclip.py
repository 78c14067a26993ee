"""DC-CLIP speed: stage-1 step time with the teacher-feature cache vs with the live teacher, and the
webdataset loader's throughput vs the training step's.

    python -m vlmdistill.eval.bench.bench_dcclip [--steps 20] [--batch 64] [--threads 1] [--out DIR]

Both stage-1 variants train the same student on the same batches; they run interleaved (live, cached,
live, cached, ...) so that a busy machine slows both alike, and the medians are compared. The loader
reads real image–text shards (digits, English and Chinese captions) with the demo's preprocessing
and tokenizer, in the main process and with two DataLoader workers: a ratio above 1 means the loader
keeps up with the cached stage-1 step (the fastest step there is: no teacher forward).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch

import vlmdistill

from .output import add_out_argument, write_results

TEACHER = dict(hidden=128, layers=4, heads=4, patch=4, projection=64)  # 8x8 patch grid at 32 px
STUDENT = dict(hidden=48, layers=2, heads=2, patch=8, projection=32)   # 4x4 patch grid
IMAGE_SIZE = 32


def _clip(size: dict, vocab: int, seed: int):
    from vlmdistill.eval.tiny_models import tiny_hf_clip

    return tiny_hf_clip(hidden=size["hidden"], layers=size["layers"], heads=size["heads"], patch=size["patch"],
                        image_size=IMAGE_SIZE, vocab=vocab, max_positions=32, projection=size["projection"], seed=seed)


def _params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _write_shards(directory: str, num_images: int):
    import numpy as np

    from vlmdistill.data.digits import digit_caption, load_digits_images
    from vlmdistill.plugins.dcclip.data import ImageTextSample, write_image_text_shards
    from vlmdistill.data.text import train_caption_tokenizer

    images, labels, _, _ = load_digits_images(size=8, seed=0)
    samples = []
    for i in range(num_images):
        pixels = np.repeat((images[i % len(images), 0].numpy() * 255).astype(np.uint8)[:, :, None], 3, axis=2)
        for lang in ("en", "zh"):
            samples.append(ImageTextSample(f"b{i:05d}_{lang}", pixels, digit_caption(int(labels[i % len(labels)]),
                                                                                     lang, i % 4), lang))
    write_image_text_shards(samples, directory, samples_per_shard=1000)
    captions = [digit_caption(c, lang, t) for c in range(10) for lang in ("en", "zh") for t in range(4)]
    return train_caption_tokenizer(captions, vocab_size=600)


def _loader(directory: str, tokenizer, batch: int, shuffle: bool, workers: int = 0, persistent: bool = False):
    from vlmdistill.plugins.dcclip.data import ClipImageTransform, ImageTextCollator, ImageTextShards

    dataset = ImageTextShards(directory, ClipImageTransform(IMAGE_SIZE), tokenizer, max_length=32,
                              shuffle_buffer=500 if shuffle else 0, shardshuffle=False, seed=0)
    collate = ImageTextCollator(tokenizer.pad_token_id)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, collate_fn=collate,
                                         drop_last=shuffle, num_workers=workers,  # the cache pass sees every sample
                                         persistent_workers=persistent and workers > 0)
    return dataset, loader


def _loader_throughput(directory: str, tokenizer, batch: int, workers: int, passes: int = 3) -> float:
    """Samples/s over all passes but the first (which pays for starting the workers)."""
    _, loader = _loader(directory, tokenizer, batch, shuffle=True, workers=workers, persistent=True)
    sum(1 for _ in loader)
    started = time.perf_counter()
    delivered = sum(len(b["sample_key"]) for _ in range(passes - 1) for b in loader)
    return delivered / (time.perf_counter() - started)


def _inputs(batch: dict) -> dict:
    keys = ("pixel_values", "input_ids", "attention_mask", "sample_key", "augmentation_seed")
    return {k: batch[k] for k in keys}


def _timed_step(wrapped, optimizer, batch) -> float:
    start = time.perf_counter()
    out = wrapped(**batch)
    out.loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    wrapped.step_end()
    return time.perf_counter() - start


def run(steps: int = 20, batch: int = 64, warmup: int = 2, threads: int = 1) -> dict:
    torch.set_num_threads(threads)
    workdir = tempfile.mkdtemp(prefix="bench_dcclip_")
    shards = os.path.join(workdir, "shards")
    num_images = max(steps + warmup, 8) * batch // 2 + batch
    tokenizer = _write_shards(shards, num_images)
    teacher = _clip(TEACHER, len(tokenizer), seed=1).eval()
    student_params = _params(_clip(STUDENT, len(tokenizer), seed=0))

    # The cache: one teacher pass over the (unshuffled) shards.
    dataset, loader = _loader(shards, tokenizer, 256, shuffle=False)
    builder = vlmdistill.wrap(_clip(STUDENT, len(tokenizer), seed=0), plugin="dcclip", teacher=teacher,
                              data_fingerprint=dataset.fingerprint())
    started = time.perf_counter()
    builder.plugin.build_teacher_cache(loader, os.path.join(workdir, "cache"), progress=False)
    cache_build_s = time.perf_counter() - started
    vlmdistill.unwrap(builder)

    dataset, loader = _loader(shards, tokenizer, batch, shuffle=True)
    batches = []
    for b in loader:
        batches.append(_inputs(b))
        if len(batches) == steps + warmup:
            break
    live = vlmdistill.wrap(_clip(STUDENT, len(tokenizer), seed=0), plugin="dcclip", teacher=teacher)
    cached = vlmdistill.wrap(_clip(STUDENT, len(tokenizer), seed=0), plugin="dcclip", teacher=teacher,
                             teacher_cache=os.path.join(workdir, "cache"), data_fingerprint=dataset.fingerprint())
    opts = {name: torch.optim.AdamW([p for p in w.parameters() if p.requires_grad], lr=1e-3)
            for name, w in (("live", live), ("cached", cached))}
    times: dict[str, list[float]] = {"live": [], "cached": []}
    for i, b in enumerate(batches):
        for name, wrapped in (("live", live), ("cached", cached)):
            seconds = _timed_step(wrapped, opts[name], b)
            if i >= warmup:
                times[name].append(seconds)

    # Loader throughput: full passes (decoding, preprocessing, tokenising, collating), in the main
    # process and with two DataLoader workers (one shard each).
    loader_main = _loader_throughput(shards, tokenizer, batch, workers=0)
    loader_workers = _loader_throughput(shards, tokenizer, batch, workers=2)

    live_s, cached_s = statistics.median(times["live"]), statistics.median(times["cached"])
    result = {
        "device": "cpu", "torch_threads": torch.get_num_threads(), "batch": batch, "steps": steps,
        "teacher_params": _params(teacher), "student_params": student_params,
        "teacher_to_student_params": _params(teacher) / student_params,
        "stage1_step_s": {"live_teacher": live_s, "cached_teacher": cached_s},
        "cache_speedup": live_s / cached_s,
        "cache_build_s": cache_build_s, "cache_samples": num_images * 2,
        "loader_samples_per_s": {"main_process": loader_main, "2_workers": loader_workers},
        "train_samples_per_s": {"live_teacher": batch / live_s, "cached_teacher": batch / cached_s},
        "loader_over_training": {"main_process": loader_main / (batch / cached_s),
                                 "2_workers": loader_workers / (batch / cached_s)},
        "cache_lookups": cached.plugin.cache.hits,
    }
    return result


def report(r: dict) -> str:
    return "\n".join([
        f"teacher {r['teacher_params']:,} params, student {r['student_params']:,} "
        f"({r['teacher_to_student_params']:.1f}x); batch {r['batch']}, {r['steps']} timed steps, "
        f"{r['torch_threads']} threads",
        f"stage-1 step, live teacher    : {1000 * r['stage1_step_s']['live_teacher']:8.1f} ms (median)",
        f"stage-1 step, cached features : {1000 * r['stage1_step_s']['cached_teacher']:8.1f} ms (median)",
        f"cache speed-up                : {r['cache_speedup']:8.2f}x   (target >= 2x)",
        f"cache build (one teacher pass over {r['cache_samples']} samples): {r['cache_build_s']:.1f} s",
        f"webdataset loader, main proc. : {r['loader_samples_per_s']['main_process']:8.0f} samples/s",
        f"webdataset loader, 2 workers  : {r['loader_samples_per_s']['2_workers']:8.0f} samples/s",
        f"training consumes (cached)    : {r['train_samples_per_s']['cached_teacher']:8.0f} samples/s",
        f"loader / training             : {r['loader_over_training']['main_process']:8.2f}x main process, "
        f"{r['loader_over_training']['2_workers']:.2f}x with 2 workers   (> 1: data never starves)",
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    add_out_argument(parser)
    args = parser.parse_args(argv)
    result = run(args.steps, args.batch, threads=args.threads)
    text = report(result)
    print(text)
    write_results(args.out, result, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
