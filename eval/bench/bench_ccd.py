"""Cost of a CCD training step against a plain supervised step of the same ViT on the same batch.

    python -m vlmdistill.eval.bench.bench_ccd [--size tiny] [--batch 64] [--steps 3] [--out-dim 65536]
                                              [--seg-hidden 128 --seg-map 64]

CCD step: two views, k-means pseudo masks, student forward on both views, segmentation head, character slots
(connected components) warped to the irregular view, EMA-teacher forward on both views, DINO head, backward,
AdamW step and the EMA/centre update. Supervised step: the same ViT + a CTC recogniser head on the original
images, backward, AdamW step. Both run in this process, interleaved, so machine noise hits them alike.

The character-mask pipeline (k-means, connected components, warps, token weights) is timed inside the CCD
step by wrapping those functions; target: < 20% of the step at batch 64 on CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import numpy as np
import torch

import vlmdistill
from vlmdistill.eval.ctc_recognizer import CTCRecognizer
from vlmdistill.plugins.ccd import ccd_vit
from vlmdistill.plugins.ccd import plugin as ccd_plugin
from vlmdistill.data.rendered_words import render_words, to_pixel_values

from .output import add_out_argument, write_results

MASK_PIPELINE = ("pseudo_text_masks", "character_slots", "warp_masks", "slot_token_weights")
VIEWS = ("make_views",)


class StageTimer:
    """Accumulates wall time of named functions of the plugin module while installed."""

    def __init__(self, names):
        self.names = names
        self.seconds = dict.fromkeys(names, 0.0)

    @contextlib.contextmanager
    def installed(self):
        originals = {n: getattr(ccd_plugin, n) for n in self.names}

        def timed(name, fn):
            def run(*args, **kwargs):
                t0 = time.perf_counter()
                try:
                    return fn(*args, **kwargs)
                finally:
                    self.seconds[name] += time.perf_counter() - t0
            return run

        for name, fn in originals.items():
            setattr(ccd_plugin, name, timed(name, fn))
        try:
            yield self
        finally:
            for name, fn in originals.items():
                setattr(ccd_plugin, name, fn)

    def reset(self):
        self.seconds = dict.fromkeys(self.names, 0.0)


def _words(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    return ["".join(rng.choice(list(letters), size=int(rng.integers(3, 11)))) for _ in range(n)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="tiny", choices=["tiny", "small", "base"])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3, help="timed steps of each kind (after one warm-up)")
    parser.add_argument("--out-dim", type=int, default=65536)
    parser.add_argument("--seg-hidden", type=int, default=128, help="segmentation head channels (config default)")
    parser.add_argument("--seg-map", type=int, default=64, help="per-block map channels (config default)")
    parser.add_argument("--threads", type=int, default=2)
    add_out_argument(parser)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    words = _words(args.batch, 0)
    pixels = to_pixel_values(render_words(words, 0))
    batch = {"pixel_values": pixels, "ccd_seed": torch.arange(args.batch)}

    torch.manual_seed(0)
    wrapped = vlmdistill.wrap(ccd_vit(args.size), plugin="ccd", out_dim=args.out_dim,
                              seg_hidden_channels=args.seg_hidden, seg_map_channels=args.seg_map)
    ccd_opt = torch.optim.AdamW([p for p in wrapped.parameters() if p.requires_grad], lr=1e-4)
    torch.manual_seed(0)
    recogniser = CTCRecognizer(ccd_vit(args.size))
    sup_opt = torch.optim.AdamW(recogniser.parameters(), lr=1e-4)
    wrapped.train()
    recogniser.train()

    timer = StageTimer(MASK_PIPELINE + VIEWS)
    ccd_times, sup_times, pipeline, views, chars = [], [], [], [], []
    with timer.installed():
        for step in range(args.steps + 1):
            timer.reset()
            t0 = time.perf_counter()
            out = wrapped(**batch)
            out.loss.backward()
            ccd_opt.step()
            ccd_opt.zero_grad(set_to_none=True)
            wrapped.step_end()
            t_ccd = time.perf_counter() - t0

            t0 = time.perf_counter()
            loss = recogniser.loss(pixels, words)
            loss.backward()
            sup_opt.step()
            sup_opt.zero_grad(set_to_none=True)
            t_sup = time.perf_counter() - t0
            if step == 0:
                continue  # warm-up
            ccd_times.append(t_ccd)
            sup_times.append(t_sup)
            pipeline.append(sum(timer.seconds[n] for n in MASK_PIPELINE))
            views.append(timer.seconds["make_views"])
            chars.append(float(out.metrics["paired_characters"]))
            print(f"step {step}: ccd {t_ccd:.2f} s (mask pipeline {pipeline[-1]:.3f} s, views {views[-1]:.3f} s), "
                  f"supervised {t_sup:.2f} s")

    ccd_s, sup_s = statistics.median(ccd_times), statistics.median(sup_times)
    pipe_s, views_s = statistics.median(pipeline), statistics.median(views)
    result = {
        "size": args.size, "batch": args.batch, "out_dim": args.out_dim, "threads": args.threads,
        "seg_hidden": args.seg_hidden, "seg_map": args.seg_map,
        "steps": args.steps, "ccd_step_s": ccd_s, "supervised_step_s": sup_s, "ratio": ccd_s / sup_s,
        # on a shared machine the fastest step of each kind is the least disturbed one
        "ccd_step_best_s": min(ccd_times), "supervised_step_best_s": min(sup_times),
        "ratio_best": min(ccd_times) / min(sup_times),
        "mask_pipeline_s": pipe_s, "mask_pipeline_fraction": pipe_s / ccd_s,
        "views_s": views_s, "views_fraction": views_s / ccd_s,
        "paired_characters_per_image": statistics.mean(chars),
    }
    text = "\n".join([
        f"CCD-ViT-{args.size}, batch {args.batch}, {args.out_dim} prototypes, segmentation head "
        f"{args.seg_hidden}/{args.seg_map} channels, {args.threads} threads (median of {args.steps} steps)",
        f"  CCD step         {ccd_s:8.2f} s",
        f"  supervised step  {sup_s:8.2f} s",
        f"  ratio            {result['ratio']:8.2f} x   (fastest steps: {min(ccd_times):.2f} s / "
        f"{min(sup_times):.2f} s = {result['ratio_best']:.2f} x)",
        f"  mask pipeline    {pipe_s:8.3f} s  = {100 * result['mask_pipeline_fraction']:.1f}% of the CCD step "
        "(k-means + connected components + warps + token weights; target < 20%)",
        f"  view sampling    {views_s:8.3f} s  = {100 * result['views_fraction']:.1f}% of the CCD step"])
    print("\n" + text)
    write_results(args.out, result, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
