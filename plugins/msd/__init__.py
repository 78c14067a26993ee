"""Momentum self-distillation for contrastive dual encoders (`plugin="msd"`)."""

import importlib.util

from .config import MSDConfig
from .plugin import MSDPlugin
from .step import msd_step

if importlib.util.find_spec("vlmdistill.recipes") is not None:
    from . import recipe_builders  # noqa: F401  (the demo's model/data builders for `vlmdistill train`)

__all__ = ["MSDPlugin", "MSDConfig", "msd_step"]
