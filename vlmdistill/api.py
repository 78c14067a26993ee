"""wrap / unwrap / load: the public entry points."""

from __future__ import annotations

import os
from typing import Any

from torch import nn

from .config import PluginConfig
from .errors import ConfigError, DataError
from .io import PLUGIN_CONFIG_NAME, PLUGIN_STATE_NAME, load_tensors, read_json, tensors_metadata
from .model import NONFINITE_POLICIES, DistillationModel, distillation_class_for
from .registry import get_plugin
from .sharding import ScalarParameters


def _split_kwargs(plugin_cls: type, kwargs: dict[str, Any]) -> tuple[dict, dict]:
    runtime = {k: kwargs.pop(k) for k in list(kwargs) if k in plugin_cls.runtime_args}
    return kwargs, runtime


def build_config(plugin_cls: type, config: PluginConfig | dict | None, overrides: dict[str, Any]) -> PluginConfig:
    config_cls = plugin_cls.config_class
    where = f"plugin {plugin_cls.name!r} config"
    if isinstance(config, config_cls):
        values = config.to_dict()
    elif config is None or isinstance(config, dict):
        values = dict(config or {})
    else:
        raise ConfigError(f"{where}: expected a dict or {config_cls.__name__}, got {type(config).__name__}")
    try:
        return config_cls.from_dict(values, where=where, **overrides)
    except ConfigError as exc:
        if plugin_cls.runtime_args and "unknown key" in str(exc):
            raise ConfigError(f"{exc}; runtime arguments: {', '.join(plugin_cls.runtime_args)}") from None
        raise


def wrap(model: nn.Module, plugin: str = "kd", teacher: Any = None, *, config: PluginConfig | dict | None = None,
         on_nonfinite: str = "raise", **kwargs: Any) -> DistillationModel:
    """Attach a distillation plugin to `model` and return the wrapper to train.

    `teacher` is a frozen model (frozen here if it is not), `'base'` for a PEFT student whose
    adapters are disabled to act as its own teacher, or None for plugins that build their own.
    Config values come as keyword arguments or as `config=` (a dict or the plugin's config class);
    unknown keys are refused with the list of valid ones. Teacher/student compatibility is checked
    here, before any training (`plugin.check_compatibility`), then the plugin builds its training-only state
    (`plugin.setup`) and attaches its hooks (`plugin.attach`).

    While wrapped, 0-dim parameters (CLIP's `logit_scale`) are 1-element tensors, which FSDP2 can shard;
    state dicts and exports keep their 0-dim shape, and `unwrap()` restores it.

    `on_nonfinite`: a NaN/inf loss term in training raises `NonFiniteLossError` naming the term and the
    step (`"raise"`, the default: such a loss means broken data or numerics, and hiding it wastes the run), or
    drops that optimizer step (`"skip"`, under the Trainer through `DistillationCallback`).
    """
    if isinstance(model, DistillationModel):
        raise ConfigError("model is already wrapped; call vlmdistill.unwrap(model) first")
    if on_nonfinite not in NONFINITE_POLICIES:
        raise ConfigError(f"on_nonfinite={on_nonfinite!r}: choose one of {', '.join(NONFINITE_POLICIES)}")
    plugin_cls = get_plugin(plugin)
    overrides, runtime = _split_kwargs(plugin_cls, dict(kwargs))
    cfg = build_config(plugin_cls, config, overrides)
    instance = plugin_cls(cfg, **runtime)
    # Before the plugin looks at the student (and copies it, for EMA teachers): 0-dim parameters become
    # 1-element tensors, which FSDP2 can shard; state dicts keep the 0-dim shape.
    scalars = ScalarParameters().hold(model)
    instance._student = model  # the plugin's unregistered reference (`plugin.student`)
    try:
        instance.resolve_teacher(model, teacher)
        if isinstance(instance.teacher, nn.Module) and instance.teacher is not model:
            scalars.hold(instance.teacher)  # a teacher may be sharded like the student
        instance.check_compatibility(model)
        # Before the wrapper holds the plugin's 0-dim parameters and before attach() hooks the student (an EMA copy
        # made afterwards would carry the hooks along)
        instance.setup(model)
    except Exception:
        scalars.release()
        raise
    wrapper_cls = distillation_class_for(model, instance)
    wrapped = wrapper_cls(model, instance, scalars, on_nonfinite=on_nonfinite)
    try:
        instance.attach(model, wrapped._hooks)
    except Exception:
        wrapped.unwrap()
        raise
    return wrapped


