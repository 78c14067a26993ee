"""Run one zero-shot evaluation: classifier, image features, scores, metrics, result record.

    from vlmdistill.eval.elevater import evaluate_zero_shot, adapter_for
    result = evaluate_zero_shot(adapter_for(model, tokenizer), "cifar-10", "data/cifar-10", protocol="elevater")
    result["metrics"]["acc1"], result["primary_value"]
"""

from __future__ import annotations

import datetime
import time
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from vlmdistill.errors import ConfigError

from .adapters import ZeroShotModel, adapter_for
from .classifier import build_classifier
from .metrics import compute_metrics, primary_key
from .protocol import Protocol, elevater_transform, get_protocol, scores_from_similarity
from .readers import LabeledImages, read_dataset
from .tasks import TaskSpec, get_task

RESULT_SCHEMA_VERSION = 1


class TransformedImages(Dataset):
    """(pixels, index) pairs of a `LabeledImages`, decoded and transformed on access."""

    def __init__(self, data: LabeledImages, transform: Callable) -> None:
        self.data, self.transform = data, transform

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int):
        return self.transform(self.data.open_image(index)), index


def preprocessing(model: ZeroShotModel, protocol: Protocol, task: TaskSpec | None = None) -> dict:
    """What the images go through: the model's own transform, or the dataset's toolkit transform at
    the protocol's size (default: the model's input size)."""
    if protocol.transform == "model":
        return {"transform": "model"}
    return {"transform": "elevater", "image_size": protocol.image_size or model.image_size,
            "center_crop": task.center_crop if task is not None else True,
            "interpolation": task.interpolation if task is not None else "bicubic",
            "toolkit_image_size": task.image_size if task is not None else None}


def image_transform(model: ZeroShotModel, protocol: Protocol, task: TaskSpec | None = None) -> Callable:
    settings = preprocessing(model, protocol, task)
    if settings["transform"] == "model":
        return model.model_transform()
    return elevater_transform(settings["image_size"], model.mean, model.std, center_crop=settings["center_crop"],
                              interpolation=settings["interpolation"])


def make_loader(data: LabeledImages, transform: Callable, batch_size: int, num_workers: int = 0) -> DataLoader:
    return DataLoader(TransformedImages(data, transform), batch_size=batch_size, shuffle=False,
                      num_workers=num_workers, pin_memory=torch.cuda.is_available(),
                      persistent_workers=False)


@torch.inference_mode()
def extract_image_features(model: ZeroShotModel, loader: DataLoader, progress: bool = True,
                           description: str = "image features") -> torch.Tensor:
    """L2-normalised fp32 image embeddings [N, D] in dataset order."""
    from tqdm.auto import tqdm

    chunks = []
    for pixels, _ in tqdm(loader, desc=description, disable=not progress, unit="batch", leave=False):
        chunks.append(F.normalize(model.encode_images(pixels).float(), dim=-1))
    return torch.cat(chunks).cpu()


def _resolve_task(task: TaskSpec | str, protocol: Protocol) -> TaskSpec:
    if isinstance(task, TaskSpec):
        return task
    return get_task(task, protocol.language, zh_source=protocol.zh_source)


def evaluate_zero_shot(model: Any, task: TaskSpec | str, dataset: LabeledImages | str,
                       protocol: Protocol | str = "elevater", *, tokenizer: Any = None, batch_size: int = 64,
                       device: str | None = None, num_workers: int = 0, cache_dir: str | None = None,
                       text_batch_size: int = 256, predictions_path: str | None = None,
                       progress: bool = True, run_label: str | None = None) -> dict:
    """Zero-shot evaluation of `model` on `dataset` for `task`; returns the result record.

    model: a `ZeroShotModel`, or an open_clip / transformers CLIP-family model with `tokenizer`.
    task: a `TaskSpec` or a registered name (resolved in the protocol's language).
    dataset: a `LabeledImages` or a dataset folder / index file (format detected).
    The record carries the CLIP_benchmark keys (dataset, model, pretrained, task, language, metrics)
    plus the run label (default: the model's name), primary metric, protocol and preprocessing,
    task-spec hashes, reader, sample count, runtimes and parameter counts. `predictions_path`: also
    write the toolkit's prediction file there.
    """
    started = time.perf_counter()
    protocol = get_protocol(protocol)
    model = adapter_for(model, tokenizer) if not isinstance(model, ZeroShotModel) else model
    data = read_dataset(dataset) if isinstance(dataset, str) else dataset
    spec = _resolve_task(task, protocol)
    data.check_labels(spec.num_classes)
    multilabel = spec.multilabel or data.multilabel
    if len(data) == 0:
        raise ConfigError(f"dataset for {spec.name!r} has no samples")

    restore_device, restore_dtype = model.device, model.dtype
    target_dtype = torch.float32 if protocol.precision == "fp32" else restore_dtype
    model.to(device or restore_device, target_dtype)
    try:
        text_started = time.perf_counter()
        classifier = build_classifier(model, spec, text_cleanup=protocol.text_cleanup, cache_dir=cache_dir,
                                      batch_size=text_batch_size)
        text_seconds = time.perf_counter() - text_started
        image_started = time.perf_counter()
        loader = make_loader(data, image_transform(model, protocol, spec), batch_size, num_workers)
        features = extract_image_features(model, loader, progress, f"{spec.name} ({spec.language})")
        image_seconds = time.perf_counter() - image_started
    finally:
        model.to(restore_device, restore_dtype)

    scores = scores_from_similarity(features @ classifier.weights.cpu().float(), protocol.scores).numpy()
    metrics = compute_metrics(scores, data.labels, spec.num_classes, multilabel)
    key = "acc1" if protocol.primary == "acc1" else primary_key(spec.metric)
    result = {
        "dataset": spec.name,
        "model": model.name,
        "run_label": run_label or model.name,
        "pretrained": model.pretrained,
        "task": "zeroshot_classification",
        "language": spec.language,
        "metrics": metrics,
        "primary_metric": key,
        "primary_value": metrics[key],
        "elevater_metric": spec.metric,
        "elevater_metric_value": metrics[primary_key(spec.metric)],
        "in_benchmark": spec.in_benchmark,
        "protocol": protocol.as_dict(),
        "preprocess": preprocessing(model, protocol, spec),
        "task_spec": {"spec_hash": spec.spec_hash, "classnames_hash": spec.classnames_hash,
                      "templates_hash": spec.templates_hash, "num_classes": spec.num_classes,
                      "num_templates": len(spec.templates), "multilabel": multilabel},
        "data": {"reader": data.reader, "index_path": data.index_path, "num_samples": len(data)},
        "num_samples": len(data),
        "classifier": {"key": classifier.key, "cache_hit": classifier.cache_hit, "cache_path": classifier.cache_path},
        "runtime_s": {"total": time.perf_counter() - started, "text": text_seconds, "image": image_seconds,
                      "images_per_s": len(data) / max(image_seconds, 1e-9)},
        "model_info": model.describe(),
        "batch_size": batch_size,
        "device": str(device or restore_device),
        "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "schema_version": RESULT_SCHEMA_VERSION,
    }
    if predictions_path:
        from .report import write_predictions

        write_predictions(predictions_path, result, scores)
    return result

