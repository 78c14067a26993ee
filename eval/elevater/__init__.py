"""ELEVATER zero-shot image-classification harness.

    from vlmdistill.eval.elevater import adapter_for, evaluate_zero_shot, digits_task
    result = evaluate_zero_shot(adapter_for(model, tokenizer), digits_task("en"), dataset, protocol="elevater")

Names are imported on first use, so that the command line (and its --help) starts without torch.
"""

from importlib import import_module

_EXPORTS = {
    "adapters": ["ZeroShotModel", "adapter_for", "load_model", "load_open_clip", "load_hf_model",
                 "register_open_clip_config"],
    "classifier": ["build_classifier", "encode_classifier"],
    "demo": ["digits_task", "digits_images", "digits_split", "digits_test_data"],
    "metrics": ["compute_metrics", "primary_key"],
    "protocol": ["PROTOCOLS", "Protocol", "get_protocol"],
    "readers": ["LabeledImages", "from_images", "read_dataset", "read_iris", "read_coco", "read_image_folder",
                "read_webdataset"],
    "report": ["plot_results", "write_predictions", "write_result_json", "write_summary"],
    "runner": ["evaluate_zero_shot", "extract_image_features"],
    "tasks": ["ELEVATER_IC20", "TaskSpec", "get_task", "list_tasks", "load_custom_tasks", "register_task"],
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = list(_MODULE_OF)


def __getattr__(name: str):
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f".{_MODULE_OF[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