def unwrap(wrapped: nn.Module) -> nn.Module:
    """The original student: same object and class, hooks removed, attention implementation restored."""
    inner = unwrap_parallel(wrapped)
    if not isinstance(inner, DistillationModel):
        raise TypeError(f"expected a model returned by vlmdistill.wrap, got {type(wrapped).__name__}")
    return inner.unwrap()


def unwrap_parallel(model: nn.Module) -> nn.Module:
    """Peel DDP / DataParallel / accelerate / torch.compile wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, nn.Module) and hasattr(model, "module") and isinstance(model.module, nn.Module) \
                and not isinstance(model, DistillationModel):
            model = model.module
        else:
            return model


def load(directory: str, model: nn.Module | None = None, teacher: Any = None, *, on_nonfinite: str | None = None,
         **kwargs: Any) -> DistillationModel:
    """Rebuild a wrapper from `save_pretrained(directory)` and restore the plugin state exactly.

    `model`: the student object to load the saved weights into, in place (required for non-transformers
    students and PEFT students); None rebuilds a transformers student from its config.
    `teacher` must be given again (teachers are never saved). Extra keyword arguments are runtime
    arguments of the plugin (e.g. tokenizers); config values come from the saved file.

    Everything checkable is checked before the student is touched (plugin name in both files, the recorded
    student class, the model type, every weight's key and shape); if the plugin state does not fit after
    `wrap`, the wrapper is taken off again, so a failed load leaves student and teacher unattached.
    """
    config_path = os.path.join(directory, PLUGIN_CONFIG_NAME)
    state_path = os.path.join(directory, PLUGIN_STATE_NAME)
    meta = read_json(config_path)
    name = meta.get("plugin")
    if not isinstance(name, str) or not isinstance(meta.get("config"), dict):
        raise DataError(f"{config_path} lacks the plugin name or its config: not written by save_pretrained")
    plugin_cls = get_plugin(name)
    unknown = set(kwargs) - set(plugin_cls.runtime_args)
    if unknown:
        raise ConfigError(f"load(): unknown argument(s) {sorted(unknown)}; the config comes from "
                          f"{PLUGIN_CONFIG_NAME}. Runtime arguments: {', '.join(plugin_cls.runtime_args) or '(none)'}")
    saved_for = tensors_metadata(state_path).get("plugin")
    if saved_for is not None and saved_for != name:
        raise DataError(f"{state_path} holds the state of plugin {saved_for!r}, but {config_path} names {name!r}")
    recorded = meta.get("student_class")
    if model is not None and recorded and _class_path(model) != recorded:
        raise ConfigError(f"load(): {directory} was saved from a {recorded} student; model= is a {_class_path(model)}")
    student = plugin_cls.load_student(model, directory)
    state = load_tensors(state_path)
    wrapped = wrap(student, plugin=name, teacher=teacher, config=meta["config"],
                   on_nonfinite=on_nonfinite or meta.get("on_nonfinite", "raise"), **kwargs)
    try:
        wrapped.plugin.load_state_dict(state)
    except (RuntimeError, ValueError, KeyError) as exc:
        wrapped.unwrap()
        raise DataError(f"{state_path} does not fit the {name!r} plugin built for this student: {exc}") from None
    return wrapped


def _class_path(model: nn.Module) -> str:
    return f"{type(model).__module__}.{type(model).__qualname__}"


def step_end(model: nn.Module) -> bool:
    """`model.step_end()` through any DDP / accelerate wrapping; True when the step ended a training stage."""
    return unwrap_parallel(model).step_end()
