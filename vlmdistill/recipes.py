"""YAML recipes for `vlmdistill train`: one file = one experiment.

    plugin: kd
    config: {alpha: 0.5, temperature: 2.0}       # the plugin's typed config
    student: {path: runs/student, auto_class: AutoModelForCausalLM}
    teacher: {path: runs/teacher}                 # or "base" (PEFT student), or omitted
    data: {builder: text-blocks, kwargs: {tokenizer: runs/tokenizer, block: 64}}
    training: {max_steps: 200, per_device_train_batch_size: 16, learning_rate: 3.0e-4}
    output_dir: runs/kd-recipe

YAML is read with a safe loader (numbers such as `3e-4` read as numbers, as in YAML 1.2), and names in a recipe
select from fixed sets only (registered builders, transformers model classes); keyword arguments to
`from_pretrained` come from an allow-list that excludes anything able to run model-folder code or reach the
network. So a recipe can never import or call arbitrary code. Every section is typed: the plugin config by the
plugin, `training:` against `transformers.TrainingArguments`, both at load time (and so in `--dry-run`).
"""

from __future__ import annotations

import dataclasses
import enum
import os
import re
import typing
from typing import Any, Callable, Literal, Optional, Union

import yaml

from .config import PluginConfig, _coerce, _type_name, option
from .errors import ConfigError
from .hf import from_local_folder

_MODEL_BUILDERS: dict[str, Callable] = {}
_DATA_BUILDERS: dict[str, Callable] = {}


def register_model_builder(name: str):
    """Register `fn(**kwargs) -> nn.Module` under `name` for recipes' `student/teacher: {builder: name}`."""
    def deco(fn):
        _MODEL_BUILDERS[name] = fn
        return fn
    return deco


def register_data_builder(name: str):
    """Register `fn(student, teacher, **kwargs)` for `data: {builder: name}`. It returns
    `(train_dataset, data_collator)` or `(train_dataset, data_collator, wrap_kwargs)`, where `wrap_kwargs`
    are runtime arguments for the plugin (tokenizers, data fingerprints) passed on to `wrap()`."""
    def deco(fn):
        _DATA_BUILDERS[name] = fn
        return fn
    return deco


def _lookup(table: dict, name: str, what: str):
    if name not in table:
        raise ConfigError(f"unknown {what} {name!r}; registered: {', '.join(sorted(table)) or '(none)'}")
    return table[name]


class RecipeLoader(yaml.SafeLoader):
    """`yaml.SafeLoader` that also reads exponent floats without a dot (`3e-4`, `1E5`) as floats. PyYAML follows
    YAML 1.1, which reads them as strings; a learning rate written that way would otherwise crash the optimiser."""


RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)?(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789."))


def read_yaml(text_or_stream) -> Any:
    return yaml.load(text_or_stream, Loader=RecipeLoader)


#: `from_pretrained` keyword arguments a recipe may set: none of them runs code or reaches the network
FROM_PRETRAINED_KWARGS = ("dtype", "torch_dtype", "attn_implementation", "low_cpu_mem_usage", "device_map",
                          "max_memory", "subfolder", "variant", "use_safetensors", "ignore_mismatched_sizes",
                          "offload_folder", "tie_word_embeddings")
_REFUSED_KWARGS = {
    "trust_remote_code": "it imports and runs Python files shipped in the model folder",
    "code_revision": "it selects model-folder code to run",
    "revision": "it selects a version on a model hub (network)",
    "token": "it authenticates to a model hub (network)",
    "use_auth_token": "it authenticates to a model hub (network)",
    "force_download": "it downloads",
    "proxies": "it configures downloads",
    "cache_dir": "it points at a download cache; give the model folder as `path`",
    "local_files_only": "recipes always load local files only",
}


def check_from_pretrained_kwargs(kwargs: dict[str, Any], where: str) -> None:
    for key in kwargs:
        if key in _REFUSED_KWARGS:
            raise ConfigError(f"{where}.kwargs.{key}: refused, because {_REFUSED_KWARGS[key]}. A recipe never runs "
                              "model-folder code or reaches the network; load such a model in Python and call "
                              "vlmdistill.wrap yourself")
        if key not in FROM_PRETRAINED_KWARGS:
            raise ConfigError(f"{where}.kwargs.{key}: not an allowed from_pretrained argument; allowed: "
                              f"{', '.join(FROM_PRETRAINED_KWARGS)}")


@dataclasses.dataclass
class LoraSpec(PluginConfig):
    r: int = option(8, "LoRA rank", ge=1)
    alpha: int = option(16, "LoRA scaling numerator")
    dropout: float = option(0.0, "LoRA dropout", ge=0.0, lt=1.0)
    target_modules: list[str] = option(default_factory=lambda: ["q_proj", "v_proj"], help="module names to adapt")


@dataclasses.dataclass
class ModelSpec(PluginConfig):
    builder: Optional[str] = option(None, "a registered model builder")
    path: Optional[str] = option(None, "local folder of a transformers model (saved with save_pretrained)")
    auto_class: str = option("AutoModelForCausalLM", "transformers class used to load `path`: an Auto* class "
                                                     "or a model class such as LlavaForConditionalGeneration")
    kwargs: dict[str, Any] = option(default_factory=dict, help="builder arguments, or from_pretrained arguments")
    lora: Optional[LoraSpec] = option(None, "wrap the model with PEFT LoRA adapters")

    def validate(self, where=None):
        super().validate(where)
        if (self.builder is None) == (self.path is None):
            raise ConfigError(f"{where or 'model'}: give exactly one of `builder` or `path`")
        if self.path is not None:
            check_from_pretrained_kwargs(self.kwargs, where or "model")


@dataclasses.dataclass
class DataSpec(PluginConfig):
    builder: str = option(help="a registered data builder")
    kwargs: dict[str, Any] = option(default_factory=dict, help="builder arguments")


@dataclasses.dataclass
class Recipe(PluginConfig):
    plugin: str = option(help="registered plugin name (see `vlmdistill plugins`)")
    student: ModelSpec = option(help="the model being trained")
    data: DataSpec = option(help="training data")
    teacher: Optional[Union[ModelSpec, Literal["base"]]] = option(
        None, "teacher model; 'base' = the PEFT student with adapters disabled; omit for plugins that build their own")
    config: dict[str, Any] = option(default_factory=dict, help="the plugin's config (checked by the plugin)")
    training: dict[str, Any] = option(default_factory=dict, help="transformers.TrainingArguments fields")
    output_dir: str = option("runs/recipe", "where checkpoints, the final wrapper and the exported student go")
    resume: Union[bool, Literal["auto", "force"]] = option(
        "auto", "'auto': continue the run in output_dir if it ran this same recipe; true: require such a run; "
                "'force': continue it even though the recipe changed; false: refuse an output_dir holding a run")
    seed: int = option(0, "random seed for model building and training")
    on_nonfinite: Literal["raise", "skip"] = option(
        "raise", "a NaN/inf loss term stops the run naming the term and step ('raise'), or drops that step ('skip')")

    def validate(self, where=None):
        super().validate(where)
        self.training = check_training_fields(self.training, f"{where or 'recipe'}.training")


def load_recipe(path: str, overrides: list[str] | None = None) -> Recipe:
    """Read a recipe; `overrides` are `dotted.key=yaml_value` strings (e.g. `training.max_steps=10`)."""
    if not os.path.isfile(path):
        raise ConfigError(f"recipe {path} does not exist")
    with open(path) as fh:
        try:
            values = read_yaml(fh) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: a recipe is a mapping at the top level")
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        target = values
        parts = key.split(".")
        for part in parts[:-1]:
            target = target.setdefault(part, {})
            if not isinstance(target, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a mapping")
        target[parts[-1]] = read_yaml(raw)
    recipe = Recipe.from_dict(values, where=os.path.basename(path))
    from .api import build_config
    from .registry import get_plugin

    build_config(get_plugin(recipe.plugin), recipe.config, {})  # typos in the plugin config fail here too
    return recipe


def build_model(spec: ModelSpec, *, role: str):
    if spec.builder is not None:
        model = _lookup(_MODEL_BUILDERS, spec.builder, "model builder")(**spec.kwargs)
    else:
        import transformers

        cls = getattr(transformers, spec.auto_class, None)
        if cls is None or not hasattr(cls, "from_pretrained"):
            raise ConfigError(f"{role}.auto_class {spec.auto_class!r} is not a transformers model class")
        check_from_pretrained_kwargs(spec.kwargs, role)
        model = from_local_folder(cls, spec.path, role=f"{role}.path", **spec.kwargs)
    if spec.lora is not None:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=spec.lora.r, lora_alpha=spec.lora.alpha,
                                                 lora_dropout=spec.lora.dropout,
                                                 target_modules=list(spec.lora.target_modules)))
    return model


