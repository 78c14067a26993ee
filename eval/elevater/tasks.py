"""Task registry: what each ELEVATER dataset asks of a zero-shot classifier.

The registry is read from the packaged data files (`data/*.json`), which record the toolkit's class
names, templates and metrics (see `eval/README.md` for their sources). A `TaskSpec` is one dataset in
one language; its `spec_hash` changes whenever anything that affects the scores changes.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field, replace
from functools import lru_cache
from importlib import resources
from typing import Any, Sequence

from vlmdistill.errors import ConfigError, DataError

METRICS = ("accuracy", "mean-per-class", "11point_mAP", "roc_auc")
LANGUAGES = ("en", "zh")
INTERPOLATIONS = ("bicubic", "bilinear", "nearest")
REFERENCE_TASK = "imagenet-1k"  # reported beside the benchmark, never averaged into it


@dataclass(frozen=True)
class TaskSpec:
    """One zero-shot classification task in one language.

    `templates` use the `{}` placeholder internally; `{c}` (CLIP_benchmark) is accepted on input.
    `splits` maps split name -> index file name, as in the toolkit's dataset configs.
    `center_crop`, `interpolation`, `image_size`: the toolkit's test transform for this dataset
    (shorter side resized and centre-cropped, or the whole image squashed to a square, as
    kitti-distance; `image_size` is the toolkit's size, the model's input size is used when it differs).
    """

    name: str
    classnames: tuple[str, ...]
    templates: tuple[str, ...]
    metric: str = "accuracy"
    multilabel: bool = False
    language: str = "en"
    annotation_format: str | None = None
    root_folder: str | None = None
    splits: dict[str, str] = field(default_factory=dict, compare=False, hash=False)
    labelmap: str | None = None
    in_benchmark: bool = False
    center_crop: bool = True
    interpolation: str = "bicubic"
    image_size: int | None = None

    def __post_init__(self) -> None:
        if self.interpolation not in INTERPOLATIONS:
            raise ConfigError(f"task {self.name!r}: unknown interpolation {self.interpolation!r}; "
                              f"valid: {list(INTERPOLATIONS)}")
        if self.metric not in METRICS:
            raise ConfigError(f"task {self.name!r}: unknown metric {self.metric!r}; valid: {list(METRICS)}")
        if self.language not in LANGUAGES:
            raise ConfigError(f"task {self.name!r}: unknown language {self.language!r}; valid: {list(LANGUAGES)}")
        if not self.classnames:
            raise ConfigError(f"task {self.name!r} has no class names")
        if not self.templates:
            raise ConfigError(f"task {self.name!r} has no templates")
        object.__setattr__(self, "classnames", tuple(self.classnames))
        object.__setattr__(self, "templates", tuple(normalize_template(t, self.name) for t in self.templates))

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    @property
    def spec_hash(self) -> str:
        """Hash of everything that changes the classifier or the metric."""
        payload = {"classnames": self.classnames, "templates": self.templates, "metric": self.metric,
                   "multilabel": self.multilabel, "language": self.language, "center_crop": self.center_crop,
                   "interpolation": self.interpolation}
        return _sha256_json(payload)

    @property
    def classnames_hash(self) -> str:
        return _sha256_json(self.classnames)

    @property
    def templates_hash(self) -> str:
        return _sha256_json(self.templates)

    def prompts(self, classname: str) -> list[str]:
        return [template.format(classname) for template in self.templates]

    def with_classnames(self, classnames: Sequence[str], language: str | None = None) -> "TaskSpec":
        if len(classnames) != self.num_classes:
            raise DataError(f"task {self.name!r} has {self.num_classes} classes but {len(classnames)} "
                            f"class names were given")
        return replace(self, classnames=tuple(classnames), language=language or self.language)

    def with_templates(self, templates: Sequence[str], language: str | None = None) -> "TaskSpec":
        return replace(self, templates=tuple(templates), language=language or self.language)


def _sha256_json(payload: Any) -> str:
    text = json.dumps(payload, ensure_ascii=False, sort_keys=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


_PLACEHOLDER = re.compile(r"\{c\}|\{\}")


def normalize_template(template: str, task: str = "?") -> str:
    """Accept `{}` (ELEVATER, CN-CLIP) or `{c}` (CLIP_benchmark); return the `{}` form.

    Literal braces in a template are escaped so that `str.format` leaves them alone.
    """
    if not isinstance(template, str):
        raise ConfigError(f"task {task!r}: template {template!r} is not a string")
    parts = _PLACEHOLDER.split(template)
    if len(parts) != 2:
        raise ConfigError(f"task {task!r}: template {template!r} needs exactly one '{{}}' or '{{c}}' placeholder")
    escape = lambda text: text.replace("{", "{{").replace("}", "}}")  # noqa: E731
    return escape(parts[0]) + "{}" + escape(parts[1])


def first_synonym(name: str | Sequence[str]) -> str:
    """The toolkit keeps only the first synonym when a class is a list (fer-2013)."""
    if isinstance(name, str):
        return name
    if not name:
        raise ConfigError("empty synonym list in class names")
    return str(name[0])


# ---------------------------------------------------------------- packaged data

def data_file(name: str):
    return resources.files("vlmdistill.eval.elevater").joinpath("data", name)


@lru_cache(maxsize=None)
def _load_json(name: str) -> dict:
    with data_file(name).open("r", encoding="utf-8") as handle:
        return json.load(handle)


def _english_entries() -> dict[str, dict]:
    return _load_json("elevater_ic_en_tasks.json")["datasets"]


def list_tasks(include_reference: bool = True) -> list[str]:
    """Registered dataset names: the 20 benchmark datasets, then ImageNet-1k."""
    entries = _english_entries()
    names = [n for n, e in entries.items() if e.get("in_elevater_ic20")]
    if include_reference:
        names += [n for n, e in entries.items() if not e.get("in_elevater_ic20")]
    return names


ELEVATER_IC20: tuple[str, ...] = tuple(list_tasks(include_reference=False))


def chinese_template_set(dataset: str) -> tuple[str, list[str]]:
    """(set name, templates) CN-CLIP uses for `dataset`; unmapped datasets fall back to its default set."""
    data = _load_json("cnclip_chinese_templates.json")
    mapping = data["dataset_to_template_set"]
    set_name = mapping.get(dataset, mapping["*"])
    return set_name, list(data["template_sets"][set_name])


def imagenet_chinese(source: str = "cnclip") -> tuple[list[str], list[str] | None]:
    """ImageNet-1k Chinese class names (and templates for the CLIP_benchmark variant)."""
    data = _load_json("imagenet1k_zh.json")
    if source == "cnclip":
        return list(data["classnames_cnclip"]), None
    if source == "clip_benchmark":
        return list(data["classnames_clip_benchmark"]), list(data["templates_clip_benchmark_cn"])
    raise ConfigError(f"unknown Chinese ImageNet source {source!r}; valid: ['cnclip', 'clip_benchmark']")


def read_classnames_file(path: str | os.PathLike) -> list[str]:
    """One class name a line (`labels.txt`, `label_cn.txt`, `classnames.txt`); blank lines are errors."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataError(f"class-name file {path} does not exist")
    try:
        with open(path, encoding="utf-8-sig") as handle:
            lines = handle.read().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read class-name file {path}: {exc}") from exc
    while lines and not lines[-1].strip():
        lines.pop()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            raise DataError(f"{path}:{number}: empty class name")
    return [line.strip() for line in lines]


