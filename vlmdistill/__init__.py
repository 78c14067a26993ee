"""vlmdistill: distillation plugins that attach to existing vision-language models.

    model = vlmdistill.wrap(student, plugin="kd", teacher=teacher, alpha=0.5)
    ...train with transformers.Trainer(callbacks=[vlmdistill.DistillationCallback()]) ...
    student = vlmdistill.unwrap(model)

The names below are imported on first use (PEP 562), so `import vlmdistill` — and a command line that only
prints help or evaluates — does not pay for torch and transformers until it needs them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: public name -> the submodule defining it
_EXPORTS = {
    "wrap": "api", "unwrap": "api", "load": "api", "step_end": "api",
    "DistillationCallback": "callback", "DistillationTrainer": "callback", "DistillationTrainerMixin": "callback",
    "PluginConfig": "config", "option": "config",
    "ConfigError": "errors", "DataError": "errors", "IncompatibleTeacherError": "errors",
    "NonFiniteLossError": "errors", "UnknownPluginError": "errors", "UnsupportedModelError": "errors",
    "DistillationModel": "model",
    "DistillationPlugin": "plugin", "DistillationResult": "plugin",
    "get_plugin": "registry", "list_plugins": "registry", "register_plugin": "registry",
    "EMATeacher": "teachers",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    try:  # submodules (vlmdistill.io, vlmdistill.losses, ...) as attributes, as after an eager import
        return importlib.import_module(f".{name}", __name__)
    except ModuleNotFoundError as exc:
        if exc.name != f"{__name__}.{name}":
            raise
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


if TYPE_CHECKING:  # for type checkers and IDEs
    from .api import load, step_end, unwrap, wrap  # noqa: F401
    from .callback import DistillationCallback, DistillationTrainer, DistillationTrainerMixin  # noqa: F401
    from .config import PluginConfig, option  # noqa: F401
    from .errors import (ConfigError, DataError, IncompatibleTeacherError, NonFiniteLossError,  # noqa: F401
                         UnknownPluginError, UnsupportedModelError)
    from .model import DistillationModel  # noqa: F401
    from .plugin import DistillationPlugin, DistillationResult  # noqa: F401
    from .registry import get_plugin, list_plugins, register_plugin  # noqa: F401
