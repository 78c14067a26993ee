"""ELEVATER zero-shot image-classification harness.

    from vlmdistill.eval.elevater import adapter_for, evaluate_zero_shot, digits_task
    result = evaluate_zero_shot(adapter_for(model, tokenizer), digits_task("en"), dataset, protocol="elevater")
"""

from .adapters import ZeroShotModel, adapter_for, load_hf_model, load_model, load_open_clip, register_open_clip_config
from .classifier import build_classifier, encode_classifier
from .demo import digits_images, digits_split, digits_task, digits_test_data
from .metrics import compute_metrics, primary_key
from .protocol import PROTOCOLS, Protocol, get_protocol
from .readers import (LabeledImages, from_images, read_coco, read_dataset, read_image_folder, read_iris,
                      read_webdataset)
from .report import plot_results, write_predictions, write_result_json, write_summary
from .runner import evaluate_zero_shot, extract_image_features
from .tasks import ELEVATER_IC20, TaskSpec, get_task, list_tasks, load_custom_tasks, register_task

__all__ = [
    "ZeroShotModel", "adapter_for", "load_model", "load_open_clip", "load_hf_model", "register_open_clip_config",
    "build_classifier", "encode_classifier", "digits_task", "digits_images", "digits_split", "digits_test_data",
    "from_images", "compute_metrics",
    "primary_key", "PROTOCOLS", "Protocol", "get_protocol", "LabeledImages", "read_dataset", "read_iris",
    "read_coco", "read_image_folder", "read_webdataset", "write_result_json", "write_summary", "plot_results",
    "write_predictions", "evaluate_zero_shot", "extract_image_features", "ELEVATER_IC20", "TaskSpec", "get_task",
    "list_tasks", "load_custom_tasks", "register_task",
]
