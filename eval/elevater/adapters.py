"""Model adapters: one small interface over every CLIP-style model the harness evaluates.

A `ZeroShotModel` encodes a batch of pixel tensors and a list of strings, knows its input size,
mean/std and its own preprocessing, and fingerprints its weights + tokenizer for the classifier
cache. `adapter_for(model, tokenizer)` wraps an in-memory model (open_clip, transformers CLIP family,
or anything with encode_image/encode_text or get_image_features/get_text_features); `load_model`
builds one from local files only (open_clip name + checkpoint path / custom config / `local-dir`,
or a transformers model folder).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from vlmdistill.data.image_stats import HALF_MEAN_STD, OPENAI_MEAN, OPENAI_STD
from vlmdistill.errors import ConfigError, DataError, UnsupportedModelError
from vlmdistill.open_clip_models import register_open_clip_config

HF_CLIP_FAMILY = ("clip", "altclip", "chinese_clip", "siglip", "siglip2")

Tokenize = Callable[[Sequence[str]], Any]   # texts -> LongTensor or a mapping of tensors


def weights_fingerprint(module: nn.Module) -> str:
    """Hash of every parameter and buffer (name, dtype, shape, bytes): changes whenever a weight does."""
    digest = hashlib.blake2b(digest_size=20)
    for name, tensor in sorted(module.state_dict().items()):
        data = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{name}|{data.dtype}|{tuple(tensor.shape)}".encode())
        digest.update(data.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _features(output: Any, kind: str) -> torch.Tensor:
    """Tensor out of whatever a model's feature method returns (transformers 5 returns output objects
    whose `pooler_output` is the projected embedding)."""
    if isinstance(output, torch.Tensor):
        return output
    for key in (f"{kind}_embeds", "pooler_output"):
        value = getattr(output, key, None)
        if value is None and isinstance(output, Mapping):
            value = output.get(key)
        if isinstance(value, torch.Tensor):
            return value
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise UnsupportedModelError(f"cannot find {kind} features in a {type(output).__name__}")


def _accepted_kwargs(function: Callable, candidates: Mapping[str, Any]) -> dict[str, Any]:
    parameters = inspect.signature(function).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return dict(candidates)
    return {k: v for k, v in candidates.items() if k in parameters}


class ZeroShotModel:
    """A CLIP-style model as the harness sees it. Subclasses say how to tokenise and preprocess."""

    kind = "generic"

    def __init__(self, model: nn.Module, tokenize: Tokenize, *, image_size: int,
                 mean: Sequence[float] = OPENAI_MEAN, std: Sequence[float] = OPENAI_STD,
                 transform: Callable | None = None, name: str | None = None, pretrained: str = "",
                 tokenizer_id: str = "") -> None:
        self.model = model.eval()
        self.tokenize = tokenize
        self.image_size = int(image_size)
        self.mean, self.std = tuple(mean), tuple(std)
        self._transform = transform
        self.name = name or type(model).__name__
        self.pretrained = pretrained
        self.tokenizer_id = tokenizer_id or type(tokenize).__name__
        self.text_encoder_calls = 0     # counted so that a cache hit can be shown to skip text encoding
        self.image_encoder_calls = 0
        self._pinned_fingerprint: str | None = None

    # -------------------------------------------------------------- placement
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> "ZeroShotModel":
        self.model.to(device=device, dtype=dtype)
        return self

    # -------------------------------------------------------------- preprocessing
    def model_transform(self) -> Callable:
        """The model's own test-time preprocessing (PIL image -> tensor)."""
        if self._transform is not None:
            return self._transform
        from .protocol import elevater_transform

        return elevater_transform(self.image_size, self.mean, self.std)

    # -------------------------------------------------------------- encoders
    def _image_call(self, pixels: torch.Tensor) -> Any:
        if hasattr(self.model, "encode_image"):
            return self.model.encode_image(pixels)
        if hasattr(self.model, "get_image_features"):
            return self.model.get_image_features(pixel_values=pixels)
        raise UnsupportedModelError(f"{type(self.model).__name__} has neither encode_image nor get_image_features")

    def _text_call(self, tokens: Any) -> Any:
        method = getattr(self.model, "encode_text", None) or getattr(self.model, "get_text_features", None)
        if method is None:
            raise UnsupportedModelError(f"{type(self.model).__name__} has neither encode_text nor get_text_features")
        if isinstance(tokens, Mapping):
            return method(**_accepted_kwargs(method, tokens))
        return method(tokens)

    @torch.inference_mode()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        self.image_encoder_calls += 1
        pixels = pixels.to(self.device, dtype=self.dtype, non_blocking=True)
        return _features(self._image_call(pixels), "image")

    @torch.inference_mode()
    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        self.text_encoder_calls += 1
        tokens = self.tokenize(list(texts))
        if isinstance(tokens, Mapping):
            tokens = {k: v.to(self.device) for k, v in tokens.items() if isinstance(v, torch.Tensor)}
        else:
            tokens = tokens.to(self.device)
        return _features(self._text_call(tokens), "text")

    # -------------------------------------------------------------- identity
    def fingerprint(self) -> str:
        """Weights + tokenizer identity: the part of the classifier-cache key that depends on the model."""
        if self._pinned_fingerprint is not None:
            return self._pinned_fingerprint
        return hashlib.sha256(f"{self.kind}|{self.tokenizer_id}|{weights_fingerprint(self.model)}".encode()).hexdigest()

    def pin_fingerprint(self) -> str:
        """Hash the weights once and reuse the result, for a model that does not change while it is
        evaluated (the command line: hashing ViT-B/32 costs about 2 s per dataset otherwise)."""
        self._pinned_fingerprint = None
        self._pinned_fingerprint = self.fingerprint()
        return self._pinned_fingerprint

    def image_tower(self) -> list[nn.Module]:
        """The modules that make the image embedding (the toolkit counts `model.visual`, or the whole
        model when there is none)."""
        if hasattr(self.model, "visual"):
            return [self.model.visual]
        if hasattr(self.model, "vision_model"):
            return [self.model.vision_model] + ([self.model.visual_projection]
                                                if hasattr(self.model, "visual_projection") else [])
        return [self.model]

    def parameter_counts(self) -> dict[str, int]:
        """The parameter counts of the toolkit's prediction files: every parameter of the model
        (`num_params`, `num_backbone_params`: zero-shot has no extra head) and the image tower's."""
        total = sum(p.numel() for p in self.model.parameters())
        visual = {id(p): p.numel() for module in self.image_tower() for p in module.parameters()}
        return {"num_params": total, "num_visual_params": sum(visual.values()), "num_backbone_params": total}

    def describe(self) -> dict:
        return {"model": self.name, "pretrained": self.pretrained, "adapter": self.kind,
                "image_size": self.image_size, "mean": list(self.mean), "std": list(self.std),
                **self.parameter_counts()}


