"""Wrap-time checks that the teacher can read the student's K/V layer by layer (identity layer map)."""

from __future__ import annotations

from typing import Any

from torch import nn

from vlmdistill.errors import IncompatibleTeacherError, UnsupportedModelError

#: attention implementations whose function LinguDistill can call around its capture
SUPPORTED_ATTENTION = ("sdpa", "eager")
_ROPE_IGNORED = {"mrope_section", "mrope_interleaved"}  # mRoPE axes: text tokens use one position on every axis


def head_dim(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def rope_signature(config: Any) -> dict[str, Any]:
    """RoPE parameters that change the rotation of a text position (type, base, scaling)."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    if not params:
        params = dict(getattr(config, "rope_scaling", None) or {})
        if getattr(config, "rope_theta", None) is not None:
            params["rope_theta"] = config.rope_theta
    params = {k: v for k, v in params.items() if k not in _ROPE_IGNORED}
    kind = params.pop("rope_type", params.pop("type", "default"))
    params["rope_type"] = "default" if kind == "mrope" else kind
    return params


def check_architectures(student_config: Any, teacher_config: Any) -> None:
    """Refuse a teacher whose layers cannot take the student's K/V, naming both values."""
    pairs = [
        ("num_hidden_layers", student_config.num_hidden_layers, teacher_config.num_hidden_layers),
        ("num_key_value_heads", student_config.num_key_value_heads, teacher_config.num_key_value_heads),
        ("head_dim", head_dim(student_config), head_dim(teacher_config)),
        ("hidden_size", student_config.hidden_size, teacher_config.hidden_size),
    ]
    s_rope, t_rope = rope_signature(student_config), rope_signature(teacher_config)
    pairs.append(("rope_type", s_rope.get("rope_type"), t_rope.get("rope_type")))
    pairs.append(("rope_theta (RoPE base)", s_rope.get("rope_theta"), t_rope.get("rope_theta")))
    for key in sorted((set(s_rope) | set(t_rope)) - {"rope_type", "rope_theta"}):
        pairs.append((f"RoPE parameter {key}", s_rope.get(key), t_rope.get(key)))
    for name, s_value, t_value in pairs:
        if s_value != t_value:
            raise IncompatibleTeacherError(
                f"lingudistill shares K/V layer by layer, so the teacher must match the student's language model: "
                f"{name} differs (student {s_value!r} vs teacher {t_value!r})")


def sliding_window(config: Any) -> int | None:
    """The window of a sliding-window decoder (all layers, or the `sliding_attention` ones), or None."""
    window = getattr(config, "sliding_window", None)
    if not isinstance(window, int) or getattr(config, "use_sliding_window", True) is False:
        return None
    layer_types = getattr(config, "layer_types", None)
    return window if layer_types is None or "sliding_attention" in layer_types else None


def check_attention_features(config: Any, role: str) -> None:
    """Refuse attention variants the two-source attention does not reproduce. Sliding-window layers equal full
    causal attention on sequences no longer than the window, which `LinguDistillPlugin.plan` checks per batch."""
    layer_types = getattr(config, "layer_types", None) or []
    odd = sorted({t for t in layer_types if t not in ("full_attention", "sliding_attention")})
    if odd:
        raise UnsupportedModelError(f"{role} language model has {odd} layers; lingudistill supports causal "
                                    "self-attention layers only")
    for attr in ("attn_logit_softcapping", "final_logit_softcapping"):
        if getattr(config, attr, None):
            raise UnsupportedModelError(f"{role} language model uses {attr}={getattr(config, attr)}; not supported")
    if getattr(config, "logit_scale", None) not in (None, 1, 1.0):
        raise UnsupportedModelError(f"{role} language model scales its logits (logit_scale={config.logit_scale}); "
                                    "not supported")


def check_attention_implementation(config: Any, role: str) -> str:
    impl = getattr(config, "_attn_implementation", None) or "eager"
    if impl.startswith("lingudistill_"):
        raise UnsupportedModelError(f"the {role} is already attached to another lingudistill wrapper; unwrap that "
                                    "one first (a teacher cannot serve two wrappers at once)")
    if impl not in SUPPORTED_ATTENTION:
        raise UnsupportedModelError(
            f"{role} language model runs attention implementation {impl!r}; lingudistill wraps {SUPPORTED_ATTENTION}. "
            f"Call model.set_attn_implementation('sdpa') before wrap()")
    return impl


def head_width(head: nn.Module) -> int:
    weight = getattr(head, "weight", None)
    if weight is None:
        raise UnsupportedModelError(f"LM head {type(head).__name__} has no weight")
    return int(weight.shape[0])
