"""Evaluation protocols: named presets that switch every knob of a zero-shot run together.

* `elevater`: the toolkit's protocol: each dataset's test transform from the toolkit's configs
  (bicubic; shorter side to the input size and a centre crop, or for kitti-distance the whole image
  squashed to a square), at the model's input size (224 for every ELEVATER reference model), the
  model's mean/std, fp32, and `softmax(100 * cos)` fed to the metrics; each dataset's own metric.
* `clip_benchmark`: CLIP_benchmark's habits: the model's own preprocessing, the model's dtype,
  raw scaled cosine logits `100 * cos` fed to the metrics (this changes mAP and ROC-AUC, not accuracy).
* `cnclip_zh`: Chinese-CLIP's report: Chinese prompts (CN-CLIP template sets), its text clean-up
  (lower case, straight quotes), ELEVATER preprocessing, and top-1 accuracy as the primary metric
  everywhere (the dataset's own metric is still computed and reported).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace

from vlmdistill.errors import ConfigError

# torch and torchvision are imported where they are used, so that the command line's --help is fast


@dataclass(frozen=True)
class Protocol:
    name: str
    transform: str = "elevater"        # "elevater" | "model" (the adapter's own preprocessing)
    image_size: int | None = None      # None: the model's input size
    precision: str = "fp32"            # "fp32" | "model" (keep the model's dtype)
    scores: str = "softmax100"         # "softmax100" | "logits100"
    language: str = "en"
    primary: str = "dataset"           # "dataset" (the task's metric) | "acc1"
    text_cleanup: str = "none"         # "none" | "cnclip"
    zh_source: str = "cnclip"          # ImageNet-1k Chinese names/templates: "cnclip" | "clip_benchmark"

    def __post_init__(self) -> None:
        choices = {"transform": ("elevater", "model"), "precision": ("fp32", "model"),
                   "scores": ("softmax100", "logits100"), "language": ("en", "zh"),
                   "primary": ("dataset", "acc1"), "text_cleanup": ("none", "cnclip"),
                   "zh_source": ("cnclip", "clip_benchmark")}
        for key, valid in choices.items():
            if getattr(self, key) not in valid:
                raise ConfigError(f"protocol {self.name!r}: {key}={getattr(self, key)!r}; valid: {list(valid)}")

    def as_dict(self) -> dict:
        return asdict(self)


PROTOCOLS: dict[str, Protocol] = {
    "elevater": Protocol("elevater"),
    "clip_benchmark": Protocol("clip_benchmark", transform="model", precision="model", scores="logits100",
                               zh_source="clip_benchmark"),
    "cnclip_zh": Protocol("cnclip_zh", language="zh", primary="acc1", text_cleanup="cnclip"),
}


def get_protocol(protocol: str | Protocol = "elevater", **overrides) -> Protocol:
    """A preset by name (or a Protocol as is), with single knobs overridden, e.g. language="zh"."""
    if isinstance(protocol, Protocol):
        base = protocol
    elif protocol in PROTOCOLS:
        base = PROTOCOLS[protocol]
    else:
        raise ConfigError(f"unknown protocol {protocol!r}; valid: {sorted(PROTOCOLS)}")
    valid = {f.name for f in fields(Protocol)} - {"name"}
    unknown = set(overrides) - valid
    if unknown:
        raise ConfigError(f"unknown protocol options {sorted(unknown)}; valid: {sorted(valid)}")
    overrides = {k: v for k, v in overrides.items() if v is not None}
    return replace(base, **overrides) if overrides else base


def elevater_transform(image_size: int, mean, std, *, center_crop: bool = True, interpolation: str = "bicubic"):
    """The toolkit's test transform: with `center_crop`, shorter side to `image_size` then a centre
    crop; without, the whole image resized to `image_size` x `image_size`; then tensor, normalise."""
    from torchvision import transforms
    from torchvision.transforms import InterpolationMode

    mode = InterpolationMode(interpolation)
    resize = ([transforms.Resize(image_size, interpolation=mode), transforms.CenterCrop(image_size)] if center_crop
              else [transforms.Resize((image_size, image_size), interpolation=mode)])
    return transforms.Compose([
        transforms.Lambda(_to_rgb),
        *resize,
        transforms.ToTensor(),
        transforms.Normalize(mean=list(mean), std=list(std)),
    ])


def _to_rgb(image):
    return image.convert("RGB") if image.mode != "RGB" else image


def clean_text(text: str, mode: str) -> str:
    """CN-CLIP lower-cases prompts and straightens curly double quotes before tokenising."""
    if mode == "cnclip":
        return text.lower().replace("\u201c", '"').replace("\u201d", '"')
    return text


def scores_from_similarity(cosine, mode: str):
    """Cosine similarities [N, C] -> the scores the metrics see."""
    logits = 100.0 * cosine.float()
    return logits.softmax(dim=-1) if mode == "softmax100" else logits
