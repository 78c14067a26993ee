"""YAML recipes for `vlmdistill train`: one file = one experiment.

    plugin: kd
    config: {alpha: 0.5, temperature: 2.0}       # the plugin's typed config
    student: {path: runs/student}                 # the class comes from the folder's config.json
    teacher: {path: runs/teacher}                 # or "base" (PEFT student), or omitted
    data: {builder: text-blocks, kwargs: {tokenizer: runs/tokenizer, block: 64}}
    eval_data: {builder: text-blocks, kwargs: {tokenizer: runs/tokenizer, split: held_out}}   # optional
    training: {max_steps: 200, per_device_train_batch_size: 16, learning_rate: 3.0e-4}
    output_dir: runs/kd-recipe

YAML is read with a safe loader (numbers such as `3e-4` read as numbers, as in YAML 1.2), and names in a recipe
select from fixed sets only (registered builders, transformers model classes); keyword arguments to
`from_pretrained` come from an allow-list that excludes anything able to run model-folder code or reach the
network. So a recipe can never import or call arbitrary code. Every section is typed: the plugin config by the
plugin, `training:` against `transformers.TrainingArguments`, both at load time (and so in `--dry-run`).
The processors / tokenizers saved in the model folders go to the data builder and to `wrap()`, and the export
saves the student's beside it.
"""

from __future__ import annotations

import dataclasses
import enum
import importlib
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
_DATA_CHECKS: dict[str, Callable] = {}


# Modules of the library's own builders; a plugin names its modules in `DistillationPlugin.recipe_builders`. They are
# imported only when a recipe looks a builder up (`load_builders`), so importing a plugin registers nothing.
CORE_BUILDER_MODULES = ("vlmdistill.data.image_text",)
_builders_loaded = False


def _registrar(table: dict[str, Callable], what: str, name: str):
    def deco(fn):
        known = table.get(name)
        if known is not None and (known.__module__, known.__qualname__) != (fn.__module__, fn.__qualname__):
            raise ConfigError(f"{what} {name!r} is registered twice: by {known.__module__}.{known.__qualname__} "
                              f"and by {fn.__module__}.{fn.__qualname__}; give one of them another name")
        table[name] = fn
        return fn
    return deco


def register_model_builder(name: str):
    """Register `fn(**kwargs) -> nn.Module` under `name` for recipes' `student/teacher: {builder: name}`.
    A name already taken by another function is refused."""
    return _registrar(_MODEL_BUILDERS, "model builder", name)


def register_data_builder(name: str):
    """Register `fn(student, teacher, **kwargs)` for `data: {builder: name}`. It returns
    `(train_dataset, data_collator)` or `(train_dataset, data_collator, wrap_kwargs)`, where `wrap_kwargs`
    are runtime arguments for the plugin (tokenizers, data fingerprints) passed on to `wrap()`. A builder that
    names `plugin`, `student_processor`, `student_tokenizer` or `teacher_tokenizer` as a keyword parameter gets
    the recipe's plugin name and the processor / tokenizers saved in the model folders."""
    return _registrar(_DATA_BUILDERS, "data builder", name)


def register_data_check(name: str):
    """Register `fn(config, **builder_kwargs) -> str` for `--dry-run`: it reads and checks the data of the builder
    `name` without any model (the plugin's typed `config` included) and returns a one-line summary."""
    return _registrar(_DATA_CHECKS, "data check", name)


def load_builders() -> None:
    """Import the core builder modules and every installed plugin's `recipe_builders` modules (once)."""
    global _builders_loaded
    if _builders_loaded:
        return
    from .registry import get_plugin, list_plugins

    modules = list(CORE_BUILDER_MODULES)
    for name in list_plugins():
        named = get_plugin(name).recipe_builders or ()
        modules += [named] if isinstance(named, str) else list(named)
    for module in modules:
        importlib.import_module(module)
    _builders_loaded = True


