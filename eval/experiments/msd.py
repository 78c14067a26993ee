"""Does momentum self-distillation reach large-batch accuracy at small-batch memory? (`vlmdistill demo msd`)

A tiny transformers CLIP is trained from scratch on the bundled digits with captions drawn from four
templates, for the same number of optimizer steps in each run:

* `clip-b`         plain CLIP loss, batch b;
* `clip-Mb`        plain CLIP loss, batch M·b (the large-batch target);
* `clip-b-accum`   plain CLIP loss, b × M naive gradient accumulation (each micro-batch sees only b negatives);
* `msd-b-accum`    `plugin="msd"`, b × M through `msd_step` (each micro-batch sees M·b teacher keys + queue);
* `msd-b-accum-k0` the same without the queue (the captions repeat: queued keys include exact duplicates).

Reported per run: zero-shot accuracy on the held-out digits through the ELEVATER harness (its `digits`
task and prompts), a k-shot linear probe on frozen image embeddings (macro ROC-AUC and accuracy), peak
memory of training (resident-set high-water mark above the state before training, each run in its own
process, and the peak bytes that autograd saved for one backward), and wall time.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import multiprocessing
import os
import statistics
import time
from typing import Any

import numpy as np
import torch

PRELOAD = ("torch", "transformers", "transformers.models.clip.modeling_clip", "sklearn.linear_model",
           "vlmdistill.eval.elevater", "vlmdistill.plugins.msd", "vlmdistill.eval.experiments.msd")
RUN_KINDS = ("clip-b", "clip-Mb", "clip-b-accum", "msd-b-accum", "msd-b-accum-k0")


@dataclasses.dataclass
class Settings:
    steps: int = 300
    micro_batch: int = 16          # b
    accumulation: int = 8          # M
    lr: float = 2e-3
    warmup_steps: int = 30
    shots: int = 5                 # per class, linear probe
    width: int = 64
    layers: int = 2
    alpha: float = 0.4
    momentum: float = 0.9          # a 10-step time constant for a 300-step run (ALBEF's 0.995 is for long runs)
    queue_size: int = 256          # 2 macro-batches, ~19% of the 1,348 training pairs
    image_size: int = 16           # the digits are 8x8: 16 px with 4 px patches keeps 16 patches
    patch_size: int = 4
    threads: int = 1


QUICK = dict(steps=12, micro_batch=8, accumulation=4, warmup_steps=2, queue_size=64)


# ----------------------------------------------------------------------------- memory
def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _release_free_memory() -> None:
    """Give freed heap back to the OS (glibc), so that the RSS before training is what is live."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_peak_rss() -> bool:
    """Linux: writing 5 to clear_refs resets VmHWM to the current RSS."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


class SavedActivationPeak:
    """Peak bytes that autograd holds for one backward (parameters excluded), counted with saved-tensor
    hooks opened by a forward pre-hook and closed by a forward hook on the module the loop calls."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.param_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.peak = 0
        self._seen: set[int] = set()
        self._bytes = 0
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._handles = [model.register_forward_pre_hook(self._open),
                         model.register_forward_hook(self._close)]

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        key = tensor.untyped_storage().data_ptr()
        if key not in self._seen and key not in self.param_storages:
            self._seen.add(key)
            self._bytes += tensor.untyped_storage().nbytes()
        return tensor

    def _open(self, module, args):
        self._seen, self._bytes = set(), 0
        self._hooks.__enter__()

    def _close(self, module, args, output):
        self._hooks.__exit__(None, None, None)
        self.peak = max(self.peak, self._bytes)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


# ----------------------------------------------------------------------------- data
def prepare_data(out_dir: str, image_size: int, seed: int = 0) -> dict[str, Any]:
    """Quantised digits (as the PNGs the harness reads), the test set written in IRIS layout."""
    from PIL import Image

    from vlmdistill.eval.elevater import digits_task
    from vlmdistill.eval.elevater.dataset_writers import write_iris
    from vlmdistill.plugins.msd.digit_captions import digit_caption_split

    train, train_labels, test, test_labels = digit_caption_split(size=image_size, seed=seed)
    train, test = (train * 255).round() / 255, (test * 255).round() / 255
    folder = os.path.join(out_dir, "data", f"digits-{image_size}px")
    index = os.path.join(folder, "test.txt")
    if not os.path.isfile(index):
        images = [Image.fromarray((x * 255).round().byte().permute(1, 2, 0).numpy()) for x in test]
        write_iris(folder, images, [(int(y),) for y in test_labels], digits_task("en").classnames)
    return {"train": train, "train_labels": train_labels, "test": test, "test_labels": test_labels,
            "test_folder": folder}


