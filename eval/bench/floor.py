"""FLOPs from the shapes, and the step floor every step benchmark prints beside its measured ratio.

    floor = 1 + (teacher forward FLOPs actually needed) / (student forward + backward FLOPs)

Counted: matrix products (projections, MLPs, LM heads, patch embeddings, projectors) exactly, 2 FLOPs per
multiply-add, and attention as 4 · heads · head_dim per visible (query, key) pair (QKᵀ and PV); backward = 2 ×
forward (input and weight gradients; a patch embedding's pixels need none: 1 ×). With attention counted over
every (query, key) pair this is what torch's FLOP counter reports for eager models (`tests/test_bench_floor.py`);
the floors count visible pairs only (causal: T(T+1)/2 per row). Element-wise work (norms, softmax, the loss, the
optimizer) is not counted: the floor is what the FLOPs alone allow, and the arms' shared extra work (the
optimizer step, the student's own loss) lets a measured ratio come in under it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable

import torch


@dataclasses.dataclass
class Flops:
    matmul: float = 0.0
    attention: float = 0.0
    #: matrix products whose input needs no gradient (patch embeddings of pixels)
    matmul_no_input_grad: float = 0.0

    def __add__(self, other: "Flops") -> "Flops":
        return Flops(self.matmul + other.matmul, self.attention + other.attention,
                     self.matmul_no_input_grad + other.matmul_no_input_grad)

    @property
    def forward(self) -> float:
        return self.matmul + self.attention

    @property
    def training(self) -> float:
        """Forward + backward."""
        return 3 * self.forward - self.matmul_no_input_grad


def _head_dim(cfg: Any) -> int:
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def decoder(cfg: Any, *, tokens: int, pairs: int, head_rows: int, layers: int | None = None) -> Flops:
    """A Llama-style decoder (q/k/v/o projections, gated MLP) over `tokens` tokens, `pairs` visible
    (query, key) pairs per layer, and the LM head on `head_rows` rows."""
    h, hd = cfg.hidden_size, _head_dim(cfg)
    heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    per_token = 2 * (h * heads * hd + 2 * h * kv * hd + heads * hd * h + 3 * h * cfg.intermediate_size)
    layers = layers or cfg.num_hidden_layers
    return Flops(matmul=layers * tokens * per_token + 2 * h * cfg.vocab_size * head_rows,
                 attention=layers * 4 * heads * hd * pairs)


def vit(cfg: Any, *, images: int, tokens: int, patches: int) -> Flops:
    """A ViT tower (patch embedding, layers of q/k/v/o and a two-matrix MLP, full attention) over `images`
    images of `tokens` tokens each, `patches` of which come from the patch embedding."""
    h, p = cfg.hidden_size, cfg.patch_size
    patch_embed = 2 * getattr(cfg, "num_channels", 3) * p * p * h * patches * images
    per_token = 2 * (4 * h * h + 2 * h * cfg.intermediate_size)
    return Flops(matmul=patch_embed + cfg.num_hidden_layers * tokens * images * per_token,
                 attention=cfg.num_hidden_layers * 4 * h * tokens * tokens * images,
                 matmul_no_input_grad=patch_embed)


def vision_tower(config: Any, images: int) -> Flops:
    """The vision side of a VLM: tower + projector, by family (SmolVLM / Idefics3, LLaVA with a CLIP tower)."""
    vcfg, text = config.vision_config, config.get_text_config()
    patches = (vcfg.image_size // vcfg.patch_size) ** 2
    if config.model_type in ("smolvlm", "idefics3"):
        s = config.scale_factor
        connector = 2 * vcfg.hidden_size * s * s * text.hidden_size * (patches // (s * s)) * images
        return vit(vcfg, images=images, tokens=patches, patches=patches) + Flops(matmul=connector)
    if config.model_type == "llava":
        kept = patches if config.vision_feature_select_strategy == "default" else patches + 1
        projector = 2 * (vcfg.hidden_size * text.hidden_size + text.hidden_size * text.hidden_size) * kept * images
        return vit(vcfg, images=images, tokens=patches + 1, patches=patches) + Flops(matmul=projector)
    raise ValueError(f"no FLOP model for the vision tower of {config.model_type!r}")


def causal_pairs(lengths: Iterable[int]) -> int:
    return sum(n * (n + 1) // 2 for n in lengths)


def supervised_rows(labels: torch.Tensor) -> torch.Tensor:
    """[B, T] logit rows t whose target labels[t+1] is supervised."""
    rows = torch.zeros_like(labels, dtype=torch.bool)
    rows[:, :-1] = labels[:, 1:] != -100
    return rows


def lingudistill_teacher_needs(batch: dict, shared_ids: Iterable[int], teacher_vocab: int) -> dict:
    """What the teacher must compute for every sample distilled, from the batch alone (no padding, no packed
    documents): its queries = tokens it can read up to the last distilled row; each sees the shared (visual)
    keys and its own queries before it; its LM head runs at the distilled rows."""
    ids, labels = batch["input_ids"], batch["labels"]
    shared = torch.isin(ids, torch.tensor(sorted(shared_ids), device=ids.device)) | (ids >= teacher_vocab)
    distilled = supervised_rows(labels) & ~shared
    tokens = pairs = 0
    for b in range(ids.shape[0]):
        if not bool(distilled[b].any()):
            continue
        last = int(distilled[b].nonzero().max())
        queried = ~shared[b, :last + 1]
        tokens += int(queried.sum())
        seen_shared = shared[b, :last + 1].long().cumsum(0)
        seen_own = queried.long().cumsum(0)
        pairs += int((seen_shared + seen_own)[queried].sum())
    return {"tokens": tokens, "pairs": pairs, "head_rows": int(distilled.sum())}


def step_floor(teacher_forward: Flops, student: Flops) -> float:
    return 1.0 + teacher_forward.forward / student.training


def vlm_student(model: Any, batch: dict, *, images: int) -> Flops:
    """Forward FLOPs of a VLM student on an unpadded batch: vision + decoder over every token, logits at every
    position (what transformers computes without `logits_to_keep`)."""
    b, t = batch["input_ids"].shape
    text = model.config.get_text_config()
    return vision_tower(model.config, images) + decoder(text, tokens=b * t, pairs=causal_pairs([t] * b),
                                                       head_rows=b * t)


def lm_student(config: Any, batch: dict) -> Flops:
    b, t = batch["input_ids"].shape
    return decoder(config, tokens=b * t, pairs=causal_pairs([t] * b), head_rows=b * t)


def describe(floor: float, measured: float) -> str:
    return f"{measured:.3f} (floor {floor:.3f}; measured / floor {measured / floor:.3f})"