def registered_builders() -> dict[str, list[str]]:
    """Names of every registered model builder, data builder and data check."""
    load_builders()
    return {"model": sorted(_MODEL_BUILDERS), "data": sorted(_DATA_BUILDERS), "check": sorted(_DATA_CHECKS)}


def _lookup(table: dict, name: str, what: str):
    load_builders()
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
    auto_class: Optional[str] = option(
        None, "transformers class used to load `path` (an Auto* class or a model class such as "
              "LlavaForConditionalGeneration); default: the class the folder's config.json names")
    processor: Optional[str] = option(
        None, "folder of the processor or tokenizer (default: `path`); recipes pass it to the data builder and, as "
              "tokenizers, to wrap() for the vocabulary check, and the export saves it beside the student")
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
class DistributedSpec(PluginConfig):
    """How student and teacher are spread over the processes of `accelerate launch` / `torchrun`."""

    strategy: Literal["ddp", "fsdp2", "zero3"] = option(
        "ddp", "'ddp': a full copy per process (also one process); 'fsdp2': PyTorch FSDP2 through the Trainer, one "
               "unit per student block; 'zero3': DeepSpeed ZeRO-3 through the Trainer "
               "(pip install vlmdistill[deepspeed])")
    teacher: Literal["replicate", "shard", "offload"] = option(
        "replicate", "teacher placement: a full copy per process; sharded like the student; or sharded with its "
                     "shards in CPU memory (EMA teachers of msd/ccd under zero3: replicate only)")
    reshard_after_forward: bool = option(True, "fsdp2: free gathered student blocks after their forward")
    cpu_offload: bool = option(False, "student parameters (and ZeRO-3 optimizer state) in CPU memory")
    state_dict_type: Literal["SHARDED_STATE_DICT", "FULL_STATE_DICT"] = option(
        "SHARDED_STATE_DICT", "fsdp2 checkpoints: one file per rank (DCP) or gathered on rank 0")
    deepspeed: dict[str, Any] = option(default_factory=dict,
                                       help="zero3: DeepSpeed config entries merged over the defaults")

    def training_arguments(self) -> dict[str, Any]:
        """TrainingArguments fields for this strategy."""
        if self.strategy == "fsdp2":
            return {"fsdp": True, "fsdp_config": {"version": 2, "reshard_after_forward": self.reshard_after_forward,
                                                  "cpu_offload": self.cpu_offload,
                                                  "state_dict_type": self.state_dict_type}}
        if self.strategy == "zero3":
            from .zero3 import zero3_config

            return {"deepspeed": zero3_config(offload=self.cpu_offload, **self.deepspeed)}
        return {}


@dataclasses.dataclass
class Recipe(PluginConfig):
    plugin: str = option(help="registered plugin name (see `vlmdistill plugins`)")
    student: ModelSpec = option(help="the model being trained")
    data: DataSpec = option(help="training data")
    eval_data: Optional[DataSpec] = option(None, "evaluation data, evaluated every `eval_steps` (default: save_steps)")
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
    distributed: DistributedSpec = option(
        default_factory=DistributedSpec,
        help="data parallelism: DDP, FSDP2 or DeepSpeed ZeRO-3, and the teacher's place")

    def validate(self, where=None):
        super().validate(where)
        self.training = check_training_fields(self.training, f"{where or 'recipe'}.training")
        taken = sorted({"fsdp", "fsdp_config", "deepspeed"} & set(self.training))
        if taken and self.distributed.strategy != "ddp":
            raise ConfigError(f"{where or 'recipe'}: training.{taken[0]} and distributed.strategy="
                              f"{self.distributed.strategy!r} both configure sharding; keep one")


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
        from .checkpoints import model_class

        cls, _ = model_class(spec.path, spec.auto_class, role)
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
    # Builders' datasets hand raw columns (conversations, images) to their collators: the Trainer must keep them.
    defaults = {"report_to": [], "save_strategy": "steps", "save_steps": 100, "logging_steps": 10,
                "seed": recipe.seed, "use_cpu": not _cuda_available(), "remove_unused_columns": False}
    sharding = recipe.distributed.training_arguments()
    if "deepspeed" in sharding:
        defaults.pop("use_cpu")  # DeepSpeed picks its own accelerator (its CPU one without a GPU)
        if not _cuda_available():  # accelerate would count one process where DeepSpeed has them all
            from .zero3 import cpu_accelerator_state

            defaults["accelerator_config"] = cpu_accelerator_state()
    if recipe.eval_data is not None:  # evaluate at every checkpoint; the loss only, never gathered logits
        defaults.update(eval_strategy="steps", eval_steps=training.get("save_steps", 100), prediction_loss_only=True)
    try:
        return TrainingArguments(output_dir=os.path.join(recipe.output_dir, "checkpoints"),
                                 **{**defaults, **sharding, **training})
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"training: {exc}") from None


