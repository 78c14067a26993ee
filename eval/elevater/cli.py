"""Command line: `vlmdistill eval elevater ...` (wired by the core CLI through `add_elevater_parser`)
and `python -m vlmdistill.eval.elevater ...`. Only argparse and the registry's json are imported
until a command runs, so `--help` does not wait for torch."""

from __future__ import annotations

import argparse
import difflib
import functools
import os
import re
import sys

from vlmdistill.errors import ConfigError, DataError, VLMDistillError

from .protocol import PROTOCOLS
from .readers import FORMATS
from .tasks import TaskSpec

DESCRIPTION = """\
Zero-shot image classification on the 20 ELEVATER datasets (and ImageNet-1k), offline, with the
toolkit's protocol: its class names, prompt templates, per-dataset image transform and metrics.
Every dataset is checked before the model is loaded; a dataset that fails while it is evaluated is
reported and the others are still summarised. Results of several runs (models, checkpoints,
protocols) written to one --output-dir are compared side by side in summary.md and zero_shot.png.

examples:
  %(prog)s --model ViT-B-32-quickgelu --pretrained vitb32.pt --data-root /data/elevater
  %(prog)s --model /models/student --data-root /data/elevater --datasets cifar-10,kitti-distance
  %(prog)s --model /models/cn-clip --protocol cnclip_zh --datasets cifar-10=/data/elevater_cn/cifar10
"""


def _epilog() -> str:
    from .tasks import get_task, list_tasks

    lines = ["registered datasets: NAME, ELEVATER metric, classes, and the toolkit's folder; under --data-root a",
             "dataset's folder is named NAME, as the toolkit's folder, or as that folder's last component:"]
    for name in list_tasks():
        spec = get_task(name)
        note = "" if spec.in_benchmark else "  [reference, not averaged]"
        crop = "" if spec.center_crop else "  [no centre crop]"
        lines.append(f"  {name:<32} {spec.metric:<15} {spec.num_classes:>4}  {spec.root_folder}{note}{crop}")
    lines += ["", "other data: NAME=PATH with a CLIP_benchmark webdataset (classnames.txt and templates), or a task",
              "described in --tasks-yaml. The demo (tiny CLIP trained on shipped images): `... demo --help`."]
    return "\n".join(lines)


