"""Does momentum self-distillation help where in-batch negatives matter? (`vlmdistill demo msd`)

A tiny transformers CLIP is trained from scratch on 100 compositional classes of digit pairs ("a 3 next to a 7.",
with ~30% near-duplicate captions that name no digit, as "normal" radiology reports do; `digit_pairs.py`).
Every run of a seed sees the same pairs in the same order (M·b per optimizer step, the same number of steps),
the same initialisation and the same caption draws:

* `clip-b`         plain CLIP loss, batch b, one optimizer step per b pairs (M× the steps: the same pairs);
* `clip-b-accum`   plain CLIP loss, b × M gradient accumulation (each micro-batch contrasted within its b);
* `msd`            `plugin="msd"`, b × M through `msd_step`: every micro-batch is contrasted with the M·b keys of
                   the EMA teacher, with its soft targets (alpha and momentum chosen on the validation split);
* `clip-Mb`        plain CLIP loss on one batch of M·b (the large-batch reference; activation memory of M·b);
* `msd-alpha0`, `msd-queue` (optional, `--runs`): `msd` with hard targets, `msd` with a key queue.

Reported per run, on the test pairs (digits never seen in training): image→text retrieval R@1 among the 100 class
captions, text→image R@1 (a caption's nearest test image is of its class), a 5-shot linear probe on frozen image
embeddings (macro one-vs-rest ROC-AUC, the paper's few-shot metric, and accuracy), memory (resident-set peak
above the state before training, each run in its own process; peak bytes autograd saved for one backward) and
time; paired t-tests over seeds between the arms. `--sweep` trains `msd` over a grid of alpha and momentum and
measures on the validation split only.
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

PRELOAD = ("torch", "transformers", "transformers.models.clip.modeling_clip", "sklearn.linear_model", "sklearn.metrics",
           "scipy.stats", "vlmdistill.plugins.msd", "vlmdistill.eval.experiments.msd")
RUN_KINDS = ("clip-b", "clip-b-accum", "msd", "clip-Mb", "msd-alpha0", "msd-queue")
DEFAULT_RUNS = ("clip-b", "clip-b-accum", "msd")
#: (arm, baseline) pairs compared by paired t-tests over seeds
COMPARISONS = (("msd", "clip-b-accum"), ("msd", "clip-b"), ("clip-b-accum", "clip-b"), ("msd", "clip-Mb"),
               ("msd-alpha0", "clip-b-accum"), ("msd", "msd-alpha0"), ("msd-queue", "msd"))


@dataclasses.dataclass
class Settings:
    steps: int = 100
    micro_batch: int = 8           # b
    accumulation: int = 8          # M
    lr: float = 2e-3
    warmup_steps: int = 10
    shots: int = 5                 # per class, linear probe
    width: int = 64
    layers: int = 2
    alpha: float = 0.2             # chosen on the validation split (`--sweep`; README)
    momentum: float = 0.8          # idem: a 5-step time constant for a 100-step run
    queue_size: int = 256          # 4 macro-batches, ~6% of the 4,000 training pairs (msd-queue only)
    image_size: int = 16           # two 8x8 digits side by side, centred; 4 px patches: 16 patches
    patch_size: int = 4
    threads: int = 1
    split: str = "test"            # where the metrics are measured: "val" chooses hyperparameters


QUICK = dict(steps=12, micro_batch=8, accumulation=4, warmup_steps=2, queue_size=64)
SWEEP = {"alpha": (0.2, 0.5), "momentum": (0.8, 0.95)}
SWEEP_METRIC = "i2t_r1"


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
def prepare_data(image_size: int) -> dict[str, Any]:
    """The digit-pair splits: the same pairs for every run and seed."""
    from .digit_pairs import IMAGE_SIZE, splits

    if image_size != IMAGE_SIZE:
        raise ValueError(f"the digit pairs are {IMAGE_SIZE}x{IMAGE_SIZE} images, not {image_size}")
    return splits()


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
    from .digit_pairs import PairCaptions
    from .msd_recipes import digit_clip

    s = settings
    model = digit_clip(len(tokenizer), tokenizer.eos_token_id, width=s.width, layers=s.layers, seed=seed,
                      image_size=s.image_size, patch_size=s.patch_size)
    dataset = PairCaptions(data["train"], data["train_labels"], tokenizer, seed=seed)
    macro = s.micro_batch * s.accumulation
    batches = _batches(dataset, macro, seed)
    trained = model
    msd = kind.startswith("msd")
    if msd:
        model = vlmdistill.wrap(model, plugin="msd", alpha=0.0 if kind == "msd-alpha0" else s.alpha,
                                alpha_warmup_steps=max(1, s.steps // 5), momentum=s.momentum,
                                queue_size=s.queue_size if kind == "msd-queue" else 0, micro_batch_size=s.micro_batch)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=s.lr, weight_decay=0.1)
    # clip-b takes one optimizer step per micro-batch of the same stream of pairs: M× the steps, same schedule shape
    per_step = s.accumulation if kind == "clip-b" else 1
    scheduler = _schedule(optimizer, s.steps * per_step, s.warmup_steps * per_step)
    saved = SavedActivationPeak(model)
    _warm_up(model, kind, PairCaptions(data["train"], data["train_labels"], tokenizer, seed=10_000 + seed), macro,
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
        micro = [batch] if kind == "clip-Mb" else _split(batch, s.micro_batch)
        steps = [[part] for part in micro] if kind == "clip-b" else [micro]
        for parts in steps:
            total = 0.0
            for part in parts:
                loss = model(**part, return_loss=True).loss / len(parts)
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
    micro = [batch] if kind == "clip-Mb" else _split(batch, micro_batch)
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
@torch.no_grad()
def _embed(model, tokenizer, images=None, captions=None) -> torch.Tensor:
    from vlmdistill.data.digits import normalise_pixels

    def features(out):   # transformers 5 returns the projected features as an output's pooler_output
        return getattr(out, "pooler_output", out).float()

    if images is not None:
        out = torch.cat([features(model.get_image_features(pixel_values=normalise_pixels(chunk)))
                         for chunk in images.split(256)])
    else:
        enc = tokenizer(captions, padding=True, return_tensors="pt")
        out = features(model.get_text_features(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]))
    return torch.nn.functional.normalize(out, dim=-1)


def evaluate(model, tokenizer, data: dict, shots: int, seed: int, split: str = "test") -> dict[str, float]:
    """Retrieval R@1 both ways and a few-shot linear probe (macro ROC-AUC) on `split`."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    from .digit_pairs import CLASSES, SPECIFIC, class_caption

    images, labels = data[split], data[split + "_labels"]
    image_emb = _embed(model, tokenizer, images=images)
    class_emb = _embed(model, tokenizer, captions=[class_caption(c) for c in range(CLASSES)])
    i2t = float(((image_emb @ class_emb.T).argmax(1) == labels).float().mean())
    rng = np.random.default_rng(seed)
    captions = [class_caption(int(c), int(rng.integers(len(SPECIFIC)))) for c in labels]
    caption_emb = _embed(model, tokenizer, captions=captions)
    t2i = float((labels[(caption_emb @ image_emb.T).argmax(1)] == labels).float().mean())
    train_labels = data["train_labels"].numpy()
    picks = np.concatenate([rng.choice(np.flatnonzero(train_labels == c), shots, replace=False)
                            for c in range(CLASSES)])
    probe = LogisticRegression(max_iter=2000, C=10.0)
    probe.fit(_embed(model, tokenizer, images=data["train"][picks]).numpy(), train_labels[picks])
    scores = probe.predict_proba(image_emb.numpy())
    return {"i2t_r1": i2t, "t2i_r1": t2i,
            "probe_auc": float(roc_auc_score(labels.numpy(), scores, multi_class="ovr", average="macro")),
            "probe_acc": float((scores.argmax(1) == labels.numpy()).mean())}