@dataclasses.dataclass
class RecipeFolders:
    """The processors / tokenizers saved in the student's and the teacher's model folders."""

    student_processor: Any = None
    teacher_processor: Any = None

    @classmethod
    def load(cls, recipe: Recipe) -> "RecipeFolders":
        from .checkpoints import load_processor

        def folder(spec):
            return (spec.processor or spec.path) if isinstance(spec, ModelSpec) else None

        return cls(load_processor(folder(recipe.student)), load_processor(folder(recipe.teacher)))

    def runtime(self) -> dict[str, Any]:
        """Runtime arguments for wrap(): the tokenizers (a real vocabulary check) and the student's processor."""
        from .checkpoints import is_multimodal, tokenizer_of

        out = {"student_tokenizer": tokenizer_of(self.student_processor),
               "teacher_tokenizer": tokenizer_of(self.teacher_processor),
               "student_processor": self.student_processor if is_multimodal(self.student_processor) else None}
        return {k: v for k, v in out.items() if v is not None}

    def offer(self, plugin: str) -> dict[str, Any]:
        """What a data builder may ask for by naming it as a parameter."""
        return {"plugin": plugin, "student_processor": self.student_processor, **self.runtime()}


def builder_arguments(spec: DataSpec, offered: dict[str, Any]) -> tuple[Callable, dict[str, Any]]:
    """The registered builder and its keyword arguments: the recipe's (checked against its signature) plus each
    offered object (`plugin`, `student_processor`, `student_tokenizer`, `teacher_tokenizer`) it names."""
    import inspect

    fn = _lookup(_DATA_BUILDERS, spec.builder, "data builder")
    params = inspect.signature(fn).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        valid = [n for n in params if n not in ("student", "teacher") and n not in offered]
        unknown = sorted(set(spec.kwargs) - set(valid))
        if unknown:
            raise ConfigError(f"data builder {spec.builder!r}: unknown argument(s) {unknown}; "
                              f"valid: {', '.join(valid)}")
        missing = [n for n, p in params.items() if p.default is p.empty and p.kind is not p.VAR_POSITIONAL
                   and n not in ("student", "teacher") and n not in spec.kwargs and n not in offered]
        if missing:
            raise ConfigError(f"data builder {spec.builder!r}: missing argument(s) {missing}")
    return fn, {**spec.kwargs, **{k: v for k, v in offered.items() if k in params and k not in spec.kwargs}}


def build_data(spec: DataSpec, student, teacher, offered: dict[str, Any]):
    """`(dataset, collator, wrap_kwargs)` from a registered builder."""
    fn, kwargs = builder_arguments(spec, offered)
    built = fn(student, teacher, **kwargs)
    return (*built, {}) if len(built) == 2 else built


