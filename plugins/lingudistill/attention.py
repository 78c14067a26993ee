"""The attention implementation LinguDistill registers with transformers.

One `AttentionRouter` per plugin instance registers a uniquely named function in `AttentionInterface` (and the
original implementation's mask builder under the same name in `AttentionMaskInterface`, so padding masks still
reach the student's attention; the teacher's pass builds none, its masks come from the layout). What the function
does depends on the `ForwardState` active in the current context:

* no state (inference, gradient-checkpointing recompute in backward): the original attention, nothing else;
* role "student": the original attention, and the layer's post-RoPE K/V at the shared positions are stashed
  (once per layer and forward, so a recompute never overwrites them);
* role "teacher": attention over the stashed student K/V and the teacher's own K/V, row by row over the packed
  teacher sequence.

State lives in a `ContextVar` owned by the router: two wrapped models, or two threads, never see each other's.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import itertools
import sys
from typing import Callable, Iterator

import torch

from .layout import SequenceLayout
from .two_source import PackedAttention, replaced_attention, two_source_attention

_NAMES = itertools.count()


@dataclasses.dataclass
class ForwardState:
    layout: SequenceLayout
    detach: bool
    full_length: bool
    kernel: str
    role: str = "student"
    #: the student's RoPE positions as its rotary embedding saw them ([B, T] or [axes, B, T])
    positions: torch.Tensor | None = None
    #: the student's autograd graph keeps each layer's K/V anyway (no gradient checkpointing)
    reference_ok: bool = False
    #: layer index -> (K, V, compact): `[1, Hkv, Ns, D]` at the shared positions, packed (compact), or the
    #: layer's whole K/V `[B, Hkv, T, D]` held by reference and gathered when the teacher reaches that layer
    stash: dict[int, tuple[torch.Tensor, torch.Tensor, bool]] = dataclasses.field(default_factory=dict)
    #: the teacher decoder's final hidden states `[1, Nq, H]`
    teacher_hidden: torch.Tensor | None = None
    #: row bounds and masks of the teacher's attention, per device (built at its first layer)
    attention: dict[torch.device, PackedAttention] = dataclasses.field(default_factory=dict)

    def capture(self, layer: int, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
                saved_by_attention: bool) -> None:
        """Keep layer `layer`'s K/V for the teacher. When the attention saves these very tensors for its backward
        (`saved_by_attention`), a reference costs no memory; otherwise only the shared positions are copied."""
        if layer in self.stash:
            return
        layout = self.layout
        if not self.stash and layout.segments is not None:
            check_documents_masked(mask, layout)
        tracked = key.requires_grad and torch.is_grad_enabled()  # else autograd saves nothing of this layer
        key, value = (key.detach(), value.detach()) if self.detach else (key, value)
        if saved_by_attention and self.reference_ok and tracked:
            self.stash[layer] = (key, value, False)
        else:
            self.stash[layer] = (*self._gather(key, value), True)

    def _gather(self, key: torch.Tensor, value: torch.Tensor):
        """The shared positions of `[B, Hkv, T, D]` K/V, packed: `[1, Hkv, Ns, D]`."""
        layout = self.layout.to(key.device)
        row, index = layout.shared_row, layout.shared_index
        return key[row, :, index].transpose(0, 1)[None], value[row, :, index].transpose(0, 1)[None]

    def shared_kv(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        if layer not in self.stash:
            raise RuntimeError(f"lingudistill: no student K/V captured for layer {layer}")
        key, value, compact = self.stash[layer]
        return (key, value) if compact else self._gather(key, value)

    def teacher_attention(self, module, query, key, value, scaling) -> torch.Tensor:
        """query `[1, Hq, Nq, D]`, key/value `[1, Hkv, Nq, D]` over the packed teacher rows."""
        k_shared, v_shared = (t.to(device=query.device, dtype=query.dtype) for t in self.shared_kv(module.layer_idx))
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        plan = self.attention.get(query.device)
        if plan is None:
            plan = self.attention[query.device] = PackedAttention(self.layout, query.device,
                                                                  full_length=self.full_length)
        if self.full_length:
            out = replaced_attention(query, key, value, k_shared, v_shared, plan, scale)
        else:
            out = two_source_attention(query, k_shared, v_shared, key, value, plan, kernel=self.kernel, scale=scale)
        return out.transpose(1, 2).contiguous()


def check_documents_masked(mask: torch.Tensor | None, layout: SequenceLayout) -> None:
    """The teacher separates packed documents; make sure the student's own mask does too."""
    if isinstance(mask, torch.Tensor) and mask.dim() == 4:
        allowed = mask[layout.rows, 0] if mask.dtype == torch.bool else mask[layout.rows, 0] == 0
        other = layout.segments[:, :, None] != layout.segments[:, None, :]
        if not bool((allowed & other).any()):
            return
    raise RuntimeError("lingudistill: the batch packs several documents per row (position ids restart) but the "
                       "student's attention mask does not separate them; pass use_cache=False, as transformers "
                       "only builds per-document masks without a KV cache")