class OpenClipAdapter(ZeroShotModel):
    kind = "open_clip"

    def _image_call(self, pixels):
        return self.model.encode_image(pixels)

    def _text_call(self, tokens):
        return self.model.encode_text(tokens)


class HFClipAdapter(ZeroShotModel):
    kind = "transformers"

    def _image_call(self, pixels):
        return self.model.get_image_features(pixel_values=pixels)


# ------------------------------------------------------------------ tokenizer helpers

def hf_tokenize(tokenizer, *, max_length: int | None, pad_to_max: bool) -> Tokenize:
    """Batch tokenisation for a transformers tokenizer. SigLIP was trained on max-length padding and
    pools the last position, so it must be padded to `max_length`."""

    def tokenize(texts: Sequence[str]):
        return dict(tokenizer(list(texts), padding="max_length" if pad_to_max else True, truncation=True,
                              max_length=max_length, return_tensors="pt"))

    return tokenize


def _tokenizer_identity(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return hashlib.sha256(backend.to_str().encode()).hexdigest()[:16]
    vocab = getattr(tokenizer, "get_vocab", None)
    if callable(vocab):
        return hashlib.sha256(json.dumps(sorted(vocab().items())).encode()).hexdigest()[:16]
    return f"{type(tokenizer).__name__}:{getattr(tokenizer, 'context_length', '')}"


# ------------------------------------------------------------------ in-memory models

def _is_open_clip_model(model: nn.Module) -> bool:
    return type(model).__module__.startswith("open_clip") and hasattr(model, "encode_text")


def _is_hf_clip_family(model: nn.Module) -> bool:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None) in HF_CLIP_FAMILY and hasattr(model, "get_image_features")