@dataclasses.dataclass
class BuiltRecipe:
    """What a recipe builds before training (`build`)."""

    student: Any
    teacher: Any  # a model, "base" (PEFT student) or None
    train_dataset: Any
    data_collator: Any
    #: runtime arguments for the recipe's plugin: the tokenizers of the model folders and what the data builder
    #: returned (tokenizers, data fingerprints), only those the plugin takes
    wrap_kwargs: dict[str, Any]
    eval_dataset: Any = None
    eval_collator: Any = None
    folders: Optional[RecipeFolders] = None


def build(recipe: Recipe, *, eval_data: bool = True) -> BuiltRecipe:
    """Build a recipe's student, teacher and data exactly as `vlmdistill train` does (seeded with the recipe's
    `seed`), without wrapping or training. `eval_data=False` skips the evaluation data. Then

        built = build(recipe)
        model = vlmdistill.wrap(built.student, plugin=recipe.plugin, teacher=built.teacher, config=recipe.config,
                                **built.wrap_kwargs)
    """
    import torch

    from .registry import get_plugin

    plugin_cls = get_plugin(recipe.plugin)
    torch.manual_seed(recipe.seed)
    student = build_model(recipe.student, role="student")
    teacher = build_model(recipe.teacher, role="teacher") if isinstance(recipe.teacher, ModelSpec) else recipe.teacher
    folders = RecipeFolders.load(recipe)
    offered = folders.offer(plugin_cls.name)
    train_dataset, collator, wrap_kwargs = build_data(recipe.data, student, teacher, offered)
    eval_dataset = eval_collator = None
    if eval_data and recipe.eval_data is not None:
        eval_dataset, eval_collator, _ = build_data(recipe.eval_data, student, teacher, offered)
    # Generic builders offer every runtime object they have (tokenizers, fingerprints); each plugin takes its own.
    wrap_kwargs = {k: v for k, v in {**folders.runtime(), **wrap_kwargs}.items() if k in plugin_cls.runtime_args}
    return BuiltRecipe(student, teacher, train_dataset, collator, wrap_kwargs, eval_dataset, eval_collator, folders)


