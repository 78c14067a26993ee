"""What LinguDistill needs to know about a VLM: its text decoder, and which tokens are visual.

Nothing here is per family. The visual token ids come from the model's config (`*_token_id` / `*_token_index`
attributes named for images, videos or vision markers), from the processor (its image/video token attributes)
and from image-structure token names in the tokenizer. The text decoder is found structurally. A VLM is refused
only for a reason that breaks the KV-sharing mechanism, and the reason is named.
"""

from __future__ import annotations

import inspect
import re
from typing import Any

from torch import nn

from vlmdistill.errors import UnsupportedModelError
from vlmdistill.hf import base_model

#: words that mark an attribute (config or processor) as naming a visual token
_VISUAL_WORD = re.compile(r"image|video|vision|img|frame|boi|eoi")
_CONFIG_ID = re.compile(r"_token_(id|index)$")
_PROCESSOR_TOKEN = re.compile(r"(_token|_tag|_token_id|_ids)$")
#: image-structure tokens some processors write around image placeholders without naming them as attributes
#: (Idefics3 / SmolVLM tiles: `<row_1_col_1>` ...)
STRUCTURE_TOKEN = re.compile(r"<row_\d+_col_\d+>|<fake_token_around_image>|<global-img>")

#: families whose image tokens attend bidirectionally (to later image and prompt tokens), so the student's K/V at
#: an image position depend on tokens a causal teacher has not seen yet (transformers' modelling code)
BIDIRECTIONAL_PREFIX = ("paligemma", "gemma3", "gemma3n", "gemma4", "shieldgemma2", "colpali")


def model_type(model: nn.Module) -> str:
    config = getattr(base_model(model), "config", None)
    return getattr(config, "model_type", None) or type(model).__name__


def _configs(config: Any) -> list[Any]:
    out = [config]
    for key in getattr(config, "sub_configs", {}) or {}:
        sub = getattr(config, key, None)
        if sub is not None and hasattr(sub, "to_dict"):
            out.append(sub)
    return out


def refusal_reason(student: nn.Module, decoder: nn.Module | None = None) -> str | None:
    """Why the KV-sharing mechanism cannot hold for this VLM, or None."""
    inner = base_model(student)
    config = inner.config
    kind = model_type(student)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if kind in BIDIRECTIONAL_PREFIX or getattr(text, "use_bidirectional_attention", False):
        return ("its image tokens attend bidirectionally, so the student's K/V at an image position depend on later "
                "tokens, which a causal teacher cannot reproduce")
    for sub in _configs(config):
        if getattr(sub, "cross_attention_layers", None):
            return "images enter through cross-attention layers, not through K/V at token positions"
        deep = [k for k, v in sub.to_dict().items() if "deepstack" in k and v]
        if deep:
            return (f"it injects visual features into several decoder layers (deep-stack: {deep[0]}), which a "
                    "text-only teacher does not receive")
    if decoder is not None:
        for i, layer in enumerate(decoder.layers):
            crossing = [n for n, _ in layer.named_children() if "cross" in n or n == "encoder_attn"]
            if crossing:
                return f"decoder layer {i} has a cross-attention block ({crossing[0]}): images enter through it"
    return None


def _refuse(student: nn.Module, decoder: nn.Module | None) -> None:
    reason = refusal_reason(student, decoder)
    if reason:
        raise UnsupportedModelError(f"lingudistill cannot distil into {model_type(student)!r} students: {reason}")


def _int_ids(value: Any) -> list[int]:
    if isinstance(value, bool):
        return []
    if isinstance(value, int):
        return [value] if value >= 0 else []
    if isinstance(value, (list, tuple)) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return [v for v in value if v >= 0]
    return []


def config_visual_ids(config: Any) -> dict[str, int]:
    """`{attribute: id}` of the top-level config's visual token ids (placeholders, start/end markers)."""
    names = set(config.to_dict()) | set(getattr(config, "attribute_map", {}) or {})
    out = {}
    for name in sorted(names):
        ids = _int_ids(getattr(config, name, None)) if _CONFIG_ID.search(name) and _VISUAL_WORD.search(name) else []
        if len(ids) == 1:
            out[name] = ids[0]
    return out


def _tokenizer_of(processor_or_tokenizer: Any) -> Any:
    return getattr(processor_or_tokenizer, "tokenizer", None) or processor_or_tokenizer


def processor_visual_ids(processor: Any) -> dict[str, list[int]]:
    """`{attribute: ids}` of a processor's image/video tokens (`image_token`, `fake_image_token`,
    `image_break_token`, `video_token_id`, `row_col_ids`, ...)."""
    tokenizer = _tokenizer_of(processor)
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    out: dict[str, list[int]] = {}
    for name, value in sorted(vars(processor).items()):
        if not (_VISUAL_WORD.search(name) or name == "row_col_ids") or not _PROCESSOR_TOKEN.search(name):
            continue
        ids = [vocab[value]] if isinstance(value, str) and value in vocab else _int_ids(value)
        if ids:
            out[name] = ids
    return out


def structure_token_ids(tokenizer: Any) -> set[int]:
    return {int(i) for token, i in tokenizer.get_vocab().items() if STRUCTURE_TOKEN.fullmatch(token)}


def visual_token_ids(student: nn.Module, tokenizer: Any = None, processor: Any = None) -> set[int]:
    """Ids of the student's visual tokens: from its config, its processor and its tokenizer's structure tokens."""
    ids = set(config_visual_ids(base_model(student).config).values())
    if processor is not None:
        ids.update(i for values in processor_visual_ids(processor).values() for i in values)
        tokenizer = tokenizer or _tokenizer_of(processor)
    if tokenizer is not None:
        ids.update(structure_token_ids(tokenizer))
    return ids


def text_decoder(model: nn.Module, role: str = "student") -> nn.Module:
    """The causal text decoder (the module with `layers`, `rotary_emb` and the text config), checked for what
    the KV sharing relies on; a VLM that breaks the mechanism is refused with the reason."""
    if role == "student":
        _refuse(model, None)
    decoder = find_text_decoder(model, role)
    if role == "student":
        _refuse(model, decoder)
    check_text_decoder(decoder, role)
    return decoder


def find_text_decoder(model: nn.Module, role: str = "student") -> nn.Module:
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
    return candidates[0]


def check_text_decoder(decoder: nn.Module, role: str = "student") -> None:
    if not isinstance(getattr(decoder, "rotary_emb", None), nn.Module):
        raise UnsupportedModelError(
            f"{role} text decoder {type(decoder).__name__} has no `rotary_emb` module: lingudistill reads the "
            "student's RoPE positions there (decoders without RoPE are not supported)")
    for i, layer in enumerate(decoder.layers):
        attn = getattr(layer, "self_attn", None)
        if attn is None or getattr(attn, "layer_idx", None) != i:
            raise UnsupportedModelError(
                f"{role} decoder layer {i} has no `self_attn` with layer_idx={i}: lingudistill maps teacher and "
                "student layers through the attention module's layer index")
        forward = inspect.unwrap(type(attn).forward)
        if "ALL_ATTENTION_FUNCTIONS" not in getattr(getattr(forward, "__code__", None), "co_names", ()):
            raise UnsupportedModelError(
                f"{role} attention {type(attn).__name__} does not dispatch through transformers' "
                "AttentionInterface (ALL_ATTENTION_FUNCTIONS), where lingudistill captures and replaces K/V")
