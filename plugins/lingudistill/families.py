"""What LinguDistill needs to know about a VLM family: which tokens are visual.

Everything else (the text decoder, its attention, its positions) is found generically. Adding a family is one
`Family` entry: the config attributes holding its image token ids and, optionally, the names of image-structure
tokens that only the tokenizer knows.
"""

from __future__ import annotations

import dataclasses
import re

from torch import nn

from vlmdistill.errors import UnsupportedModelError
from vlmdistill.hf import base_model


@dataclasses.dataclass(frozen=True)
class Family:
    #: config attributes holding visual token ids (placeholders, vision start/end markers)
    id_attributes: tuple[str, ...]
    #: regular expressions of image-structure token names, resolved through the student's tokenizer
    token_patterns: tuple[str, ...] = ()


_LLAVA = Family(("image_token_id",))
_IDEFICS3 = Family(("image_token_id",), (r"<fake_token_around_image>", r"<global-img>", r"<row_\d+_col_\d+>"))
_QWEN2_VL = Family(("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"))

FAMILIES: dict[str, Family] = {
    "llava": _LLAVA,
    "idefics3": _IDEFICS3,
    "smolvlm": _IDEFICS3,
    "qwen2_vl": _QWEN2_VL,
}

#: families that are VLMs but break an assumption of the KV-sharing mechanism
REFUSED: dict[str, str] = {
    "paligemma": "its image prefix attends bidirectionally, so the student's visual K/V depend on later tokens",
    "gemma3": "its image tokens attend bidirectionally and its layers mix sliding-window and global attention",
    "mllama": "images enter through cross-attention layers, not through K/V at token positions",
    "qwen3_vl": "it injects visual features into several decoder layers (deep-stack), which a text-only teacher "
                "does not have",
    "qwen3_vl_moe": "it injects visual features into several decoder layers (deep-stack)",
}


def model_type(model: nn.Module) -> str:
    config = getattr(base_model(model), "config", None)
    return getattr(config, "model_type", None) or type(model).__name__


def family_of(student: nn.Module) -> Family:
    kind = model_type(student)
    if kind in FAMILIES:
        return FAMILIES[kind]
    if kind in REFUSED:
        raise UnsupportedModelError(f"lingudistill does not support {kind!r} students: {REFUSED[kind]}")
    raise UnsupportedModelError(
        f"lingudistill does not know the model family {kind!r}: it needs the ids of its visual tokens. Supported "
        f"families: {', '.join(sorted(FAMILIES))}. Add one to vlmdistill.plugins.lingudistill.families.FAMILIES "
        "(the config attributes holding the image token ids) if its text decoder is a causal decoder whose "
        "attention goes through transformers' AttentionInterface")


def visual_token_ids(student: nn.Module, family: Family, tokenizer=None) -> set[int]:
    """Ids named by the family's config attributes, plus its structure tokens when a tokenizer is given."""
    config = base_model(student).config
    ids = set()
    for attr in family.id_attributes:
        value = getattr(config, attr, None)
        if isinstance(value, int):
            ids.add(value)
    if not ids:
        raise UnsupportedModelError(
            f"{type(base_model(student)).__name__}.config has none of {list(family.id_attributes)}: "
            "lingudistill cannot tell its image tokens apart")
    if tokenizer is not None and family.token_patterns:
        pattern = re.compile("|".join(f"(?:{p})" for p in family.token_patterns))
        for token, index in tokenizer.get_vocab().items():
            if pattern.fullmatch(token):
                ids.add(int(index))
    return ids


def text_decoder(model: nn.Module, role: str = "student") -> nn.Module:
    """The causal text decoder (the module with `layers`, `rotary_emb` and the text config)."""
    inner = base_model(model)
    config = inner.config
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    candidates = [m for _, m in inner.named_modules()
                  if getattr(m, "config", None) is text_config
                  and isinstance(getattr(m, "layers", None), nn.ModuleList)]
    if not candidates and hasattr(inner, "get_decoder"):
        decoder = inner.get_decoder()
        candidates = [decoder] if isinstance(getattr(decoder, "layers", None), nn.ModuleList) else []
    if not candidates:
        raise UnsupportedModelError(
            f"{role} {type(inner).__name__} has no text decoder module with a `layers` list and the text config")
    decoder = candidates[0]
    if not isinstance(getattr(decoder, "rotary_emb", None), nn.Module):
        raise UnsupportedModelError(
            f"{role} text decoder {type(decoder).__name__} has no `rotary_emb` module: lingudistill reads the "
            "student's RoPE positions there")
    for i, layer in enumerate(decoder.layers):
        attn = getattr(layer, "self_attn", None)
        if attn is None or getattr(attn, "layer_idx", None) != i:
            raise UnsupportedModelError(
                f"{role} decoder layer {i} has no `self_attn` with layer_idx={i}: lingudistill maps teacher and "
                "student layers through the attention module's layer index")
    return decoder