def check_recipe(recipe: Recipe) -> list[str]:
    """What `--dry-run` checks beyond the recipe's types, without building a model: model folders (config,
    class, weights, processor), builders and their arguments, and the data where the builder registered a
    check. One line per part."""
    from .api import build_config
    from .checkpoints import describe_folder
    from .registry import get_plugin

    plugin_cls = get_plugin(recipe.plugin)
    config = build_config(plugin_cls, recipe.config, {})
    lines = [f"plugin: {plugin_cls.name} ({type(config).__name__} checked)"]
    for role, spec in (("student", recipe.student), ("teacher", recipe.teacher)):
        if not isinstance(spec, ModelSpec):
            lines.append(f"{role}: {spec!r}")
        elif spec.path is not None:
            lines.append(describe_folder(spec, role))
        else:
            _lookup(_MODEL_BUILDERS, spec.builder, "model builder")
            lines.append(f"{role}: builder {spec.builder} (built when training starts)")
    offered = RecipeFolders.load(recipe).offer(plugin_cls.name)
    for name, spec in (("data", recipe.data), ("eval_data", recipe.eval_data)):
        if spec is None:
            continue
        fn, kwargs = builder_arguments(spec, offered)
        load_builders()
        check = _DATA_CHECKS.get(spec.builder)
        if check is None:
            lines.append(f"{name}: builder {spec.builder}, arguments checked (its data is read when training starts)")
        else:
            lines.append(f"{name}: {check(config, **kwargs)}")
    return lines


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def run_recipe(recipe: Recipe, callbacks: list | None = None, progress: bool = False) -> dict[str, Any]:
    """Build, wrap and train; write the final wrapper and the exported student. Returns a summary.

    Rerun into the same output_dir, it resumes the same recipe from its last whole checkpoint, and returns the
    stored summary (training nothing) when that run already finished. `callbacks`: extra `TrainerCallback`s.
    Every run writes `log_history.jsonl` and `plots/<term>.png` into output_dir; `progress` shows a progress bar
    with the current loss terms instead of the Trainer's printed log dicts."""
    from .api import unwrap, wrap
    from .registry import get_plugin
    from .run_report import RunReport, remove_log_printers
    from .runs import finish_run, plan_run

    plugin_cls = get_plugin(recipe.plugin)
    # Once TrainingArguments with ZeRO-3 exist, transformers builds models partitioned (zero.Init): an EMA teacher
    # cannot copy such a student, and a replicated teacher would run outside DeepSpeed's engine. Under ZeRO-3 the
    # models are built whole first; the Trainer partitions the wrapper, `distributed.teacher` the teacher.
    args = None if recipe.distributed.strategy == "zero3" else training_arguments(recipe)
    plan = plan_run(recipe, os.path.join(recipe.output_dir, "checkpoints"))
    if plan.finished is not None:
        return plan.finished
    built = build(recipe)
    wrapped = wrap(built.student, plugin=plugin_cls.name, teacher=built.teacher, config=recipe.config,
                   on_nonfinite=recipe.on_nonfinite, **built.wrap_kwargs)
    args = args or training_arguments(recipe)
    _place_teacher(wrapped, recipe.distributed)
    report = RunReport(recipe.output_dir, progress=progress)
    trainer = _recipe_trainer_class()(model=wrapped, args=args, train_dataset=built.train_dataset,
                                      eval_dataset=built.eval_dataset, data_collator=built.data_collator,
                                      eval_collator=built.eval_collator, callbacks=[*(callbacks or []), report])
    if progress:
        remove_log_printers(trainer)
    result = trainer.train(resume_from_checkpoint=plan.checkpoint)
    final_dir = os.path.join(recipe.output_dir, "final")
    wrapped.save_pretrained(final_dir)
    student_dir = os.path.join(recipe.output_dir, "student")
    wrapped.export_student(student_dir)  # gathered when sharded (FSDP2, ZeRO-3); every rank calls it
    unwrap(wrapped)
    if built.folders.student_processor is not None:  # tokenizer, image processor and chat template, as trained with
        built.folders.student_processor.save_pretrained(student_dir)
    summary = {"resumed_from": plan.checkpoint, "global_step": trainer.state.global_step,
               "train_loss": result.training_loss, "final": final_dir, "student": student_dir,
               "log_file": report.log_path, "plots": report.plots, "log_history": trainer.state.log_history}
    finish_run(recipe, summary)
    return summary


def _recipe_trainer_class():
    from .callback import DistillationTrainer

    class RecipeTrainer(DistillationTrainer):
        """Evaluation batches go through the eval data's own collator."""

        def __init__(self, *args, eval_collator=None, **kwargs):
            super().__init__(*args, **kwargs)
            self.eval_collator = eval_collator

        def get_eval_dataloader(self, eval_dataset=None):
            if self.eval_collator is None:
                return super().get_eval_dataloader(eval_dataset)
            train_collator, self.data_collator = self.data_collator, self.eval_collator
            try:
                return super().get_eval_dataloader(eval_dataset)
            finally:
                self.data_collator = train_collator

    return RecipeTrainer


def _place_teacher(wrapped, spec: DistributedSpec) -> None:
    """The student is sharded by the Trainer (accelerate); the teacher, which it never sees, is placed here."""
    if spec.teacher == "replicate":
        return
    if spec.strategy == "fsdp2":
        wrapped.plugin.shard_teacher(spec.teacher)
    elif spec.strategy == "zero3":
        from .zero3 import partition_teacher

        partition_teacher(wrapped, offload=spec.teacher == "offload")
    else:
        raise ConfigError(f"distributed.teacher={spec.teacher!r} needs strategy 'fsdp2' or 'zero3'")


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


