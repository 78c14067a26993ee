"""`lingudistill`: recover a VLM's language ability by distilling from its original, frozen language model.

Per micro-batch:
1. choose the distilled samples (`kd_mask`, dataset categories) and the shared / queried / distilled positions;
2. student forward; the registered attention stashes each layer's post-RoPE K/V at the shared positions and a
   pre-hook on the rotary embedding records the student's positions;
3. teacher pass over the distilled samples only, at the student's positions, attending to the stashed student
   K/V at shared positions and to its own K/V elsewhere (text-only queries, or the full-length reference);
4. loss = Σ_rows w·CE + α·Σ_distilled τ²·D(teacher ‖ student), w = 1−α on distilled rows and 1 elsewhere,
   divided by the supervised-token count (the Trainer's `num_items_in_batch` when given).

Irawan et al., "LinguDistill", arXiv 2604.00829.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from vlmdistill.errors import ConfigError, DataError, UnsupportedModelError
from vlmdistill.hf import base_model
from vlmdistill.plugin import DistillationPlugin, DistillationResult
from vlmdistill.teachers import has_active_adapters

from .attention import AttentionRouter, ForwardState
from vlmdistill.vocab import shared_vocabulary

from .compat import (check_architectures, check_attention_features, check_attention_implementation, head_dim,
                     head_width, sliding_window)
from .config import LinguDistillConfig
from .families import text_decoder, visual_token_ids
from vlmdistill.losses import auto_chunk_rows, supervised_rows, task_and_distill_sums
from .layout import build_layout, distilled_rows, document_ids, prompt_mask
from .losses import kd_sum, task_ce_sums
from .selection import sample_kd_mask
from .teacher_lm import TeacherLM


@dataclasses.dataclass
class BatchPlan:
    kd_mask: torch.Tensor       # [B] samples that get the KD term
    unreadable: torch.Tensor    # [B, T] image tokens and ids the teacher cannot embed (always shared)
    distilled: torch.Tensor     # [B, T] logit rows entering the KL
    state: ForwardState | None  # the capture / teacher layout; None when nothing is distilled


def _attn_snapshot(config) -> dict:
    """The attention implementation of a config and of each of its sub-configs (transformers has no getter)."""
    out = {"": config._attn_implementation}
    for key in getattr(config, "sub_configs", {}) or {}:
        sub = getattr(config, key, None)
        if sub is not None:
            out[key] = sub._attn_implementation
    return out


def _text_config_key(config) -> str | None:
    """The sub-config key of the text config, or None when the config is the text config itself."""
    text = config.get_text_config()
    for key in getattr(config, "sub_configs", {}) or {}:
        if getattr(config, key, None) is text:
            return key
    return None


class LinguDistillPlugin(DistillationPlugin):
    name = "lingudistill"
    description = ("LinguDistill: restore a VLM's language ability from its original LM through layer-wise KV "
                   "sharing and selective distillation")
    config_class = LinguDistillConfig
    teacher_policy = "required"
    extra_inputs = ("kd_mask", "dataset")
    runtime_args = ("student_tokenizer", "teacher_tokenizer", "student_processor")
    demo = "vlmdistill.eval.experiments.lingudistill:main"
    recipe_builders = "vlmdistill.eval.experiments.lingudistill_recipes"
    #: the student's text decoder, a part of the student (registered and saved there, not a second time here)
    unregistered = ("_student_decoder",)

    def __init__(self, config: LinguDistillConfig, **runtime: Any) -> None:
        super().__init__(config, **runtime)
        self.router = AttentionRouter()
        self.shared_width: int | None = None
        self._visual_ids: torch.Tensor | None = None
        self._teacher_readable = 0
        self._window: int | None = None
        self._teacher_lm: TeacherLM | None = None
        self._student_decoder: nn.Module | None = None
        self._attn_restore: list[tuple[nn.Module, dict]] = []

    # ------------------------------------------------------------------ wrap
    def resolve_teacher(self, student: nn.Module, teacher: Any) -> None:
        if teacher is None and has_active_adapters(student):
            teacher = "base"  # a LoRA student distils from its own base weights
        super().resolve_teacher(student, teacher)

    def check_compatibility(self, student: nn.Module) -> None:
        cfg = self.config
        if self.teacher_is_student_base and not cfg.detach_shared_kv:
            raise ConfigError("detach_shared_kv=False needs a separate teacher: with teacher='base' the KD gradient "
                              "would run through the student's own (base) weights")
        decoder = text_decoder(student)
        s_config = decoder.config
        check_attention_features(s_config, "student")
        check_attention_implementation(s_config, "student")
        teacher_lm = TeacherLM.build(self.teacher, is_student_base=self.teacher_is_student_base,
                                     student_decoder=decoder)
        t_config = teacher_lm.decoder.config
        check_attention_features(t_config, "teacher")
        check_attention_implementation(t_config, "teacher")
        check_architectures(s_config, t_config)
        processor = self.runtime.get("student_processor")
        s_tok = self.runtime.get("student_tokenizer") or getattr(processor, "tokenizer", None)
        t_tok = self.runtime.get("teacher_tokenizer")
        student_head = base_model(student).get_output_embeddings()
        self.shared_width = shared_vocabulary(head_width(student_head), teacher_lm.vocab_size,
                                              student_tokenizer=s_tok, teacher_tokenizer=t_tok,
                                              trust_prefix=cfg.trust_vocab_prefix)
        ids = visual_token_ids(student, s_tok, processor) | set(cfg.extra_shared_token_ids)
        if not ids:
            raise UnsupportedModelError(
                f"{type(base_model(student)).__name__}.config names no image or video token id (no "
                "`*image*_token_id` / `*_token_index` attribute) and no processor was given: lingudistill shares the "
                "student's K/V at those positions. Pass student_processor=, or extra_shared_token_ids; for a "
                "text-only student use plugin='kd'")
        self._visual_ids = torch.tensor(sorted(ids), dtype=torch.long)
        # Ids past the teacher's tokenizer are padding rows of its head: the teacher cannot read those tokens.
        self._teacher_readable = min(teacher_lm.vocab_size, len(t_tok)) if t_tok is not None else teacher_lm.vocab_size
        windows = [w for w in (sliding_window(s_config), sliding_window(t_config)) if w is not None]
        self._window = min(windows) if windows else None
        if cfg.kernel == "triton":
            self._check_triton(s_config, teacher_lm)
        self._teacher_lm = teacher_lm
        self._student_decoder = decoder

    @staticmethod
    def _check_triton(text_config, teacher_lm: TeacherLM) -> None:
        from vlmdistill.kernels import triton_refusal
        from vlmdistill.teachers import module_device

        # The dispatcher's own policy (head dims up to 128 run zero-padded); the dtype is known only per call
        refusal = triton_refusal(head_dim(text_config), None, module_device(teacher_lm.decoder))
        if refusal:
            raise ConfigError(f"kernel='triton': {refusal}. Use kernel='auto' to fall back to torch")

    def attach(self, student: nn.Module, hooks) -> None:
        teacher_lm = self._teacher_lm
        s_inner = base_model(student)
        s_text_key = _text_config_key(s_inner.config)
        s_name = self.router.name_for(self._student_decoder.config._attn_implementation)
        self._attn_restore.append((s_inner, _attn_snapshot(s_inner.config)))
        s_inner.set_attn_implementation({s_text_key: s_name} if s_text_key else s_name)
        if not self.teacher_is_student_base:
            t_inner = base_model(teacher_lm.model)
            t_name = self.router.name_for(teacher_lm.decoder.config._attn_implementation)
            self._attn_restore.append((t_inner, _attn_snapshot(t_inner.config)))
            t_key = _text_config_key(t_inner.config)
            t_inner.set_attn_implementation({t_key: t_name} if t_key else t_name)
        # Eager under torch.compile: they read the per-forward state
        hooks.forward_pre_hook(self._student_decoder.rotary_emb, torch.compiler.disable(self._record_positions),
                               with_kwargs=True)
        hooks.forward_hook(teacher_lm.decoder, torch.compiler.disable(self._record_teacher_hidden))

    def detach(self, student: nn.Module) -> None:
        while self._attn_restore:
            module, snapshot = self._attn_restore.pop()
            module.set_attn_implementation(snapshot)
        self.router.unregister()

    def _record_positions(self, module, args, kwargs):
        state = self.router.current()
        if state is not None and state.role == "student" and state.positions is None:
            positions = kwargs.get("position_ids", args[1] if len(args) > 1 else None)
            state.positions = positions.detach() if positions is not None else None

    def _record_teacher_hidden(self, module, args, output):
        state = self.router.current()
        if state is not None and state.role == "teacher":
            state.teacher_hidden = output[0] if isinstance(output, tuple) else output.last_hidden_state

    # --------------------------------------------------------------- forward
    def forward(self, student: nn.Module, inputs: dict[str, Any], extras: dict[str, Any],
                num_items_in_batch: Any = None) -> DistillationResult:
        cfg = self.config
        labels = inputs.get("labels")
        if labels is None:  # nothing supervised: nothing to distil (e.g. generation-style evaluation)
            return DistillationResult(output=student(**inputs), loss=None)
        plan = self.plan(inputs, extras)
        s_out = self._student_forward(student, inputs, plan.state)
        logits = s_out["logits"] if isinstance(s_out, dict) else s_out.logits

        # Distilled rows weigh CE by 1 - alpha; every other row (unselected samples, image-token rows) keeps CE.
        row_weight = 1.0 - cfg.alpha * plan.distilled.to(logits.dtype)
        denom = self.normaliser(int(supervised_rows(labels).sum()), num_items_in_batch)
        hidden = self._teacher_hidden(plan, inputs["input_ids"]) if plan.state is not None else None
        with self._teacher_lm.head_available():
            total, ce_sum, kd = self._loss_sums(logits, labels, row_weight, plan, hidden)
        total, terms = total / denom, {"task": ce_sum / denom, "kd": kd / denom}
        return DistillationResult(output=s_out, loss=total, loss_terms=terms)

    def _loss_sums(self, logits, labels, row_weight, plan: BatchPlan, hidden):
        """(weighted total, CE sum, KD sum) of one micro-batch, not yet divided by the item count."""
        cfg = self.config
        chunk_rows = cfg.chunk_rows or auto_chunk_rows(logits.shape[-1], logits.device)
        if cfg.detach_shared_kv:
            total, ce_sum, kd = task_and_distill_sums(
                logits, labels, row_weight, plan.distilled, hidden, self._teacher_head, alpha=cfg.alpha,
                width=self.shared_width, kind=cfg.divergence, temperature=cfg.temperature, jsd_beta=cfg.jsd_beta,
                chunk_rows=chunk_rows)
        else:  # the KD gradient also runs back through the teacher: plain autograd on both sides
            ce_sum, total = task_ce_sums(logits, labels, row_weight)
            kd = torch.zeros((), device=logits.device)
            if hidden is not None:
                b, t = plan.state.layout.distill_position
                kd = kd_sum(logits[b, t], hidden, self._teacher_head, width=self.shared_width, kind=cfg.divergence,
                            temperature=cfg.temperature, jsd_beta=cfg.jsd_beta, chunk_rows=chunk_rows)
                total = total + cfg.alpha * kd
        return total, ce_sum, kd

    def plan(self, inputs: dict[str, Any], extras: dict[str, Any]) -> BatchPlan:
        """Distilled samples and positions of one micro-batch, and the teacher's layout (None: no KD here)."""
        cfg = self.config
        input_ids, labels = inputs.get("input_ids"), inputs["labels"]
        if input_ids is None:
            raise UnsupportedModelError("lingudistill needs input_ids (it finds the image tokens there)")
        if labels.shape != input_ids.shape:
            raise DataError(f"lingudistill: labels of shape {tuple(labels.shape)} do not fit input_ids of shape "
                            f"{tuple(input_ids.shape)}; give one label per token (-100 where unsupervised)")
        device = input_ids.device
        kd_mask = sample_kd_mask(cfg, extras, input_ids.shape[0], device)
        if self._window is not None and input_ids.shape[1] > self._window:
            raise UnsupportedModelError(
                f"lingudistill: the language model attends within a sliding window of {self._window} tokens and this "
                f"batch has {input_ids.shape[1]} positions; the teacher pass is fully causal, which equals the window "
                "only on sequences no longer than it. Truncate to the window")
        unreadable = torch.isin(input_ids, self._visual_ids.to(device)) | (input_ids >= self._teacher_readable)
        attention_mask = inputs.get("attention_mask")
        valid = attention_mask.bool() if attention_mask is not None else torch.ones_like(input_ids, dtype=torch.bool)
        use_cache = inputs.get("use_cache")
        if use_cache is None:
            use_cache = bool(getattr(self._student_decoder.config, "use_cache", False))
        segments = document_ids(inputs.get("position_ids"), attention_mask, use_cache)
        distilled = distilled_rows(labels, kd_mask, valid & ~unreadable)
        state = None
        if bool(distilled.any()):
            full = cfg.teacher_pass == "full_length"
            layout = build_layout(shared=self._shared_positions(unreadable, labels, valid, segments),
                                  distilled=distilled, valid=valid, segments=segments, full_length=full)
            decoder = self._student_decoder
            checkpointing = decoder.training and any(
                getattr(m, "gradient_checkpointing", False) for m in (decoder, *decoder.layers))
            state = ForwardState(layout=layout, detach=cfg.detach_shared_kv, full_length=full, kernel=cfg.kernel,
                                 reference_ok=not checkpointing)
        return BatchPlan(kd_mask=kd_mask, unreadable=unreadable, distilled=distilled, state=state)

    def _student_forward(self, student: nn.Module, inputs: dict[str, Any], state: ForwardState | None):
        # Labels stay out: the plugin computes the (weighted) CE itself from the logits.
        with self.router.activate(state):
            output = student(**{k: v for k, v in inputs.items() if k != "labels"})
            if state is not None:
                state.role = "done"  # a gradient-checkpointing recompute must not capture again
        return output

    def _shared_positions(self, unreadable, labels, valid, segments) -> torch.Tensor:
        scope = self.config.share_scope
        if scope == "all":
            return valid.clone()
        if scope == "prompt":
            return unreadable | prompt_mask(labels, segments)
        return unreadable

    def _teacher_hidden(self, plan: BatchPlan, input_ids: torch.Tensor) -> torch.Tensor:
        """The teacher's final hidden states at the distilled rows `[N_distilled, H]`, in row-major order."""
        state = plan.state
        context = self.teacher_context(grad=not self.config.detach_shared_kv)
        with self.router.activate(state), context:
            hidden = self._teacher_lm.run(state, input_ids, plan.unreadable)
        return hidden[state.layout.distill_slot.to(hidden.device)]

    def _teacher_head(self, hidden_rows: torch.Tensor) -> torch.Tensor:
        # The head runs outside the teacher's forward, under the same context (adapters off for teacher='base');
        # without detach it keeps the caller's grad mode, as the KD gradient flows through it
        with self.teacher_context(grad=False if self.config.detach_shared_kv else None):
            return self._teacher_lm.logits(hidden_rows)

    @torch.no_grad()
    def paired_logits(self, student: nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """For inspection and tests: student and teacher logits (shared vocabulary) at the distilled rows of
        `batch`, with their (batch row, position) coordinates. Runs in the student's current mode."""
        extras = {k: batch[k] for k in self.extra_inputs if k in batch}
        inputs = {k: v for k, v in batch.items() if k not in self.extra_inputs}
        plan = self.plan(inputs, extras)
        if plan.state is None:
            empty = torch.zeros(0, self.shared_width)
            return {"student": empty, "teacher": empty, "rows": torch.zeros(0, 2, dtype=torch.long)}
        output = self._student_forward(student, inputs, plan.state)
        logits = output["logits"] if isinstance(output, dict) else output.logits
        hidden = self._teacher_hidden(plan, inputs["input_ids"])
        b, t = plan.state.layout.distill_position
        width = self.shared_width
        with self._teacher_lm.head_available():
            teacher = self._teacher_head(hidden)[:, :width]
        return {"student": logits[b, t, :width], "teacher": teacher, "rows": torch.stack((b, t), 1)}