def adapter_for(model: nn.Module, tokenizer: Any = None, *, image_processor: Any = None,
                transform: Callable | None = None, image_size: int | None = None,
                mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                name: str | None = None, pretrained: str = "") -> ZeroShotModel:
    """Wrap an in-memory model. open_clip and transformers CLIP-family models need only their
    tokenizer (open_clip's default BPE tokenizer is used when none is given); any other model needs a
    tokenizer callable `texts -> tensor | dict` plus `image_size` (and mean/std if not OpenAI's)."""
    if isinstance(model, ZeroShotModel):
        return model
    if _is_open_clip_model(model):
        return _open_clip_adapter(model, tokenizer, transform, name, pretrained)
    if _is_hf_clip_family(model):
        return _hf_adapter(model, tokenizer, image_processor, transform, name or model.config.model_type, pretrained)
    if tokenizer is None or image_size is None:
        raise UnsupportedModelError(f"{type(model).__name__} is not an open_clip or transformers CLIP model: "
                                    f"pass tokenizer= (texts -> tensor or dict) and image_size=")
    has_image = hasattr(model, "encode_image") or hasattr(model, "get_image_features")
    has_text = hasattr(model, "encode_text") or hasattr(model, "get_text_features")
    if not (has_image and has_text):
        raise UnsupportedModelError(f"{type(model).__name__} needs encode_image/encode_text or "
                                    f"get_image_features/get_text_features")
    tokenize = tokenizer
    if hasattr(tokenizer, "backend_tokenizer") or hasattr(tokenizer, "pad_token_id"):
        tokenize = hf_tokenize(tokenizer, max_length=getattr(tokenizer, "model_max_length", None), pad_to_max=False)
    return ZeroShotModel(model, tokenize, image_size=image_size, mean=mean or OPENAI_MEAN, std=std or OPENAI_STD,
                         transform=transform, name=name, pretrained=pretrained,
                         tokenizer_id=_tokenizer_identity(tokenizer))


def _open_clip_adapter(model, tokenizer, transform, name, pretrained) -> OpenClipAdapter:
    import open_clip

    if tokenizer is None:
        tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=getattr(model, "context_length", 77))
    preprocess = getattr(model.visual, "preprocess_cfg", {}) or {}
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    mean = tuple(preprocess.get("mean", OPENAI_MEAN))
    std = tuple(preprocess.get("std", OPENAI_STD))
    if transform is None:
        transform = open_clip.image_transform(size, is_train=False, mean=mean, std=std,
                                              interpolation=preprocess.get("interpolation"),
                                              resize_mode=preprocess.get("resize_mode"))
    tokenizer_id = f"{type(tokenizer).__name__}:{getattr(tokenizer, 'context_length', '')}"
    return OpenClipAdapter(model, tokenizer, image_size=size, mean=mean, std=std, transform=transform,
                           name=name or "open_clip", pretrained=pretrained, tokenizer_id=tokenizer_id)


def _hf_adapter(model, tokenizer, image_processor, transform, name, pretrained) -> HFClipAdapter:
    if tokenizer is None:
        raise UnsupportedModelError(f"{name}: a transformers model needs its tokenizer")
    config = model.config
    model_type = config.model_type
    size = config.vision_config.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    default = HALF_MEAN_STD if model_type.startswith("siglip") else OPENAI_MEAN
    mean = tuple(getattr(image_processor, "image_mean", None) or default)
    std = tuple(getattr(image_processor, "image_std", None) or (HALF_MEAN_STD if model_type.startswith("siglip")
                                                                  else OPENAI_STD))
    if transform is None and image_processor is not None:
        transform = _processor_transform(image_processor)
    max_positions = getattr(config.text_config, "max_position_embeddings", None)
    model_max = getattr(tokenizer, "model_max_length", None)
    limits = [x for x in (max_positions, model_max) if x and x < 10**6]   # unset model_max_length is huge
    max_length = min(limits) if limits else None
    if model_type == "altclip" and max_positions:
        max_length = max_positions - 2   # XLM-R positions start after the padding index
    tokenize = hf_tokenize(tokenizer, max_length=max_length, pad_to_max=model_type.startswith("siglip"))
    return HFClipAdapter(model, tokenize, image_size=size, mean=mean, std=std, transform=transform, name=name,
                         pretrained=pretrained, tokenizer_id=_tokenizer_identity(tokenizer))


