"""Command line: `vlmdistill eval elevater ...` (wired by the core CLI through `add_elevater_parser`)
and `python -m vlmdistill.eval.elevater ...`."""

from __future__ import annotations

import argparse
import os
import sys

from vlmdistill.errors import ConfigError, DataError, VLMDistillError

from .protocol import PROTOCOLS
from .readers import FORMATS
from .tasks import ELEVATER_IC20, TaskSpec


def _configure(parser: argparse.ArgumentParser) -> None:
    model = parser.add_argument_group("model")
    model.add_argument("--model", required=True,
                       help="open_clip architecture name, a folder with open_clip_config.json, or a transformers "
                            "CLIP/AltCLIP/ChineseCLIP/SigLIP folder")
    model.add_argument("--pretrained", help="local open_clip checkpoint (.pt/.bin/.safetensors); never downloaded")
    model.add_argument("--model-config", help="json of a custom open_clip architecture, registered under --model")
    model.add_argument("--model-kind", default="auto", choices=["auto", "open_clip", "hf"])
    data = parser.add_argument_group("data")
    data.add_argument("--data-root", required=True,
                      help="folder holding one sub-folder per dataset (or one dataset folder with one --datasets)")
    data.add_argument("--datasets", default=None,
                      help="comma-separated names, each optionally NAME=PATH (default: every registered dataset "
                           "found under --data-root)")
    data.add_argument("--format", default="auto", choices=["auto", *FORMATS])
    data.add_argument("--split", default="test")
    data.add_argument("--classnames-file", help="class names, one a line (e.g. label_cn.txt); for one dataset")
    data.add_argument("--tasks-yaml", help="YAML file of custom tasks (tasks: {name: {classnames, templates, ...}})")
    run = parser.add_argument_group("protocol and run")
    run.add_argument("--protocol", default="elevater", choices=sorted(PROTOCOLS))
    run.add_argument("--language", choices=["en", "zh"], help="override the protocol's language")
    run.add_argument("--image-size", type=int, help="override the input size (default: the model's)")
    run.add_argument("--batch-size", type=int, default=64)
    run.add_argument("--device", default="cpu")
    run.add_argument("--num-workers", type=int, default=0)
    run.add_argument("--output-dir", default="runs/elevater")
    run.add_argument("--cache-dir", help="classifier cache (default: <output-dir>/classifier_cache)")
    run.add_argument("--save-predictions", action="store_true", help="also write the toolkit's prediction files")
    run.add_argument("--no-plot", action="store_true")
    run.add_argument("--no-progress", action="store_true")


