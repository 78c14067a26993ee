"""Momentum self-distillation for contrastive dual encoders (`plugin="msd"`)."""

from .config import MSDConfig
from .plugin import MSDPlugin
from .step import msd_step

__all__ = ["MSDPlugin", "MSDConfig", "msd_step"]
