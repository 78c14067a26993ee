"""Local model folders in recipes: the transformers class that loads a folder (from its own `config.json`), the
processor or tokenizer saved beside the weights, and what `--dry-run` checks without building a model."""

from __future__ import annotations

import json
import os
from typing import Any

from .errors import ConfigError

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
#: tried in this order when `architectures` names no transformers class: a VLM before a causal LM before a bare model
AUTO_MAPPINGS = (("AutoModelForImageTextToText", "MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES"),
                 ("AutoModelForCausalLM", "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES"),
                 ("AutoModel", "MODEL_MAPPING_NAMES"))


def read_config(path: str, role: str) -> dict[str, Any]:
    if not os.path.isdir(path):
        raise ConfigError(f"{role}.path {path!r} is not a local folder (nothing is downloaded)")
    file = os.path.join(path, "config.json")
    if not os.path.isfile(file):
        raise ConfigError(f"{role}.path {path!r} has no config.json: give a folder written by save_pretrained")
    try:
        with open(file) as fh:
            return json.load(fh)
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{file}: cannot read it ({exc})") from None


def model_class(path: str, auto_class: str | None, role: str) -> tuple[type, str]:
    """(the class that loads `path`, how it was chosen)."""
    import transformers

    if auto_class:
        cls = getattr(transformers, auto_class, None)
        if cls is None or not hasattr(cls, "from_pretrained"):
            raise ConfigError(f"{role}.auto_class {auto_class!r} is not a transformers model class")
        return cls, "auto_class"
    config = read_config(path, role)
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    kind = config.get("model_type")
    if kind not in CONFIG_MAPPING_NAMES:
        code = " its auto_map points at Python files in the folder, and" if config.get("auto_map") else ""
        raise ConfigError(f"{role}.path {path!r}: model_type {kind!r} is not a transformers model type;{code} "
                          "recipes never run model-folder code (trust_remote_code is refused). Load such a model in "
                          "Python and call vlmdistill.wrap yourself")
    for name in config.get("architectures") or []:
        cls = getattr(transformers, name, None)
        if cls is not None and hasattr(cls, "from_pretrained"):
            return cls, "config.json architectures"
    from transformers.models.auto import modeling_auto

    for auto, table in AUTO_MAPPINGS:
        name = getattr(modeling_auto, table).get(kind)
        if isinstance(name, str) and hasattr(transformers, name):
            return getattr(transformers, name), f"config.json model_type {kind!r} ({auto})"
    raise ConfigError(f"{role}.path {path!r}: config.json names architectures {config.get('architectures')} and "
                      f"model_type {kind!r}, none of them a transformers class (recipes never run model-folder "
                      "code); set auto_class to a transformers class")


def weight_file(path: str, role: str) -> str:
    for name in WEIGHT_FILES:
        if os.path.isfile(os.path.join(path, name)):
            return name
    raise ConfigError(f"{role}.path {path!r} holds no weights ({', '.join(WEIGHT_FILES)})")


def load_processor(path: str | None) -> Any:
    """The processor saved in `path` (a VLM's), else its tokenizer (an LM's), else None. Local files only."""
    if not path or not os.path.isdir(path):
        return None
    names = set(os.listdir(path))
    options = dict(local_files_only=True, trust_remote_code=False)
    if names & set(PROCESSOR_FILES):
        from transformers import AutoProcessor

        return AutoProcessor.from_pretrained(path, **options)
    if names & set(TOKENIZER_FILES):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path, **options)
    return None


def tokenizer_of(processor: Any) -> Any:
    return getattr(processor, "tokenizer", None) or processor


def is_multimodal(processor: Any) -> bool:
    return getattr(processor, "image_processor", None) is not None


def describe_folder(spec: Any, role: str) -> str:
    """One line on a model folder, checked as far as it goes without building the model."""
    cls, how = model_class(spec.path, spec.auto_class, role)
    weights = weight_file(spec.path, role)
    processor = load_processor(getattr(spec, "processor", None) or spec.path)
    if processor is None:
        extra = "no processor or tokenizer (the vocabulary check then needs trust_vocab_prefix)"
    else:
        template = getattr(processor, "chat_template", None) or getattr(tokenizer_of(processor), "chat_template", None)
        extra = f"{type(processor).__name__}" + (" with a chat template" if template else " (no chat template)")
    return f"{role}: {spec.path} -> {cls.__name__} (from {how}), weights {weights}, {extra}"