def add_elevater_parser(subparsers) -> argparse.ArgumentParser:
    """Add the `elevater` sub-command to the `eval` command's subparsers."""
    parser = subparsers.add_parser("elevater", help="ELEVATER zero-shot image classification",
                                   description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _configure(parser)
    parser.set_defaults(func=run_elevater)
    return parser


def add_demo_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("demo", help="build demo datasets, train a tiny CLIP, evaluate it")
    parser.add_argument("--out", default="runs/elevater_demo")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true")
    parser.set_defaults(func=run_demo_command)
    return parser


# ------------------------------------------------------------------ resolution of datasets

def _dataset_folder(root: str, name: str, spec: TaskSpec | None) -> str | None:
    candidates = [os.path.join(root, name)]
    if spec is not None and spec.root_folder:
        candidates += [os.path.join(root, spec.root_folder), os.path.join(root, os.path.basename(spec.root_folder))]
    return next((c for c in candidates if os.path.isdir(c)), None)


def _requested(args, registered: set[str]) -> list[tuple[str, str]]:
    """(name, folder) pairs to evaluate."""
    from .tasks import get_task

    if args.datasets:
        pairs = []
        for item in args.datasets.split(","):
            name, _, path = item.strip().partition("=")
            spec = get_task(name) if name in registered else None
            folder = path or _dataset_folder(args.data_root, name, spec)
            if folder is None:
                folder = args.data_root if len(args.datasets.split(",")) == 1 else None
            if folder is None or not os.path.exists(folder):
                raise DataError(f"no folder for dataset {name!r} under {args.data_root}")
            pairs.append((name, folder))
        return pairs
    pairs = []
    for name in [*ELEVATER_IC20, "imagenet-1k", *sorted(registered - set(ELEVATER_IC20) - {"imagenet-1k"})]:
        folder = _dataset_folder(args.data_root, name, get_task(name) if name in registered else None)
        if folder:
            pairs.append((name, folder))
    if not pairs:
        raise DataError(f"no registered dataset found under {args.data_root}; name them with --datasets")
    return pairs


def _task_for(name: str, folder: str, data, args, protocol, registered: set[str]) -> TaskSpec:
    from .tasks import get_task

    language = protocol.language
    classnames_file = args.classnames_file
    if classnames_file is None and language == "zh":
        local = os.path.join(folder if os.path.isdir(folder) else os.path.dirname(folder), "label_cn.txt")
        classnames_file = local if os.path.isfile(local) else None
    if name in registered:
        if language == "zh" and classnames_file is None and name != "imagenet-1k":
            raise ConfigError(f"{name}: Chinese class names needed: put label_cn.txt in {folder} or pass "
                              f"--classnames-file")
        return get_task(name, language, classnames_file=classnames_file, zh_source=protocol.zh_source)
    # an unregistered dataset described by its own files (e.g. a CLIP_benchmark webdataset)
    if data.classnames is None:
        raise ConfigError(f"{name} is not a registered task and its data names no classes; use --tasks-yaml")
    from .tasks import read_classnames_file

    classnames = read_classnames_file(classnames_file) if classnames_file else data.classnames
    return TaskSpec(name=name, classnames=tuple(classnames), templates=tuple(data.templates or ["a photo of a {}."]),
                    multilabel=data.multilabel, language=language)


def run_elevater(args) -> int:
    import torch

    from .adapters import load_model
    from .protocol import get_protocol
    from .readers import read_dataset
    from .report import load_results, plot_results, write_result_json, write_summary
    from .runner import evaluate_zero_shot
    from .tasks import custom_task, get_task, load_custom_tasks, registered_names

    if args.tasks_yaml:
        load_custom_tasks(args.tasks_yaml)
    registered = set(registered_names())
    protocol = get_protocol(args.protocol, language=args.language, image_size=args.image_size)
    pairs = _requested(args, registered)
    if args.classnames_file and len(pairs) > 1:
        raise ConfigError("--classnames-file applies to a single dataset; name one with --datasets")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {args.device} requested but CUDA is not available")
    model = load_model(args.model, pretrained=args.pretrained, model_config=args.model_config,
                       kind=args.model_kind, device=args.device)
    cache_dir = args.cache_dir or os.path.join(args.output_dir, "classifier_cache")
    results = []
    for name, folder in pairs:
        spec = custom_task(name) or (get_task(name) if name in registered else None)
        index_file = None
        if spec is not None and spec.splits.get(args.split) and args.format in ("auto", "iris", "coco"):
            candidate = spec.splits[args.split]
            index_file = candidate if os.path.isfile(os.path.join(folder, candidate)) else None
        data = read_dataset(folder, args.format, split=args.split, index_file=index_file,
                            labelmap=spec.labelmap if spec is not None else None,
                            multilabel=bool(spec and spec.multilabel))
        task = _task_for(name, folder, data, args, protocol, registered)
        predictions = None
        if args.save_predictions:
            predictions = os.path.join(args.output_dir, "predictions",
                                       f"{name}_{task.language}_{protocol.name}_predictions.json")
        result = evaluate_zero_shot(model, task, data, protocol, batch_size=args.batch_size, device=args.device,
                                    num_workers=args.num_workers, cache_dir=cache_dir,
                                    predictions_path=predictions, progress=not args.no_progress)
        path = write_result_json(result, os.path.join(args.output_dir, "results"))
        results.append(result)
        print(f"{name:<34} {task.language} {result['primary_metric']:>22} = {100 * result['primary_value']:6.2f}"
              f"  ({result['num_samples']} images, {result['runtime_s']['total']:.1f}s)  -> {path}")
    # the summary covers every result in the output folder, so English and Chinese runs (or several
    # models) written to one folder end up in one table and one chart
    results_dir = os.path.join(args.output_dir, "results")
    everything = load_results(sorted(os.path.join(results_dir, f) for f in os.listdir(results_dir)
                                     if f.endswith(".json")))
    csv_path, md_path = write_summary(everything, args.output_dir)
    print(f"summary: {csv_path}, {md_path}")
    if not args.no_plot:
        print(f"chart: {plot_results(everything, os.path.join(args.output_dir, 'zero_shot.png'))}")
    return 0


def run_demo_command(args) -> int:
    from .demo import run_demo
    from .report import summary_rows

    results = run_demo(args.out, steps=args.steps, seed=args.seed, progress=not args.no_progress)
    for row in summary_rows(results):
        print(f"{row['model']:<22} {row['language']} {row['dataset']:<30} {row['metric']:<22} {row['score']:>6}")
    print(f"results in {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m vlmdistill.eval.elevater")
    subparsers = parser.add_subparsers(dest="command")
    add_elevater_parser(subparsers)
    add_demo_parser(subparsers)
    if not argv or argv[0] not in ("elevater", "demo", "-h", "--help"):
        argv = ["elevater", *argv]   # the evaluation is the default command
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except VLMDistillError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
