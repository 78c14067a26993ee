"""Generic logit and feature distillation (`plugin="kd"`)."""

from .config import FeatureMatch, KDConfig
from .plugin import KDPlugin

__all__ = ["KDPlugin", "KDConfig", "FeatureMatch"]
