"""YAML recipes for `vlmdistill train`: one file = one experiment.

    plugin: kd
    config: {alpha: 0.5, temperature: 2.0}       # the plugin's typed config
    student: {path: runs/student, auto_class: AutoModelForCausalLM}
    teacher: {path: runs/teacher}                 # or "base" (PEFT student), or omitted
    data: {builder: stdlib-text, kwargs: {tokenizer: runs/tokenizer, block: 64}}
    training: {max_steps: 200, per_device_train_batch_size: 16, learning_rate: 3.0e-4}
    output_dir: runs/kd-recipe

YAML is read with `yaml.safe_load`, and names in a recipe select from fixed sets only (registered
builders, transformers model classes), so a recipe can never import or call arbitrary code.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Literal, Optional, Union

import yaml

from .config import PluginConfig, option
from .errors import ConfigError

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


@dataclasses.dataclass
class LoraSpec(PluginConfig):
    r: int = option(8, "LoRA rank", ge=1)
    alpha: int = option(16, "LoRA scaling numerator")
    dropout: float = option(0.0, "LoRA dropout", ge=0.0, lt=1.0)
    target_modules: list[str] = option(default_factory=lambda: ["q_proj", "v_proj"], help="module names to adapt")


@dataclasses.dataclass
class ModelSpec(PluginConfig):
    builder: Optional[str] = option(None, "a registered model builder (see `vlmdistill plugins --builders`)")
    path: Optional[str] = option(None, "local folder of a transformers model (saved with save_pretrained)")
    auto_class: str = option("AutoModelForCausalLM", "transformers class used to load `path`: an Auto* class "
                                                     "or a model class such as LlavaForConditionalGeneration")
    kwargs: dict[str, Any] = option(default_factory=dict, help="builder arguments, or from_pretrained arguments")
    lora: Optional[LoraSpec] = option(None, "wrap the model with PEFT LoRA adapters")

    def validate(self, where=None):
        super().validate(where)
        if (self.builder is None) == (self.path is None):
            raise ConfigError(f"{where or 'model'}: give exactly one of `builder` or `path`")


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
    resume: Union[bool, Literal["auto"]] = option(
        "auto", "'auto': continue from the last checkpoint in output_dir if there is one; true: require one")
    seed: int = option(0, "random seed for model building and training")


def load_recipe(path: str, overrides: list[str] | None = None) -> Recipe:
    """Read a recipe; `overrides` are `dotted.key=yaml_value` strings (e.g. `training.max_steps=10`)."""
    if not os.path.isfile(path):
        raise ConfigError(f"recipe {path} does not exist")
    with open(path) as fh:
        try:
            values = yaml.safe_load(fh) or {}
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
        target[parts[-1]] = yaml.safe_load(raw)
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
        if not os.path.isdir(spec.path):
            raise ConfigError(f"{role}.path {spec.path!r} is not a local folder (nothing is downloaded)")
        model = cls.from_pretrained(spec.path, **spec.kwargs)
    if spec.lora is not None:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=spec.lora.r, lora_alpha=spec.lora.alpha,
                                                 lora_dropout=spec.lora.dropout,
                                                 target_modules=list(spec.lora.target_modules)))
    return model


def training_arguments(recipe: Recipe):
    from transformers import TrainingArguments

    valid = {f.name for f in dataclasses.fields(TrainingArguments) if f.init}
    unknown = sorted(set(recipe.training) - valid)
    if unknown:
        raise ConfigError(f"training: unknown TrainingArguments field(s) {unknown}")
    if "output_dir" in recipe.training:
        raise ConfigError("training.output_dir: set the recipe's top-level output_dir instead")
    defaults = {"report_to": [], "save_strategy": "steps", "save_steps": 100, "logging_steps": 10,
                "seed": recipe.seed, "use_cpu": not _cuda_available()}
    return TrainingArguments(output_dir=os.path.join(recipe.output_dir, "checkpoints"),
                             **{**defaults, **recipe.training})


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def run_recipe(recipe: Recipe) -> dict[str, Any]:
    """Build, wrap and train; write the final wrapper and the exported student. Returns a summary."""
    import torch
    from transformers.trainer_utils import get_last_checkpoint

    from .api import unwrap, wrap
    from .callback import DistillationTrainer
    from .registry import get_plugin

    plugin_cls = get_plugin(recipe.plugin)  # importing the plugin registers its builders
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
    wrapped = wrap(student, plugin=plugin_cls.name, teacher=teacher, config=recipe.config, **wrap_kwargs)
    args = training_arguments(recipe)
    checkpoint = None
    if recipe.resume:
        checkpoint = get_last_checkpoint(args.output_dir) if os.path.isdir(args.output_dir) else None
        if recipe.resume is True and checkpoint is None:
            raise ConfigError(f"resume: true, but {args.output_dir} holds no checkpoint")
    trainer = DistillationTrainer(model=wrapped, args=args, train_dataset=train_dataset, data_collator=collator)
    result = trainer.train(resume_from_checkpoint=checkpoint)
    final_dir = os.path.join(recipe.output_dir, "final")
    wrapped.save_pretrained(final_dir)
    student_dir = os.path.join(recipe.output_dir, "student")
    wrapped.plugin.save_student(unwrap(wrapped), student_dir)
    return {"resumed_from": checkpoint, "global_step": trainer.state.global_step,
            "train_loss": result.training_loss, "final": final_dir, "student": student_dir,
            "log_history": trainer.state.log_history}


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

    if not os.path.isdir(tokenizer):
        raise ConfigError(f"data.kwargs.tokenizer {tokenizer!r} is not a local folder")
    tok = AutoTokenizer.from_pretrained(tokenizer)
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