def _spec_from_entry(name: str, entry: dict) -> TaskSpec:
    splits = {split: info["index_path"] for split, info in entry.get("splits", {}).items()}
    transform = entry.get("test_transform", {})
    return TaskSpec(
        name=name,
        classnames=tuple(first_synonym(c) for c in entry["classnames"]),
        templates=tuple(entry["templates"]),
        metric=entry["metric"],
        multilabel=entry.get("type") == "classification_multilabel",
        language="en",
        annotation_format=entry.get("annotation_format"),
        root_folder=entry.get("root_folder"),
        splits=splits,
        labelmap=entry.get("labelmap"),
        in_benchmark=bool(entry.get("in_elevater_ic20")),
        center_crop=bool(transform.get("center_crop", True)),
        interpolation=transform.get("interpolation", "bicubic"),
        image_size=transform.get("image_size"),
    )


_CUSTOM_TASKS: dict[str, TaskSpec] = {}


def get_task(name: str, language: str = "en", *, classnames: Sequence[str] | None = None,
             classnames_file: str | os.PathLike | None = None, templates: Sequence[str] | None = None,
             zh_source: str = "cnclip") -> TaskSpec:
    """The task `name` in `language`, optionally with user class names or templates.

    Chinese: templates come from CN-CLIP's per-dataset sets; class names from `classnames` /
    `classnames_file` (e.g. the dataset's `label_cn.txt`), except ImageNet-1k whose Chinese names ship here.
    """
    if language not in LANGUAGES:
        raise ConfigError(f"unknown language {language!r}; valid: {list(LANGUAGES)}")
    if name in _CUSTOM_TASKS:
        spec = _CUSTOM_TASKS[name]
    else:
        entries = _english_entries()
        if name not in entries:
            raise ConfigError(f"unknown task {name!r}; registered: {list_tasks() + sorted(_CUSTOM_TASKS)}")
        spec = _spec_from_entry(name, entries[name])
    if classnames_file is not None:
        classnames = read_classnames_file(classnames_file)
    if language != spec.language:
        spec = _translate(spec, language, classnames, zh_source)
    elif classnames is not None:
        spec = spec.with_classnames(classnames)
    if templates is not None:
        spec = spec.with_templates(templates)
    return spec