def check_training_fields(training: dict[str, Any], where: str = "training") -> dict[str, Any]:
    """Names and types of `training:` checked against `TrainingArguments` (without building it)."""
    from transformers import TrainingArguments

    fields = {f.name: f for f in dataclasses.fields(TrainingArguments) if f.init}
    hints = typing.get_type_hints(TrainingArguments)
    unknown = sorted(set(training) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown TrainingArguments field(s) {unknown}. Valid fields: "
                          f"{', '.join(sorted(fields))}")
    if "output_dir" in training:
        raise ConfigError(f"{where}.output_dir: set the recipe's top-level output_dir instead")
    return {name: _coerce_training_value(value, hints[name], f"{where}.{name}") for name, value in training.items()}


def _coerce_training_value(value: Any, tp: Any, where: str) -> Any:
    # transformers' choice fields are `SomeEnum | str`: a plain `str` would accept any typo, so check the choices.
    choices = [arg for arg in typing.get_args(tp) if isinstance(arg, type) and issubclass(arg, enum.Enum)]
    if choices and isinstance(value, str):
        valid = [member.value for member in choices[0]]
        if value not in valid:
            raise ConfigError(f"{where}: {value!r} is not one of {valid}")
        return value
    if tp in (float, Optional[float]) and isinstance(value, str):
        raise ConfigError(f"{where}: expected a number, got the string {value!r}")
    try:
        return _coerce(value, tp, where)
    except ConfigError:
        raise ConfigError(f"{where}: {value!r} ({type(value).__name__}) does not match {_type_name(tp)}") from None


def training_arguments(recipe: Recipe):
    """The run's `TrainingArguments`; their own cross-field checks become `ConfigError`s."""
    from transformers import TrainingArguments

    training = check_training_fields(recipe.training)
    defaults = {"report_to": [], "save_strategy": "steps", "save_steps": 100, "logging_steps": 10,
                "seed": recipe.seed, "use_cpu": not _cuda_available()}
    try:
        return TrainingArguments(output_dir=os.path.join(recipe.output_dir, "checkpoints"),
                                 **{**defaults, **training})
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"training: {exc}") from None


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def run_recipe(recipe: Recipe, callbacks: list | None = None, progress: bool = False) -> dict[str, Any]:
    """Build, wrap and train; write the final wrapper and the exported student. Returns a summary.

    Rerun into the same output_dir, it resumes the same recipe from its last whole checkpoint, and returns the
    stored summary (training nothing) when that run already finished. `callbacks`: extra `TrainerCallback`s.
    Every run writes `log_history.jsonl` and `plots/<term>.png` into output_dir; `progress` shows a progress bar
    with the current loss terms instead of the Trainer's printed log dicts."""
    import torch

    from .api import unwrap, wrap
    from .callback import DistillationTrainer
    from .registry import get_plugin
    from .run_report import RunReport, remove_log_printers
    from .runs import finish_run, plan_run

    plugin_cls = get_plugin(recipe.plugin)  # importing the plugin registers its builders
    args = training_arguments(recipe)
    plan = plan_run(recipe, args.output_dir)
    if plan.finished is not None:
        return plan.finished
    torch.manual_seed(recipe.seed)
    student = build_model(recipe.student, role="student")
    if isinstance(recipe.teacher, ModelSpec):
        teacher = build_model(recipe.teacher, role="teacher")
    else:
        teacher = recipe.teacher
    built = _lookup(_DATA_BUILDERS, recipe.data.builder, "data builder")(student, teacher, **recipe.data.kwargs)
    train_dataset, collator, wrap_kwargs = (*built, {}) if len(built) == 2 else built
    # Generic builders offer every runtime object they have (tokenizers, fingerprints); each plugin takes its own.
    wrap_kwargs = {k: v for k, v in wrap_kwargs.items() if k in plugin_cls.runtime_args}
    wrapped = wrap(student, plugin=plugin_cls.name, teacher=teacher, config=recipe.config,
                   on_nonfinite=recipe.on_nonfinite, **wrap_kwargs)
    report = RunReport(recipe.output_dir, progress=progress)
    trainer = DistillationTrainer(model=wrapped, args=args, train_dataset=train_dataset, data_collator=collator,
                                  callbacks=[*(callbacks or []), report])
    if progress:
        remove_log_printers(trainer)
    result = trainer.train(resume_from_checkpoint=plan.checkpoint)
    final_dir = os.path.join(recipe.output_dir, "final")
    wrapped.save_pretrained(final_dir)
    student_dir = os.path.join(recipe.output_dir, "student")
    wrapped.plugin.save_student(unwrap(wrapped), student_dir)
    summary = {"resumed_from": plan.checkpoint, "global_step": trainer.state.global_step,
               "train_loss": result.training_loss, "final": final_dir, "student": student_dir,
               "log_file": report.log_path, "plots": report.plots, "log_history": trainer.state.log_history}
    finish_run(recipe, summary)
    return summary