# ----------------------------------------------------------------------------- one run, one process
def run_one(kind: str, settings: dict, seed: int) -> dict[str, Any]:
    """Train and evaluate one run (meant for a fresh process, so that its memory peak is its own)."""

    from .digit_pairs import caption_tokenizer

    s = Settings(**settings)
    torch.set_num_threads(s.threads)
    data = prepare_data(s.image_size)
    tokenizer = caption_tokenizer()
    result = train_run(kind, s, data, tokenizer, seed)
    metrics = evaluate(result["model"], tokenizer, data, s.shots, seed, s.split)
    losses = result["losses"]
    return {"run": kind, "seed": seed, "split": s.split, "alpha": s.alpha, "momentum": s.momentum, **metrics,
            "peak_rss_mb": result["peak_rss_mb"], "saved_activations_mb": result["saved_activations_mb"],
            "train_seconds": result["train_seconds"], "train_cpu_seconds": result["train_cpu_seconds"],
            "first_loss": losses[0], "last_loss": statistics.fmean(losses[-10:]),
            "process_cpu_seconds": time.process_time()}   # the whole run: set-up, training, evaluation


def _child(kind, settings, seed, queue):
    try:
        queue.put(run_one(kind, settings, seed))
    except BaseException as exc:  # report, do not hang the parent
        queue.put({"run": kind, "seed": seed, "error": f"{type(exc).__name__}: {exc}"})
        raise


