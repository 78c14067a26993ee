"""Config of the `lingudistill` plugin."""

from __future__ import annotations

import dataclasses
from typing import Literal

from vlmdistill.config import LogitDistillationConfig, option
from vlmdistill.errors import ConfigError

#: language-intensive data in the paper's sense: distilled by default
DEFAULT_DISTILL_CATEGORIES = ["captioning", "knowledge", "text", "long_form"]


@dataclasses.dataclass
class LinguDistillConfig(LogitDistillationConfig):
    """Layer-wise KV-cache sharing + selective logit distillation from the VLM's original language model."""

    alpha: float = option(0.5, "on distilled samples loss = (1 - alpha) * CE + alpha * KD; other samples keep CE",
                          ge=0.0, le=1.0)
    share_scope: Literal["visual", "prompt", "all"] = option(
        "visual", "positions where the teacher reads the student's K/V: 'visual' = image tokens and image-structure "
                  "markers, 'prompt' = everything before the first supervised token, 'all' = every position. Tokens "
                  "outside the teacher's vocabulary are always shared")
    detach_shared_kv: bool = option(
        True, "detach the student's shared K/V and run the teacher without autograd; False lets the KD gradient "
              "reach the student's K/V through the teacher's attention (ablation, needs a separate teacher)")
    teacher_pass: Literal["text_only", "full_length"] = option(
        "text_only", "'text_only' = teacher queries only at non-shared positions (the cheap form); 'full_length' = "
                     "the teacher runs over every position with its K/V replaced at shared ones (the reference)")
    kernel: Literal["auto", "torch", "triton"] = option(
        "auto", "two-source attention of the text-only pass: 'triton' = the fused kernel, 'torch' = masked SDPA, "
                "'auto' = Triton on CUDA when the shapes fit, torch otherwise")
    kd_by_default: bool = option(
        True, "distil samples whose batch carries neither `kd_mask` nor `dataset`, and samples whose `dataset` "
              "entry is None (no category)")
    dataset_categories: dict[str, str] = option(
        default_factory=dict, help="dataset name (the batch's `dataset` entries) -> category, e.g. "
                                   "{'coco': 'captioning', 'docvqa': 'documents'}")
    distill_categories: list[str] = option(
        default_factory=lambda: list(DEFAULT_DISTILL_CATEGORIES),
        help="categories whose samples are distilled (language-intensive); all others keep the plain task loss")
    unknown_dataset: Literal["error", "distill", "skip"] = option(
        "error", "what to do with a `dataset` name missing from dataset_categories")
    extra_shared_token_ids: list[int] = option(
        default_factory=list, help="more token ids whose positions take the student's K/V (image-structure "
                                   "markers the model family does not name in its config)")
    trust_vocab_prefix: bool = option(
        False, "accept a student vocabulary larger than the teacher's without tokenizers to prove that the "
               "teacher's vocabulary is its prefix")
    chunk_rows: int = option(0, "supervised rows per chunk of the fused CE + KD pass (teacher LM head, softmaxes); "
                                "bounds the fp32 temporaries. 0 = automatic: about 2^20 logits per chunk on CPU, "
                                "2^24 on GPU (as kd)", ge=0)

    def validate(self, where=None):
        super().validate(where)
        where = where or "LinguDistillConfig"
        if any(not name for name in self.dataset_categories):
            raise ConfigError(f"{where}.dataset_categories: dataset names must be non-empty")
        if any(i < 0 for i in self.extra_shared_token_ids):
            raise ConfigError(f"{where}.extra_shared_token_ids: ids must be >= 0, got {self.extra_shared_token_ids}")
