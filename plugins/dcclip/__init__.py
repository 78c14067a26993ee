"""DC-CLIP (`plugin="dcclip"`): two-stage compression of a multilingual CLIP into a small Chinese+English student."""

from .cache import TeacherCacheWriter, TeacherFeatureCache, module_fingerprint
from .config import DCCLIPConfig, TowerTaps
from .plugin import DCCLIPPlugin
from . import recipes  # noqa: F401  (registers the recipe builders dcclip-hf-clip and dcclip-image-text)

__all__ = ["DCCLIPPlugin", "DCCLIPConfig", "TowerTaps", "TeacherFeatureCache", "TeacherCacheWriter",
           "module_fingerprint"]