def _translate(spec: TaskSpec, language: str, classnames: Sequence[str] | None, zh_source: str) -> TaskSpec:
    if language == "en":
        if classnames is None:
            raise ConfigError(f"task {spec.name!r} is {spec.language}; English class names must be given")
        return spec.with_classnames(classnames, language="en")
    templates = chinese_template_set(spec.name)[1]
    if spec.name in _CUSTOM_CHINESE:
        custom_names, custom_templates = _CUSTOM_CHINESE[spec.name]
        templates = custom_templates or templates
        classnames = classnames if classnames is not None else custom_names
    if spec.name == REFERENCE_TASK and classnames is None:
        classnames, benchmark_templates = imagenet_chinese(zh_source)
        templates = benchmark_templates or templates
    if classnames is None:
        raise ConfigError(f"task {spec.name!r}: Chinese class names do not ship with the registry; pass "
                          f"the dataset's label_cn.txt (classnames_file=... / --classnames-file)")
    return replace(spec.with_classnames(classnames, language="zh"), templates=tuple(templates))


# ---------------------------------------------------------------- custom tasks from YAML

_YAML_KEYS = {"classnames", "classnames_file", "templates", "metric", "multilabel", "language",
              "annotation_format", "splits", "in_benchmark", "classnames_zh", "templates_zh", "center_crop",
              "interpolation"}
# name -> (Chinese class names or None, Chinese templates or None) of custom tasks
_CUSTOM_CHINESE: dict[str, tuple[list[str] | None, list[str] | None]] = {}


def load_custom_tasks(path: str | os.PathLike, register: bool = True) -> list[TaskSpec]:
    """Tasks from a YAML file: `tasks: {name: {classnames|classnames_file, templates, metric, ...}}`.

    Parsed with `yaml.safe_load` only: a task file can describe data, never run code.
    """
    import yaml

    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as handle:
            document = yaml.safe_load(handle)
    except OSError as exc:
        raise DataError(f"cannot read task file {path}: {exc}") from exc
    except yaml.YAMLError as exc:
        raise DataError(f"{path}: invalid YAML: {exc}") from exc
    if not isinstance(document, dict) or not isinstance(document.get("tasks"), dict):
        raise ConfigError(f"{path}: expected a mapping with a 'tasks' mapping of name -> task")
    specs = []
    for name, entry in document["tasks"].items():
        specs.append(_custom_spec(path, str(name), entry))
        if register and (entry.get("classnames_zh") or entry.get("templates_zh")):
            _CUSTOM_CHINESE[str(name)] = (entry.get("classnames_zh"), entry.get("templates_zh"))
    if register:
        for spec in specs:
            _CUSTOM_TASKS[spec.name] = spec
    return specs


def _custom_spec(path: str, name: str, entry: Any) -> TaskSpec:
    if not isinstance(entry, dict):
        raise ConfigError(f"{path}: task {name!r} must be a mapping")
    unknown = set(entry) - _YAML_KEYS
    if unknown:
        raise ConfigError(f"{path}: task {name!r} has unknown keys {sorted(unknown)}; valid: {sorted(_YAML_KEYS)}")
    classnames = entry.get("classnames")
    if entry.get("classnames_file"):
        file = entry["classnames_file"]
        classnames = read_classnames_file(file if os.path.isabs(file) else os.path.join(os.path.dirname(path), file))
    if not classnames:
        raise ConfigError(f"{path}: task {name!r} needs 'classnames' or 'classnames_file'")
    templates = entry.get("templates") or ["{}"]
    splits = entry.get("splits") or {}
    return TaskSpec(name=name, classnames=tuple(first_synonym(c) for c in classnames), templates=tuple(templates),
                    metric=entry.get("metric", "accuracy"), multilabel=bool(entry.get("multilabel", False)),
                    language=entry.get("language", "en"), annotation_format=entry.get("annotation_format"),
                    splits={str(k): str(v) for k, v in splits.items()},
                    in_benchmark=bool(entry.get("in_benchmark", False)),
                    center_crop=bool(entry.get("center_crop", True)),
                    interpolation=entry.get("interpolation", "bicubic"))


def register_task(spec: TaskSpec) -> None:
    """Make a task (e.g. a demo task) reachable by name through `get_task`."""
    _CUSTOM_TASKS[spec.name] = spec


def registered_names() -> list[str]:
    """Every name `get_task` accepts: the registry's datasets, then custom tasks."""
    return list_tasks() + [name for name in _CUSTOM_TASKS if name not in list_tasks()]


def custom_task(name: str) -> TaskSpec | None:
    return _CUSTOM_TASKS.get(name)
