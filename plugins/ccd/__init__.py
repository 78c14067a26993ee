"""Character-to-character distillation (`plugin="ccd"`): label-free pretraining of text-image ViTs."""

from .config import CCDConfig, ViewConfig
from .export import export_teacher_encoder, teacher_encoder
from .plugin import TEACHER_ENCODER_DIR, CCDPlugin
from .vit import CCDViT, CCDViTConfig, ccd_vit

__all__ = ["CCDPlugin", "CCDConfig", "ViewConfig", "CCDViT", "CCDViTConfig", "ccd_vit", "teacher_encoder",
           "export_teacher_encoder", "TEACHER_ENCODER_DIR"]