def _original_function(impl: str, module) -> Callable:
    if impl == "eager":
        # Each modeling file defines its own eager attention; transformers falls back to it the same way.
        fn = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
        if fn is None:
            raise RuntimeError(f"{type(module).__module__} defines no eager_attention_forward")
        return fn
    from transformers import AttentionInterface

    return AttentionInterface._global_mapping[impl]


class AttentionRouter:
    def __init__(self) -> None:
        self.active: contextvars.ContextVar[ForwardState | None] = contextvars.ContextVar(
            f"lingudistill_state_{id(self)}", default=None)
        self._serial = next(_NAMES)
        self.names: dict[str, str] = {}  # original implementation -> registered name

    def name_for(self, impl: str) -> str:
        """Register (once) the routing function that falls back to `impl`; return its name."""
        if impl not in self.names:
            from transformers import AttentionInterface
            from transformers.masking_utils import AttentionMaskInterface

            name = f"lingudistill_{self._serial}_{impl}"
            AttentionInterface.register(name, self._make_function(impl))
            build_mask = AttentionMaskInterface._global_mapping[impl]
            AttentionMaskInterface.register(name, self._make_mask_function(build_mask))
            self.names[impl] = name
        return self.names[impl]

    def unregister(self) -> None:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface

        for name in self.names.values():
            AttentionInterface._global_mapping.pop(name, None)
            AttentionMaskInterface._global_mapping.pop(name, None)
        self.names.clear()

    def _make_function(self, impl: str) -> Callable:
        def attention(module, query, key, value, attention_mask, **kwargs):
            state = self.active.get()
            if state is not None:
                if state.role == "teacher":
                    return state.teacher_attention(module, query, key, value, kwargs.get("scaling")), None
                if state.role == "student":
                    # transformers' SDPA runs GQA unexpanded when there is no mask: it saves these K/V itself
                    state.capture(module.layer_idx, key, value, attention_mask,
                                  saved_by_attention=impl == "sdpa" and attention_mask is None)
            return _original_function(impl, module)(module, query, key, value, attention_mask, **kwargs)

        # Under torch.compile the routing runs eagerly (a graph break per attention call): it reads per-forward
        # state that a traced graph would bake in, and the teacher's per-row attention is data-dependent.
        return torch.compiler.disable(attention)

    def _make_mask_function(self, build: Callable) -> Callable:
        def mask(*args, **kwargs):
            state = self.active.get()
            if state is not None and state.role == "teacher":
                return None  # the teacher's attention takes its masks from the layout: build none
            return build(*args, **kwargs)

        return torch.compiler.disable(mask)

    @contextlib.contextmanager
    def activate(self, state: ForwardState | None) -> Iterator[ForwardState | None]:
        token = self.active.set(state)
        try:
            yield state
        finally:
            self.active.reset(token)

    def current(self) -> ForwardState | None:
        return self.active.get()