class _ProcessorTransform:
    """A transformers image processor as a picklable PIL -> tensor transform."""

    def __init__(self, processor) -> None:
        self.processor = processor

    def __call__(self, image):
        return self.processor(images=image.convert("RGB"), return_tensors="pt")["pixel_values"][0]


def _processor_transform(processor) -> Callable:
    return _ProcessorTransform(processor)


# ------------------------------------------------------------------ loading from local files

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth")   # what open_clip looks for in a local-dir folder
RANDOM_ON_PURPOSE = "--random-weights (random_weights=True) to evaluate random weights on purpose"


def _folder_weights(folder: str) -> list[str]:
    return sorted(f for f in os.listdir(folder) if f.endswith(WEIGHT_SUFFIXES))


def load_open_clip(name_or_dir: str, pretrained: str | None = None, *, model_config: str | Mapping | None = None,
                   device: str = "cpu", random_weights: bool = False) -> OpenClipAdapter:
    """An open_clip model from local files only.

    * `name_or_dir` a folder with `open_clip_config.json` and weights -> open_clip's `local-dir:` loading;
    * else an architecture name (built-in, or registered from `model_config`: a json path or dict)
      with `pretrained` a local checkpoint file (.pt/.bin/.safetensors).
    Random weights (no checkpoint) only with `random_weights=True`; hub downloads and pretrained
    *tags* are refused: evaluation must be reproducible offline.
    """
    import open_clip

    if pretrained is not None and random_weights:
        raise ConfigError("--pretrained and --random-weights contradict each other; pass one of them")
    if os.path.isdir(name_or_dir):
        if not os.path.isfile(os.path.join(name_or_dir, "open_clip_config.json")):
            raise DataError(f"{name_or_dir} has no open_clip_config.json")
        if pretrained is not None:
            raise ConfigError(f"--pretrained is not used with the model folder {name_or_dir}: its own weights are "
                              f"loaded; drop --pretrained or pass an architecture name as --model")
        if not _folder_weights(name_or_dir) and not random_weights:
            raise DataError(f"{name_or_dir} has open_clip_config.json but no weights file (*.safetensors, *.bin, "
                            f"*.pth): the model would be randomly initialised; pass {RANDOM_ON_PURPOSE}")
        identifier = "local-dir:" + os.path.abspath(name_or_dir)
        model, _, preprocess = open_clip.create_model_and_transforms(identifier, device=device)
        tokenizer = open_clip.get_tokenizer(identifier)
        return _open_clip_adapter(model, tokenizer, preprocess, os.path.basename(os.path.normpath(name_or_dir)),
                                  os.path.abspath(name_or_dir))
    name = name_or_dir
    if isinstance(model_config, Mapping):
        register_open_clip_config(name, model_config)
    elif model_config is not None:
        if not os.path.isfile(model_config):
            raise DataError(f"open_clip model config {model_config} does not exist")
        with open(model_config) as handle:
            register_open_clip_config(name, json.load(handle))
    if name not in open_clip.list_models():
        import difflib

        close = difflib.get_close_matches(name, open_clip.list_models(), n=5, cutoff=0.6)
        raise ConfigError(f"unknown open_clip architecture {name!r} (and no folder of that name exists)"
                          f"{'; close names: ' + ', '.join(close) if close else ''}. --model takes an open_clip "
                          f"architecture name (with --model-config <json> for a custom one), a folder with "
                          f"open_clip_config.json, or a transformers model folder")
    if pretrained is None and not random_weights:
        raise ConfigError(f"--model {name} without --pretrained would evaluate randomly initialised weights: pass "
                          f"--pretrained FILE (a local checkpoint), or {RANDOM_ON_PURPOSE}")
    if pretrained is not None and not os.path.isfile(pretrained):
        raise DataError(f"checkpoint {pretrained} does not exist (pretrained tags are not downloaded; "
                        f"pass a local file)")
    model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=pretrained, device=device,
                                                                 pretrained_text=False)
    return _open_clip_adapter(model, open_clip.get_tokenizer(name), preprocess, name,
                              os.path.abspath(pretrained) if pretrained else "")