# ----------------------------------------------------------------------------- training
def _batches(dataset, batch: int, seed: int):
    """Endless shuffled batches (a new permutation every epoch)."""
    generator = torch.Generator().manual_seed(seed)
    for epoch in itertools.count():
        dataset.set_epoch(epoch)  # fresh caption draws each epoch
        order = torch.randperm(len(dataset), generator=generator).tolist()
        for start in range(0, len(order) - batch + 1, batch):
            yield dataset.collate([dataset[i] for i in order[start:start + batch]])


def _schedule(optimizer, steps: int, warmup: int):
    def factor(step):
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def train_run(kind: str, settings: Settings, data: dict, tokenizer, seed: int) -> dict[str, Any]:
    import vlmdistill
    from vlmdistill.plugins.msd import msd_step
    from vlmdistill.plugins.msd.digit_captions import DigitCaptions, tiny_clip

    s = settings
    model = tiny_clip(len(tokenizer), tokenizer.eos_token_id, width=s.width, layers=s.layers, seed=seed,
                      image_size=s.image_size, patch_size=s.patch_size)
    dataset = DigitCaptions(data["train"], data["train_labels"], tokenizer, seed=seed)
    macro = s.micro_batch if kind == "clip-b" else s.micro_batch * s.accumulation
    batches = _batches(dataset, macro, seed)
    trained = model
    msd = kind.startswith("msd")
    if msd:
        model = vlmdistill.wrap(model, plugin="msd", alpha=s.alpha, alpha_warmup_steps=max(1, s.steps // 5),
                                momentum=s.momentum, queue_size=0 if kind.endswith("k0") else s.queue_size,
                                micro_batch_size=s.micro_batch)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=s.lr, weight_decay=0.1)
    scheduler = _schedule(optimizer, s.steps, s.warmup_steps)
    saved = SavedActivationPeak(model)
    _warm_up(model, kind, DigitCaptions(data["train"], data["train_labels"], tokenizer, seed=10_000 + seed), macro,
             s.micro_batch)
    _release_free_memory()
    rss_before = _status_kib("VmRSS")
    peak_reset = _reset_peak_rss()
    started, cpu_started = time.perf_counter(), time.process_time()
    losses = []
    for _ in range(s.steps):
        batch = next(batches)
        if msd:
            losses.append(msd_step(model, optimizer, batch, s.micro_batch, scheduler=scheduler))
            continue
        micro = [batch] if kind in ("clip-b", "clip-Mb") else _split(batch, s.micro_batch)
        total = 0.0
        for part in micro:
            loss = model(**part, return_loss=True).loss / len(micro)
            loss.backward()
            total += float(loss.detach())
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(total)
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    peak_kib = _status_kib("VmHWM")
    saved.remove()
    if msd:
        trained = vlmdistill.unwrap(model)
    trained.eval()
    return {"model": trained, "losses": losses, "train_seconds": seconds, "train_cpu_seconds": cpu_seconds,
            "peak_rss_mb": (peak_kib - rss_before) / 1024 if peak_reset and peak_kib and rss_before else None,
            "saved_activations_mb": saved.peak / 2**20}


def _warm_up(model, kind: str, warm_data, macro: int, micro_batch: int) -> None:
    """One forward/backward of each micro-batch shape, no optimizer step, before memory is measured: lazy
    initialisation is then part of the baseline for every run alike. Its own data copy keeps the training
    captions' random draws untouched."""
    batch = warm_data.collate([warm_data[i] for i in range(macro)])
    micro = [batch] if kind in ("clip-b", "clip-Mb") else _split(batch, micro_batch)
    if kind.startswith("msd"):
        model.plugin.on_accumulation_window(micro)   # replaced by the first real window
        for part in micro:
            model(**part).loss.backward()
    else:
        for part in micro:
            model(**part, return_loss=True).loss.backward()
    model.zero_grad(set_to_none=True)


def _split(batch: dict, size: int) -> list[dict]:
    from vlmdistill.plugins.msd.window import split_batch

    return split_batch(batch, size)