def run_in_processes(jobs: list[tuple[str, int, Settings]], workers: int, progress: bool = True) -> list[dict]:
    """Each (kind, seed, settings) in its own spawned process, `workers` at a time."""
    import queue as queue_module

    # A fork server that has imported the heavy modules once: each run starts in a fresh process (its
    # memory peak is its own) without paying the imports again.
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(list(PRELOAD))
    queue = context.Queue()
    pending, processes, results = list(jobs), [], []
    while len(results) < len(jobs):
        while pending and len(processes) - len(results) < workers:
            kind, seed, settings = pending.pop(0)
            process = context.Process(target=_child, args=(kind, dataclasses.asdict(settings), seed, queue))
            process.start()
            processes.append(process)
        try:
            result = queue.get(timeout=5)
        except queue_module.Empty:
            dead = [p for p in processes if p.exitcode not in (None, 0)]
            if dead and queue.empty():
                raise RuntimeError(f"a run process died with exit code {dead[0].exitcode} "
                                   "and reported nothing") from None
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
METRICS = (("i2t_r1", "image→text R@1", 100), ("t2i_r1", "text→image R@1", 100), ("probe_auc", "5-shot AUC", 100),
           ("probe_acc", "5-shot acc", 100), ("peak_rss_mb", "peak RSS MB", 1),
           ("saved_activations_mb", "saved act. MB", 1), ("train_cpu_seconds", "train CPU s", 1))
COMPARED = ("i2t_r1", "t2i_r1", "probe_auc")


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


def paired_tests(results: list[dict]) -> list[dict]:
    """Arm minus baseline per seed (both runs of a seed saw the same pairs and started from the same weights):
    mean ± std of the differences and a two-sided paired t-test."""
    from scipy import stats

    by = {(r["run"], r["seed"]): r for r in results}
    tests = []
    for arm, baseline in COMPARISONS:
        seeds = sorted(seed for (kind, seed) in by if kind == arm and (baseline, seed) in by)
        if len(seeds) < 2:
            continue
        for metric in COMPARED:
            diffs = [by[arm, s][metric] - by[baseline, s][metric] for s in seeds]
            std = statistics.stdev(diffs)
            t, p = (stats.ttest_rel([by[arm, s][metric] for s in seeds], [by[baseline, s][metric] for s in seeds])
                    if std > 0 else (float("nan"), float("nan")))
            tests.append({"arm": arm, "baseline": baseline, "metric": metric, "seeds": seeds,
                          "mean_diff": statistics.fmean(diffs), "std_diff": std, "t": float(t), "p": float(p),
                          "wins": sum(d > 0 for d in diffs)})
    return tests