# ---------------------------------------------------------------------------- built-in builders
@register_model_builder("from-config")
def _model_from_config(model_type: str, auto_class: str = "AutoModelForCausalLM", seed: int = 0, **config):
    """A randomly initialised transformers model: `{model_type: llama, hidden_size: 64, ...}`."""
    import torch
    import transformers

    cls = getattr(transformers, auto_class, None)
    if cls is None or not hasattr(cls, "from_config"):
        raise ConfigError(f"auto_class {auto_class!r} is not a transformers Auto class")
    torch.manual_seed(seed)
    return cls.from_config(transformers.AutoConfig.for_model(model_type, **config))


@register_data_builder("text-blocks")
def _text_blocks(student, teacher, tokenizer: str, files: Optional[list[str]] = None, block: int = 64,
                 max_blocks: Optional[int] = None, split: str = "train"):
    """Causal-LM blocks from local text files, or from the standard-library docstring corpus when no
    files are given. `tokenizer` is a local tokenizer folder."""
    import torch
    from transformers import AutoTokenizer

    from .data.text import pack_examples, split_by_module, stdlib_docstrings
    from .errors import DataError

    tok = from_local_folder(AutoTokenizer, tokenizer, role="data.kwargs.tokenizer")
    if files:
        texts = []
        for path in files:
            if not os.path.isfile(path):
                raise DataError(f"text file {path} does not exist")
            with open(path, encoding="utf-8") as fh:
                texts.extend(p for p in fh.read().split("\n\n") if p.strip())
    else:
        train, held = split_by_module(stdlib_docstrings())
        texts = train if split == "train" else held
    blocks = pack_examples(texts, tok, block, max_blocks)

    class Blocks(torch.utils.data.Dataset):
        def __len__(self):
            return blocks.shape[0]

        def __getitem__(self, i):
            return {"input_ids": blocks[i], "attention_mask": torch.ones_like(blocks[i]), "labels": blocks[i]}

    def collate(items):
        return {k: torch.stack([it[k] for it in items]) for k in items[0]}

    return Blocks(), collate


# ---------------------------------------------------------------------------- image-text pairs, open_clip
@register_model_builder("open-clip")
def _open_clip_model(**kwargs):
    """An open_clip model from local files: `{model: NAME, checkpoint: FILE}`, `{config: JSON, checkpoint: FILE}`
    or `{model: local-dir:FOLDER}` (see `vlmdistill.open_clip_models`)."""
    from .open_clip_models import load_open_clip

    return load_open_clip(**kwargs)


@register_data_builder("image-text")
def _image_text(student, teacher, **kwargs):
    """Image–text pairs from an image folder with metadata.jsonl / metadata.csv or a `datasets` folder,
    preprocessed for the student (and the teacher); see `vlmdistill.data.image_text.build_image_text`."""
    from .data.image_text import build_image_text

    return build_image_text(student, teacher, **kwargs)
