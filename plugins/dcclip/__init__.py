"""DC-CLIP (`plugin="dcclip"`): two-stage compression of a multilingual CLIP into a small Chinese+English student."""

from .cache import TeacherCacheWriter, TeacherFeatureCache, module_fingerprint
from .config import DCCLIPConfig, TowerTaps
from .plugin import DCCLIPPlugin

__all__ = ["DCCLIPPlugin", "DCCLIPConfig", "TowerTaps", "TeacherFeatureCache", "TeacherCacheWriter",
           "module_fingerprint"]