def _labels(settings: Settings) -> dict[str, str]:
    b, m = settings.micro_batch, settings.accumulation
    return {"clip-b": f"CLIP, batch {b} ({m}× the steps)", "clip-b-accum": f"CLIP, {b} x {m} accumulation",
            "msd": f"MSD, {b} x {m}", "clip-Mb": f"CLIP, batch {b * m} (reference)",
            "msd-alpha0": f"MSD, {b} x {m}, alpha 0", "msd-queue": f"MSD, {b} x {m}, queue {settings.queue_size}"}


def markdown_table(summary: dict, settings: Settings, seeds: list[int]) -> str:
    labels = _labels(settings)
    lines = ["| run | " + " | ".join(name for _, name, _ in METRICS) + " |", "|" + "---|" * (len(METRICS) + 1)]
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


def tests_table(tests: list[dict], settings: Settings) -> str:
    labels, names = _labels(settings), {key: name for key, name, _ in METRICS}
    lines = ["| arm − baseline | metric | mean diff (points) | seeds better | paired t | p |",
             "|---|---|---|---|---|---|"]
    for t in tests:
        lines.append(f"| {labels[t['arm']]} − {labels[t['baseline']]} | {names[t['metric']]} | "
                     f"{100 * t['mean_diff']:+.1f} ± {100 * t['std_diff']:.1f} | {t['wins']}/{len(t['seeds'])} | "
                     f"{t['t']:.2f} | {t['p']:.3f} |")
    return "\n".join(lines)


def _machine_note(started: float, load_before, cpu_total: float, workers: int, threads: int) -> str:
    return (f"Wall time {time.perf_counter() - started:.0f} s ({workers} processes x {threads} thread, "
            f"{os.cpu_count()} CPUs, load average {load_before[0]:.1f} before / {os.getloadavg()[0]:.1f} after); "
            f"{cpu_total:.0f} CPU-seconds in the parent and run processes.")


def run(output_dir: str, seeds: list[int], quick: bool = False, workers: int = 2,
        kinds: tuple[str, ...] = DEFAULT_RUNS, **overrides) -> dict:
    settings = Settings(**{**(QUICK if quick else {}), **overrides, "split": "test"})
    os.makedirs(output_dir, exist_ok=True)
    started, load_before = time.perf_counter(), os.getloadavg()
    jobs = [(kind, seed, settings) for seed in seeds for kind in kinds]
    results = sorted(run_in_processes(jobs, workers), key=lambda r: (RUN_KINDS.index(r["run"]), r["seed"]))
    summary, tests = summarise(results), paired_tests(results)
    cpu_total = sum(r["process_cpu_seconds"] for r in results) + time.process_time()
    report = {"settings": dataclasses.asdict(settings), "seeds": seeds, "quick": quick, "runs": results,
              "summary": {k: {m: list(v) for m, v in d.items()} for k, d in summary.items()}, "paired_tests": tests,
              "wall_seconds": time.perf_counter() - started, "workers": workers, "cpu_count": os.cpu_count(),
              "load_average_before": load_before, "load_average_after": os.getloadavg(),
              "cpu_seconds_total": cpu_total, "torch_threads_per_run": settings.threads}
    with open(os.path.join(output_dir, "results.json"), "w") as fh:
        json.dump(report, fh, indent=2)
    table, significance = markdown_table(summary, settings, seeds), tests_table(tests, settings)
    note = _machine_note(started, load_before, cpu_total, workers, settings.threads)
    with open(os.path.join(output_dir, "results.md"), "w") as fh:
        fh.write(f"# MSD demo: 100 digit-pair classes, {settings.steps} optimizer steps of "
                 f"{settings.micro_batch} x {settings.accumulation} pairs\n\n"
                 f"Test split; seeds {seeds}; mean ± std over seeds. alpha {settings.alpha}, momentum "
                 f"{settings.momentum}.\n\n{table}\n\nPaired over seeds:\n\n{significance}\n\n{note}\n")
    from .plots import plot_msd

    plot_msd(report, os.path.join(output_dir, "results.png"))
    print(table, significance, note, f"results in {output_dir}/results.{{json,md,png}}", sep="\n\n")
    return report


