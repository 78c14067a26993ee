"""LinguDistill (`plugin="lingudistill"`): layer-wise KV-cache sharing + selective distillation from a VLM's
original language model."""

from .config import LinguDistillConfig
from .plugin import LinguDistillPlugin

__all__ = ["LinguDistillPlugin", "LinguDistillConfig"]