# ----------------------------------------------------------------------------- evaluation
def evaluate(model, tokenizer, data: dict, shots: int, seed: int) -> dict[str, float]:
    """Zero-shot accuracy through the ELEVATER harness; k-shot linear probe on frozen image embeddings."""
    from sklearn.linear_model import LogisticRegression

    from vlmdistill.eval.elevater import adapter_for, compute_metrics, digits_task, evaluate_zero_shot, read_dataset
    from vlmdistill.plugins.msd.digit_captions import normalise_pixels

    adapter = adapter_for(model, tokenizer, name="msd-demo-tiny-clip")
    zero_shot = evaluate_zero_shot(adapter, digits_task("en"), read_dataset(data["test_folder"]), "elevater",
                                   batch_size=256, progress=False)

    def features(images):
        with torch.no_grad():
            return torch.cat([torch.nn.functional.normalize(adapter.encode_images(normalise_pixels(chunk)).float(),
                                                            dim=-1) for chunk in images.split(256)]).numpy()

    rng = np.random.default_rng(seed)
    labels = data["train_labels"].numpy()
    picks = np.concatenate([rng.choice(np.flatnonzero(labels == c), shots, replace=False) for c in range(10)])
    probe = LogisticRegression(max_iter=2000, C=10.0)
    probe.fit(features(data["train"][picks]), labels[picks])
    scores = probe.predict_proba(features(data["test"]))
    probe_metrics = compute_metrics(scores, [(int(y),) for y in data["test_labels"]], 10, multilabel=False)
    return {"zero_shot_acc": zero_shot["metrics"]["acc1"], "zero_shot_auc": zero_shot["metrics"]["roc_auc"],
            "probe_auc": probe_metrics["roc_auc"], "probe_acc": probe_metrics["acc1"]}


# ----------------------------------------------------------------------------- one run, one process
def run_one(kind: str, settings: dict, seed: int, out_dir: str) -> dict[str, Any]:
    """Train and evaluate one run (meant for a fresh process, so that its memory peak is its own)."""
    from vlmdistill.plugins.msd.digit_captions import caption_tokenizer

    s = Settings(**settings)
    torch.set_num_threads(s.threads)
    data = prepare_data(out_dir, s.image_size)
    tokenizer = caption_tokenizer()
    result = train_run(kind, s, data, tokenizer, seed)
    metrics = evaluate(result["model"], tokenizer, data, s.shots, seed)
    losses = result["losses"]
    return {"run": kind, "seed": seed, **metrics, "peak_rss_mb": result["peak_rss_mb"],
            "saved_activations_mb": result["saved_activations_mb"], "train_seconds": result["train_seconds"],
            "train_cpu_seconds": result["train_cpu_seconds"],
            "first_loss": losses[0], "last_loss": statistics.fmean(losses[-10:]),
            "process_cpu_seconds": time.process_time()}   # the whole run: set-up, training, evaluation


def _child(kind, settings, seed, out_dir, queue):
    try:
        queue.put(run_one(kind, settings, seed, out_dir))
    except BaseException as exc:  # report, do not hang the parent
        queue.put({"run": kind, "seed": seed, "error": f"{type(exc).__name__}: {exc}"})
        raise


def run_in_processes(jobs: list[tuple[str, int]], settings: Settings, out_dir: str, workers: int,
                     progress: bool = True) -> list[dict]:
    """Each (kind, seed) in its own spawned process, `workers` at a time."""
    import queue as queue_module

    # A fork server that has imported the heavy modules once: each run starts in a fresh process (its
    # memory peak is its own) without paying the imports again.
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(list(PRELOAD))
    queue = context.Queue()
    pending, processes, results = list(jobs), [], []
    while len(results) < len(jobs):
        while pending and len(processes) - len(results) < workers:
            kind, seed = pending.pop(0)
            process = context.Process(target=_child, args=(kind, dataclasses.asdict(settings), seed, out_dir, queue))
            process.start()
            processes.append(process)
        try:
            result = queue.get(timeout=5)
        except queue_module.Empty:
            dead = [p for p in processes if p.exitcode not in (None, 0)]
            if dead and queue.empty():
                raise RuntimeError(f"a run process died with exit code {dead[0].exitcode} and reported nothing")
            continue
        results.append(result)
        if "error" in result:
            raise RuntimeError(f"run {result['run']} (seed {result['seed']}) failed: {result['error']}")
        if progress:
            shown = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in result.items()}
            print(f"[{len(results)}/{len(jobs)}] {shown}", flush=True)
    for process in processes:
        process.join()
    return results


# ----------------------------------------------------------------------------- report
METRICS = (("zero_shot_acc", "zero-shot acc", 100), ("probe_auc", "probe AUC", 100), ("probe_acc", "probe acc", 100),
           ("peak_rss_mb", "peak RSS MB", 1), ("saved_activations_mb", "saved act. MB", 1),
           ("train_seconds", "train s", 1), ("train_cpu_seconds", "train CPU s", 1))