def load_hf_model(folder: str, device: str = "cpu", random_weights: bool = False) -> HFClipAdapter:
    """A transformers CLIP / AltCLIP / ChineseCLIP / SigLIP model saved in a local folder."""
    import transformers

    config_path = os.path.join(folder, "config.json")
    if not os.path.isfile(config_path):
        raise DataError(f"{folder} has no config.json: not a transformers model folder")
    with open(config_path) as handle:
        model_type = json.load(handle).get("model_type")
    if model_type not in HF_CLIP_FAMILY:
        raise UnsupportedModelError(f"{folder}: model_type {model_type!r} is not one of {list(HF_CLIP_FAMILY)}")
    if not _folder_weights(folder):
        if not random_weights:
            raise DataError(f"{folder} has config.json but no weights file (*.safetensors, *.bin): the model "
                            f"would be randomly initialised; pass {RANDOM_ON_PURPOSE}")
        config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
        model = transformers.AutoModel.from_config(config).to(device)
    else:
        model = transformers.AutoModel.from_pretrained(folder, local_files_only=True).to(device)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    try:
        processor = transformers.AutoImageProcessor.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError):
        processor = None   # no preprocessor_config.json: ELEVATER preprocessing with the family's mean/std
    return _hf_adapter(model, tokenizer, processor, None, os.path.basename(os.path.normpath(folder)),
                       os.path.abspath(folder))


def _looks_like_path(spec: str) -> bool:
    return "/" in spec or os.sep in spec or spec.startswith((".", "~"))


def load_model(spec: str, *, pretrained: str | None = None, model_config: str | None = None,
               kind: str = "auto", device: str = "cpu", random_weights: bool = False) -> ZeroShotModel:
    """Dispatch on `kind` (`auto`, `open_clip`, `hf`): a folder with config.json is a transformers
    model, a folder with open_clip_config.json or an architecture name goes to open_clip. A path
    that does not exist, a folder that is neither, and random weights (unless `random_weights`) are
    refused with a message that says what to pass instead."""
    if kind not in ("auto", "open_clip", "hf"):
        raise ConfigError(f"unknown model kind {kind!r}; valid: ['auto', 'open_clip', 'hf']")
    if not os.path.exists(spec) and _looks_like_path(spec):
        raise DataError(f"model folder {spec} does not exist")
    if os.path.isfile(spec):
        raise ConfigError(f"--model {spec} is a file: pass the architecture as --model and the file as "
                          f"--pretrained, or a model folder as --model")
    if os.path.isdir(spec):
        has_hf = os.path.isfile(os.path.join(spec, "config.json"))
        has_open_clip = os.path.isfile(os.path.join(spec, "open_clip_config.json"))
        if kind == "hf" or (kind == "auto" and has_hf):
            if pretrained is not None:
                raise ConfigError(f"--pretrained is not used with the transformers folder {spec}: its own weights "
                                  f"are loaded")
            return load_hf_model(spec, device, random_weights)
        if not has_open_clip:
            held = sorted(os.listdir(spec))
            raise DataError(f"{spec} is neither a transformers model folder (config.json and weights, as written by "
                            f"save_pretrained; CLIP, AltCLIP, ChineseCLIP, SigLIP) nor an open_clip folder "
                            f"(open_clip_config.json and weights); it holds "
                            f"{', '.join(held[:10]) + (' ...' if len(held) > 10 else '') if held else 'nothing'}")
    elif kind == "hf":
        raise DataError(f"--model-kind hf needs a model folder; {spec} is not one")
    return load_open_clip(spec, pretrained, model_config=model_config, device=device, random_weights=random_weights)