def _configure(parser: argparse.ArgumentParser) -> None:
    model = parser.add_argument_group("model")
    model.add_argument("--model", required=True, metavar="SPEC",
                       help="open_clip architecture name (with --pretrained), a folder with open_clip_config.json and "
                            "weights, or a transformers CLIP/AltCLIP/ChineseCLIP/SigLIP folder")
    model.add_argument("--pretrained", metavar="FILE",
                       help="local open_clip checkpoint (.pt, .bin, .safetensors) for an architecture name; tags such "
                            "as 'openai' are refused, nothing is downloaded")
    model.add_argument("--random-weights", action="store_true",
                       help="evaluate randomly initialised weights (seed 0) instead of refusing a model that has no "
                            "weights")
    model.add_argument("--model-config", metavar="JSON",
                       help="json of a custom open_clip architecture (embed_dim, vision_cfg, text_cfg), registered "
                            "under the --model name")
    model.add_argument("--model-kind", default="auto", choices=["auto", "open_clip", "hf"],
                       help="how to read --model: auto (default) takes a folder with config.json as transformers and "
                            "anything else as open_clip")
    model.add_argument("--run-label", metavar="NAME",
                       help="name of this run in result files, summary and chart (default: the checkpoint's name and "
                            "a short hash of its weights and the protocol)")
    data = parser.add_argument_group("data")
    data.add_argument("--data-root", metavar="DIR",
                      help="folder holding one sub-folder per dataset, named as below (needed unless every "
                           "--datasets entry is NAME=PATH)")
    data.add_argument("--datasets", metavar="LIST",
                      help="comma-separated dataset names from the list below, each optionally NAME=PATH (default: "
                           "every registered dataset found under --data-root)")
    data.add_argument("--format", default="auto", choices=["auto", *FORMATS],
                      help="data layout (default: auto, detected from the files)")
    data.add_argument("--split", default="test",
                      help="split to evaluate (default: test); the registry knows each dataset's index file per split")
    data.add_argument("--classnames-file", metavar="FILE",
                      help="class names one a line (e.g. label_cn.txt) for a single dataset; Chinese runs pick up a "
                           "label_cn.txt next to the data by themselves")
    data.add_argument("--tasks-yaml", metavar="FILE",
                      help="YAML of custom tasks: tasks: {NAME: {classnames or classnames_file, templates, metric, "
                           "multilabel, center_crop, templates_zh, classnames_zh}}")
    run = parser.add_argument_group("protocol and run")
    run.add_argument("--protocol", default="elevater", choices=sorted(PROTOCOLS),
                     help="elevater (default): the toolkit's protocol; clip_benchmark: the model's own "
                          "preprocessing and raw logits; cnclip_zh: Chinese-CLIP's Chinese prompts, top-1 reported")
    run.add_argument("--language", choices=["en", "zh"],
                     help="prompt language (default: the protocol's, zh for cnclip_zh, en otherwise)")
    run.add_argument("--image-size", type=int, metavar="PIXELS",
                     help="input size (default: the model's input size; the toolkit uses 224, the size of every "
                          "ELEVATER reference model)")
    run.add_argument("--batch-size", type=int, default=64, metavar="N", help="images per forward pass (default: 64)")
    run.add_argument("--device", default="cpu", metavar="DEVICE",
                     help="torch device, e.g. cuda or cuda:1 (default: cpu)")
    run.add_argument("--num-workers", type=int, default=0, metavar="N",
                     help="DataLoader processes decoding images (default: 0, decode in the main process)")
    run.add_argument("--output-dir", default="runs/elevater", metavar="DIR",
                     help="folder for results/, predictions/, summary.csv, summary.md and zero_shot.png (default: "
                          "runs/elevater)")
    run.add_argument("--cache-dir", metavar="DIR",
                     help="classifier cache (default: <output-dir>/classifier_cache)")
    run.add_argument("--save-predictions", action="store_true",
                     help="also write the toolkit's prediction file per dataset, in "
                          "predictions/<run label>__<language>/<dataset>.json: each such folder is what the toolkit's "
                          "prepare_submit --combine_path takes")
    run.add_argument("--overwrite", action="store_true",
                     help="replace the results (and predictions) of the same run label instead of refusing")
    run.add_argument("--no-plot", action="store_true", help="do not draw zero_shot.png")
    run.add_argument("--no-progress", action="store_true", help="no progress bars")


def _parser_kwargs(prog: str | None = None) -> dict:
    kwargs = {"description": DESCRIPTION, "epilog": _epilog(), "formatter_class": argparse.RawDescriptionHelpFormatter}
    return {**kwargs, "prog": prog} if prog else kwargs


def add_elevater_parser(subparsers) -> argparse.ArgumentParser:
    """Add the `elevater` sub-command to the `eval` command's subparsers."""
    parser = subparsers.add_parser("elevater", help="ELEVATER zero-shot image classification", **_parser_kwargs())
    _configure(parser)
    parser.set_defaults(func=run_elevater)
    return parser