def sweep(output_dir: str, seeds: list[int], quick: bool = False, workers: int = 2, **overrides) -> dict:
    """`msd` over the alpha × momentum grid, measured on the validation split only; the best mean `SWEEP_METRIC`
    is the setting to use on the test split."""
    base = {**(QUICK if quick else {}), **overrides, "split": "val"}
    grid = [dict(alpha=a, momentum=m) for a in SWEEP["alpha"] for m in SWEEP["momentum"]]
    os.makedirs(output_dir, exist_ok=True)
    started, load_before = time.perf_counter(), os.getloadavg()
    jobs = [("msd", seed, Settings(**{**base, **point})) for point in grid for seed in seeds]
    results = run_in_processes(jobs, workers)
    rows = []
    for point in grid:
        runs = [r for r in results if r["alpha"] == point["alpha"] and r["momentum"] == point["momentum"]]
        rows.append({**point, **{key: statistics.fmean(r[key] for r in runs) for key in COMPARED}})
    best = max(rows, key=lambda row: row[SWEEP_METRIC])
    cpu_total = sum(r["process_cpu_seconds"] for r in results) + time.process_time()
    report = {"settings": base, "seeds": seeds, "grid": rows, "best": best, "runs": results,
              "wall_seconds": time.perf_counter() - started, "cpu_seconds_total": cpu_total}
    with open(os.path.join(output_dir, "msd_sweep.json"), "w") as fh:
        json.dump(report, fh, indent=2)
    names = {key: name for key, name, _ in METRICS}
    lines = ["| alpha | momentum | " + " | ".join(names[k] for k in COMPARED) + " |",
             "|---|---|" + "---|" * len(COMPARED)]
    lines += [f"| {row['alpha']} | {row['momentum']} | " + " | ".join(f"{100 * row[k]:.1f}" for k in COMPARED) + " |"
              for row in rows]
    table = "\n".join(lines)
    note = _machine_note(started, load_before, cpu_total, workers, 1)
    with open(os.path.join(output_dir, "msd_sweep.md"), "w") as fh:
        fh.write(f"# MSD sweep on the validation split, seeds {seeds}, mean over seeds\n\n{table}\n\n"
                 f"Best ({names[SWEEP_METRIC]}): alpha {best['alpha']}, momentum {best['momentum']}.\n\n{note}\n")
    print(table, f"best ({names[SWEEP_METRIC]}): alpha {best['alpha']}, momentum {best['momentum']}", note, sep="\n\n")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vlmdistill demo msd", description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", default="runs/demo-msd")
    parser.add_argument("--seeds", type=int, nargs="+", default=None,
                        help="default: 0-4 (the table), 100 with --sweep (a seed of its own)")
    parser.add_argument("--quick", action="store_true", help="a few steps on small batches (smoke test)")
    parser.add_argument("--workers", type=int, default=2, help="runs trained at the same time (one process each)")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--alpha", type=float, default=None)
    parser.add_argument("--momentum", type=float, default=None)
    parser.add_argument("--runs", nargs="+", choices=RUN_KINDS, default=list(DEFAULT_RUNS))
    parser.add_argument("--sweep", action="store_true",
                        help=f"msd over alpha {SWEEP['alpha']} x momentum {SWEEP['momentum']} on the validation split")
    args = parser.parse_args(argv)
    overrides = {k: v for k, v in (("steps", args.steps), ("alpha", args.alpha), ("momentum", args.momentum))
                 if v is not None}
    if args.sweep:
        sweep(args.output_dir, args.seeds or [100], args.quick, args.workers, **overrides)
    else:
        run(args.output_dir, args.seeds or [0, 1, 2, 3, 4], args.quick, args.workers, tuple(args.runs), **overrides)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
