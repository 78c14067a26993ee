"""Config of the `kd` plugin."""

from __future__ import annotations

import dataclasses
from typing import Literal, Optional

from vlmdistill.config import LogitDistillationConfig, PluginConfig, option
from vlmdistill.errors import ConfigError


@dataclasses.dataclass
class FeatureMatch(PluginConfig):
    """One intermediate-feature pair, matched through forward hooks."""

    student: str = option(help="module path in the student whose output is matched, e.g. 'model.layers.1'")
    teacher: str = option(help="module path in the teacher, e.g. 'model.layers.3'")
    weight: float = option(1.0, "weight of this pair in the total loss", ge=0.0)
    loss: Literal["mse", "smooth_l1", "cosine"] = option("mse", "distance between the (projected) features")
    student_dim: Optional[int] = option(None, "width of the student feature; inferred from the module if omitted")
    teacher_dim: Optional[int] = option(None, "width of the teacher feature; inferred from the module if omitted")


@dataclasses.dataclass
class KDConfig(LogitDistillationConfig):
    """Hinton logit distillation with optional logit standardization and feature matching."""

    alpha: float = option(0.5, "loss = (1 - alpha) * task loss + alpha * KD loss; 1.0 = pure distillation",
                          ge=0.0, le=1.0)
    logit_standardization: bool = option(
        False, "z-score both logit rows before the temperature softmax (Sun et al., CVPR 2024)")
    positions: Literal["auto", "labels", "all"] = option(
        "auto", "where logits are distilled: 'labels' = supervised positions (labels != -100, after the causal "
                "shift), 'all' = every non-padding position, 'auto' = 'labels' when labels are given")
    features: list[FeatureMatch] = option(default_factory=list, help="intermediate-feature pairs to match")
    trust_vocab_prefix: bool = option(
        False, "accept different student/teacher vocabulary sizes without tokenizers to check that the smaller "
               "vocabulary is a prefix of the larger (distil over the shared prefix)")
    chunk_rows: int = option(0, "rows of logits processed at once by the KD loss (bounds fp32 memory); "
                                "0 = about 2^20 logits on CPU, 2^24 on GPU", ge=0)

    def validate(self, where=None):
        super().validate(where)
        names = [f.student for f in self.features]
        if len(set(names)) != len(names):
            raise ConfigError(f"{where or 'KDConfig'}.features: a student module is listed twice: {names}")