def _demo_parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description="Build three small test sets in ELEVATER formats from images that ship with "
                               "scikit-learn and scikit-image, train a tiny CLIP on CPU, and evaluate it untrained and "
                               "trained, in English and Chinese.")
    parser.add_argument("--out", default="runs/elevater_demo", metavar="DIR",
                        help="output folder (default: runs/elevater_demo)")
    parser.add_argument("--steps", type=int, default=300, help="training steps (default: 300)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.set_defaults(func=run_demo_command)
    return parser


# ------------------------------------------------------------------ which datasets

def _normalised(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


@functools.lru_cache(maxsize=1)
def _aliases() -> dict[str, str]:
    """Spellings that mean a registered dataset: the toolkit's config and folder names, no punctuation."""
    import json

    from .tasks import data_file

    aliases = {}
    entries = json.loads(data_file("elevater_ic_en_tasks.json").read_text(encoding="utf-8"))["datasets"]
    for name, entry in entries.items():
        folder = os.path.basename(entry.get("root_folder") or "")
        for alias in (name, os.path.splitext(entry.get("config_file") or "")[0], re.sub(r"_\d{8}$", "", folder)):
            if alias:
                aliases[_normalised(alias)] = name
    return aliases


def _unknown_dataset(name: str, registered: list[str]) -> str:
    """The message for a dataset name that is not registered, with the name it most likely meant."""
    meant = _aliases().get(_normalised(name)) or next(iter(difflib.get_close_matches(name, registered, 1, 0.75)), None)
    hint = f"did you mean {meant!r}? " if meant else ""
    return f"unknown dataset {name!r}: {hint}registered: {', '.join(registered)}"


def _dataset_folder(root: str, name: str, spec: TaskSpec | None) -> tuple[str | None, list[str]]:
    candidates = [os.path.join(root, name)]
    if spec is not None and spec.root_folder:
        candidates += [os.path.join(root, spec.root_folder), os.path.join(root, os.path.basename(spec.root_folder))]
    return next((c for c in candidates if os.path.isdir(c)), None), candidates


def _requested(args, registered: list[str]) -> tuple[list[tuple[str, str]], list[str]]:
    """(name, folder) pairs to evaluate, and one message per entry that cannot be (all of them, not
    the first only, so that one run of the command shows everything to fix)."""
    from .tasks import get_task

    if args.data_root is not None and not os.path.isdir(args.data_root):
        return [], [f"--data-root {args.data_root} does not exist" if not os.path.exists(args.data_root)
                    else f"--data-root {args.data_root} is not a folder"]
    pairs, problems = [], []
    if not args.datasets:
        if args.data_root is None:
            return [], ["pass --data-root (a folder of datasets) or --datasets NAME=PATH,..."]
        for name in registered:
            folder, _ = _dataset_folder(args.data_root, name, get_task(name))
            if folder:
                pairs.append((name, folder))
        if not pairs:
            problems.append(f"no registered dataset found under {args.data_root}: its sub-folders must be named as "
                            f"in `--help` (e.g. cifar-10 or classification/cifar_10_20211007); or name them with "
                            f"--datasets NAME=PATH")
        return pairs, problems
    items = [item.strip() for item in args.datasets.split(",")]
    for item in items:
        name, has_path, path = item.partition("=")
        name, path = name.strip(), path.strip()
        if not name or (has_path and not path):
            problems.append(f"--datasets entry {item!r}: expected NAME or NAME=PATH")
            continue
        if any(name == seen for seen, _ in pairs):
            problems.append(f"--datasets names {name!r} twice")
            continue
        if name not in registered and (not has_path or _aliases().get(_normalised(name))
                                       or difflib.get_close_matches(name, registered, 1, 0.75)):
            # a near-miss of a registered name is a typo, not a new dataset: it would silently lose the
            # registry's class names and templates
            problems.append(_unknown_dataset(name, registered) + (
                "; a dataset of your own needs a name of its own (NAME=PATH) or a --tasks-yaml entry"
                if has_path else "; a dataset of your own: NAME=PATH, or --tasks-yaml"))
            continue
        if has_path:
            if not os.path.exists(path):
                problems.append(f"dataset {name}: {path} does not exist")
                continue
            pairs.append((name, path))
            continue
        if args.data_root is None:
            problems.append(f"dataset {name}: no --data-root to look in; pass --data-root or {name}=PATH")
            continue
        folder, candidates = _dataset_folder(args.data_root, name, get_task(name))
        if folder is None and len(items) == 1 and _holds_a_dataset(args.data_root, args.split):
            folder = args.data_root   # --data-root is the dataset's own folder
        if folder is None:
            problems.append(f"dataset {name}: no folder under {args.data_root} (looked for "
                            f"{', '.join(os.path.relpath(c, args.data_root) for c in candidates)})")
            continue
        pairs.append((name, folder))
    return pairs, problems


def _holds_a_dataset(folder: str, split: str) -> bool:
    from .readers import detect_format

    try:
        detect_format(folder, split=split)
    except DataError:
        return False
    return True


# ------------------------------------------------------------------ one dataset: data and task

def _task_for(name: str, folder: str, data, args, protocol, registered: list[str]) -> TaskSpec:
    from .tasks import get_task, read_classnames_file

    language = protocol.language
    classnames_file = args.classnames_file
    if classnames_file is None and language == "zh":
        local = os.path.join(folder if os.path.isdir(folder) else os.path.dirname(folder), "label_cn.txt")
        classnames_file = local if os.path.isfile(local) else None
    if name in registered:
        if language == "zh" and classnames_file is None and name != "imagenet-1k":
            raise ConfigError(f"Chinese class names needed: put label_cn.txt in {folder} or pass --classnames-file")
        return get_task(name, language, classnames_file=classnames_file, zh_source=protocol.zh_source)
    # a dataset of the user's own, described by its files (a CLIP_benchmark webdataset)
    if data.classnames is None or not data.templates:
        raise ConfigError(f"{name} is not a registered dataset and its data does not name its classes and prompt "
                          f"templates (a CLIP_benchmark webdataset has classnames.txt and "
                          f"zeroshot_classification_templates.txt); describe it in --tasks-yaml")
    classnames = read_classnames_file(classnames_file) if classnames_file else data.classnames
    return TaskSpec(name=name, classnames=tuple(classnames), templates=tuple(data.templates),
                    multilabel=data.multilabel, language=language)


def _prepare(name: str, folder: str, args, protocol, registered: list[str]):
    """(task, data) of one dataset: index read, every image and label checked, class names resolved."""
    from .readers import read_dataset
    from .tasks import custom_task, get_task

    spec = custom_task(name) or (get_task(name) if name in registered else None)
    index_file = None
    if spec is not None and spec.splits.get(args.split) and args.format in ("auto", "iris", "coco"):
        candidate = spec.splits[args.split]
        index_file = candidate if os.path.isfile(os.path.join(folder, candidate)) else None
    data = read_dataset(folder, args.format, split=args.split, index_file=index_file,
                        labelmap=spec.labelmap if spec is not None else None,
                        multilabel=bool(spec and spec.multilabel))
    task = _task_for(name, folder, data, args, protocol, registered)
    if len(data) == 0:
        raise DataError(f"{folder} holds no images for split {args.split!r}")
    data.check_labels(task.num_classes)
    return task, data


# ------------------------------------------------------------------ the command

def _fail(problems: list[str], what: str) -> int:
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    print(f"{what}; nothing was evaluated", file=sys.stderr)
    return 2


def run_elevater(args) -> int:
    from .protocol import get_protocol
    from .tasks import load_custom_tasks, registered_names

    if args.random_weights and args.pretrained:
        raise ConfigError("--pretrained and --random-weights contradict each other; pass one of them")
    if args.run_label is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", args.run_label):
        raise ConfigError(f"--run-label {args.run_label!r}: use letters, digits, '.', '_' and '-' only")
    if args.tasks_yaml:
        load_custom_tasks(args.tasks_yaml)
    protocol = get_protocol(args.protocol, language=args.language, image_size=args.image_size)
    if args.save_predictions and protocol.scores != "softmax100":
        raise ConfigError(f"--save-predictions writes the toolkit's probability files, but protocol {protocol.name!r} "
                          f"scores with raw logits; use --protocol elevater (or cnclip_zh)")
    registered = registered_names()
    pairs, problems = _requested(args, registered)
    if args.classnames_file and len(pairs) + len(problems) > 1:
        problems.append("--classnames-file applies to a single dataset; name one with --datasets")
    prepared = []
    for name, folder in pairs:   # every dataset is read and checked before any model time is spent
        try:
            prepared.append((name, *_prepare(name, folder, args, protocol, registered)))
        except VLMDistillError as exc:
            problems.append(f"dataset {name} ({folder}): {exc}")
    if problems:
        return _fail(problems, f"{len(problems)} problem(s) with the data or options")
    return _evaluate(args, protocol, prepared)


def _evaluate(args, protocol, prepared: list) -> int:
    import torch

    from .adapters import load_model
    from .report import (default_run_label, load_results, plot_results, predictions_path, result_filename,
                         write_result_json, write_summary)
    from .runner import evaluate_zero_shot

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {args.device} requested but CUDA is not available")
    if args.random_weights:
        torch.manual_seed(0)
    model = load_model(args.model, pretrained=args.pretrained, model_config=args.model_config, kind=args.model_kind,
                       device=args.device, random_weights=args.random_weights)
    fingerprint = model.pin_fingerprint()
    label = args.run_label or default_run_label(model.name, model.pretrained, fingerprint, protocol.as_dict(),
                                                args.random_weights)
    results_dir = os.path.join(args.output_dir, "results")
    planned = {}
    for name, task, _ in prepared:
        outputs = [os.path.join(results_dir, result_filename({"run_label": label, "dataset": name,
                                                              "language": task.language}))]
        if args.save_predictions:
            outputs.append(predictions_path(args.output_dir, label, task.language, name))
        planned[name] = outputs
    existing = [path for outputs in planned.values() for path in outputs if os.path.exists(path)]
    if existing and not args.overwrite:
        return _fail([f"{path} exists" for path in existing],
                     f"run {label!r} was evaluated before; pass --overwrite to replace its results, or --run-label "
                     f"for a new run")
    print(f"run label: {label}")
    cache_dir = args.cache_dir or os.path.join(args.output_dir, "classifier_cache")
    failures = []
    for name, task, data in prepared:
        try:
            result = evaluate_zero_shot(model, task, data, protocol, batch_size=args.batch_size, device=args.device,
                                        num_workers=args.num_workers, cache_dir=cache_dir, run_label=label,
                                        predictions_path=planned[name][1] if args.save_predictions else None,
                                        progress=not args.no_progress)
            path = write_result_json(result, results_dir)
        except Exception as exc:   # noqa: BLE001 - one broken dataset must not cost the others' results
            failures.append(f"dataset {name} failed: {type(exc).__name__}: {exc}")
            print(f"error: {failures[-1]}", file=sys.stderr)
            continue
        print(f"{name:<34} {task.language} {result['primary_metric']:>22} = {100 * result['primary_value']:6.2f}"
              f"  ({result['num_samples']} images, {result['runtime_s']['total']:.1f}s)  -> {path}")
    # the summary covers every result in the output folder, so runs of several models, checkpoints,
    # languages or protocols written to one folder end up side by side in one table and one chart
    everything = load_results(sorted(os.path.join(results_dir, f) for f in os.listdir(results_dir)
                                     if f.endswith(".json"))) if os.path.isdir(results_dir) else []
    if everything:
        csv_path, md_path = write_summary(everything, args.output_dir)
        print(f"summary: {csv_path}, {md_path}")
        if not args.no_plot:
            print(f"chart: {plot_results(everything, os.path.join(args.output_dir, 'zero_shot.png'))}")
    if failures:
        print(f"{len(failures)} of {len(prepared)} dataset(s) failed:", file=sys.stderr)
        for failure in failures:
            print(f"  {failure}", file=sys.stderr)
        return 1
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
    """`python -m vlmdistill.eval.elevater [elevater] OPTIONS` or `... demo OPTIONS`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    prog = "python -m vlmdistill.eval.elevater"
    if argv and argv[0] == "demo":
        parser, argv = _demo_parser(f"{prog} demo"), argv[1:]
    else:
        argv = argv[1:] if argv and argv[0] == "elevater" else argv   # the evaluation is the default command
        parser = argparse.ArgumentParser(**_parser_kwargs(prog))
        _configure(parser)
        parser.set_defaults(func=run_elevater)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except VLMDistillError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