# ---------------------------------------------------------------------------- chat data
def _chat_processor(processor: Optional[str], student_processor, chat_template: Optional[str]):
    from .checkpoints import load_processor

    if processor is not None:
        if not os.path.isdir(processor):
            raise ConfigError(f"data.kwargs.processor {processor!r} is not a local folder")
        student_processor = load_processor(processor)
    if student_processor is None:
        raise ConfigError("the conversations builder needs the student's processor (or tokenizer): save it in the "
                          "student's folder (processor.save_pretrained), or set student.processor or "
                          "data.kwargs.processor to its folder")
    if chat_template is not None:  # kept on the processor so that the export carries the template trained with
        if os.path.isfile(chat_template):
            with open(chat_template, encoding="utf-8") as fh:
                chat_template = fh.read()
        student_processor.chat_template = chat_template
    return student_processor


@register_data_builder("conversations")
def _conversations(student, teacher, path: str, image_root: Optional[str] = None,
                   category_column: Optional[str] = None, max_length: Optional[int] = None,
                   padding_side: str = "right", split: str = "train", chat_template: Optional[str] = None,
                   processor: Optional[str] = None, max_samples: Optional[int] = None, *, plugin: Optional[str] = None,
                   student_processor=None):
    """Chat data (LLaVA JSON/JSONL, chat messages, `datasets` folders or parquet; see
    `vlmdistill.data.conversations`) collated through the student's processor and chat template (see
    `vlmdistill.data.chat`). `category_column` names the record field whose value becomes the batch's `dataset`
    (lingudistill's selective distillation); `chat_template` is a Jinja string or file replacing the processor's."""
    from .data.chat import ChatCollator
    from .data.conversations import ConversationDataset
    from .registry import get_plugin

    if category_column is not None and plugin is not None and "dataset" not in get_plugin(plugin).extra_inputs:
        raise ConfigError(f"data.kwargs.category_column feeds selective distillation (a `dataset` column), which "
                          f"plugin {plugin!r} does not take; remove category_column")
    proc = _chat_processor(processor, student_processor, chat_template)
    dataset = ConversationDataset(path, image_root=image_root, category_column=category_column, split=split,
                                  max_samples=max_samples)
    collator = ChatCollator(proc, max_length=max_length, padding_side=padding_side,
                            with_categories=category_column is not None)
    return dataset, collator


@register_data_check("conversations")
def _check_conversations(config, path: str, image_root: Optional[str] = None, category_column: Optional[str] = None,
                         max_length: Optional[int] = None, padding_side: str = "right", split: str = "train",
                         chat_template: Optional[str] = None, processor: Optional[str] = None,
                         max_samples: Optional[int] = None, *, plugin: Optional[str] = None, student_processor=None):
    """Every record parsed and every image path checked; the first samples collated through the processor; the
    categories found checked against lingudistill's dataset_categories."""
    dataset, collator = _conversations(None, None, path, image_root, category_column, max_length, padding_side,
                                       split, chat_template, processor, max_samples, plugin=plugin,
                                       student_processor=student_processor)
    categories = dataset.categories()
    table = getattr(config, "dataset_categories", None)
    if category_column is not None and table is not None and getattr(config, "unknown_dataset", "") == "error":
        unknown = sorted(c for c in categories if c is not None and c not in table)
        if unknown:
            raise ConfigError(f"{path}: categories {unknown} (column {category_column!r}) are not in the config's "
                              f"dataset_categories ({', '.join(sorted(table)) or 'empty'}); add them, or set "
                              "unknown_dataset to 'distill' or 'skip'")
    batch = collator([dataset[i] for i in range(min(2, len(dataset)))])
    with_images = sum(bool(item.images) for item in dataset.items)
    counts = ", ".join(f"{k if k is not None else '(none)'}: {v}" for k, v in sorted(categories.items(), key=str))
    return (f"{len(dataset)} conversations from {path} ({with_images} with images; categories {counts}); the first "
            f"batch collates to input_ids {list(batch['input_ids'].shape)} with "
            f"{int((batch['labels'] != -100).sum())} supervised tokens")
