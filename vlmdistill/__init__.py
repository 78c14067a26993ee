"""vlmdistill: distillation plugins that attach to existing vision-language models.

    model = vlmdistill.wrap(student, plugin="kd", teacher=teacher, alpha=0.5)
    ...train with transformers.Trainer(callbacks=[vlmdistill.DistillationCallback()]) ...
    student = vlmdistill.unwrap(model)
"""

__version__ = "0.1.0"

from .api import load, step_end, unwrap, wrap  # noqa: E402
from .callback import DistillationCallback, DistillationTrainer, DistillationTrainerMixin  # noqa: E402
from .config import PluginConfig, option  # noqa: E402
from .errors import (  # noqa: E402
    ConfigError,
    DataError,
    IncompatibleTeacherError,
    NonFiniteLossError,
    UnknownPluginError,
    UnsupportedModelError,
)
from .model import DistillationModel  # noqa: E402
from .plugin import DistillationPlugin, DistillationResult  # noqa: E402
from .registry import get_plugin, list_plugins, register_plugin  # noqa: E402

__all__ = [
    "wrap", "unwrap", "load", "step_end", "list_plugins", "register_plugin", "get_plugin",
    "DistillationCallback", "DistillationTrainer", "DistillationTrainerMixin", "DistillationModel",
    "DistillationPlugin", "DistillationResult", "PluginConfig", "option", "ConfigError", "DataError",
    "IncompatibleTeacherError", "NonFiniteLossError", "UnknownPluginError", "UnsupportedModelError",
]