def summarise(results: list[dict]) -> dict[str, dict[str, tuple[float, float]]]:
    summary = {}
    for kind in RUN_KINDS:
        rows = [r for r in results if r["run"] == kind]
        if not rows:
            continue
        summary[kind] = {}
        for key, _, _ in METRICS:
            values = [r[key] for r in rows if r.get(key) is not None]
            if values:
                summary[kind][key] = (statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0)
    return summary


def markdown_table(summary: dict, settings: Settings, seeds: list[int]) -> str:
    b, m = settings.micro_batch, settings.accumulation
    labels = {"clip-b": f"CLIP, batch {b}", "clip-Mb": f"CLIP, batch {b * m}",
              "clip-b-accum": f"CLIP, {b} x {m} accumulation", "msd-b-accum": f"MSD, {b} x {m} accumulation",
              "msd-b-accum-k0": f"MSD, {b} x {m} accumulation, no queue"}
    head = "| run | " + " | ".join(name for _, name, _ in METRICS) + " |"
    lines = [head, "|" + "---|" * (len(METRICS) + 1)]
    for kind, values in summary.items():
        cells = []
        for key, _, scale in METRICS:
            if key in values:
                mean, std = values[key]
                cells.append(f"{mean * scale:.1f} ± {std * scale:.1f}" if len(seeds) > 1 else f"{mean * scale:.1f}")
            else:
                cells.append("n/a")
        lines.append(f"| {labels[kind]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run(output_dir: str, seeds: list[int], quick: bool = False, workers: int = 2,
        kinds: tuple[str, ...] = RUN_KINDS, **overrides) -> dict:
    settings = Settings(**{**(QUICK if quick else {}), **overrides})
    os.makedirs(output_dir, exist_ok=True)
    prepare_data(output_dir, settings.image_size)   # write the test set once, before the workers read it
    started, load_before = time.perf_counter(), os.getloadavg()
    jobs = [(kind, seed) for seed in seeds for kind in kinds]
    results = sorted(run_in_processes(jobs, settings, output_dir, workers),
                     key=lambda r: (RUN_KINDS.index(r["run"]), r["seed"]))
    summary = summarise(results)
    cpu_total = sum(r["process_cpu_seconds"] for r in results) + time.process_time()
    report = {"settings": dataclasses.asdict(settings), "seeds": seeds, "quick": quick, "runs": results,
              "summary": {k: {m: list(v) for m, v in d.items()} for k, d in summary.items()},
              "wall_seconds": time.perf_counter() - started, "workers": workers, "cpu_count": os.cpu_count(),
              "load_average_before": load_before, "load_average_after": os.getloadavg(),
              "cpu_seconds_total": cpu_total,
              "torch_threads_per_run": settings.threads}
    with open(os.path.join(output_dir, "msd_results.json"), "w") as fh:
        json.dump(report, fh, indent=2)
    table = markdown_table(summary, settings, seeds)
    with open(os.path.join(output_dir, "msd_results.md"), "w") as fh:
        fh.write(f"# MSD demo: digits with captions, {settings.steps} optimizer steps per run\n\n"
                 f"Seeds {seeds}; mean ± std over seeds. Zero-shot: ELEVATER harness, `digits` task. "
                 f"Probe: {settings.shots}-shot logistic regression on frozen image embeddings.\n\n{table}\n\n"
                 f"Wall time {report['wall_seconds']:.0f} s ({workers} processes x {settings.threads} thread, "
                 f"{os.cpu_count()} CPUs, load average {load_before[0]:.1f} before / {os.getloadavg()[0]:.1f} "
                 f"after); {cpu_total:.0f} CPU-seconds in the parent and run processes.\n")
    from .plots import plot_msd

    plot_msd(report, os.path.join(output_dir, "msd_results.png"))
    print(table)
    print(f"wall time {report['wall_seconds']:.0f} s (load average {load_before[0]:.1f} -> {os.getloadavg()[0]:.1f}), "
          f"{cpu_total:.0f} CPU-seconds in the parent and run processes; "
          f"results in {output_dir}/msd_results.{{json,md,png}}")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vlmdistill demo msd", description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", default="runs/demo-msd")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--quick", action="store_true", help="a few steps on small batches (smoke test)")
    parser.add_argument("--workers", type=int, default=2, help="runs trained at the same time (one process each)")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--runs", nargs="+", choices=RUN_KINDS, default=list(RUN_KINDS))
    args = parser.parse_args(argv)
    overrides = {"steps": args.steps} if args.steps else {}
    run(args.output_dir, args.seeds, args.quick, args.workers, tuple(args.runs), **overrides)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
